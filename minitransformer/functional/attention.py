"""Scaled dot-product attention (§3.2.1), one fused op with its own backward.

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V

The mask is boolean, True where a query *may* attend to a key, and broadcasts to
``(…, Lq, Lk)``. docs/backward.md#attention.
"""
import math

from .. import backend, kernels
from ..tensor import PartBackward, Tensor, as_tensor, check_same_device, make_op, unbroadcast
from .dropout import apply_dropout, check_p


def _t(array):
    return array.swapaxes(-1, -2)


def scaled_dot_product_attention(q, k, v, mask=None, dropout_p=0.0, training=False, concat_heads=False):
    """Returns ``(output (…, Lq, d_v), weights (…, Lq, Lk))``.

    ``weights`` are the attention probabilities *before* dropout (a constant tensor, for
    plotting). A query row whose every key is masked attends to nothing: its output is 0.
    ``concat_heads=True`` (``(B, h, L, d)`` inputs, §3.2.2): the output is ``Concat(head_1, …, head_h)``,
    ``(B, Lq, h·d_v)``, laid out by the op itself, so that only the concatenation stays alive for the
    backward, not also the heads it was copied from.

    Forward:  ``S = Q Kᵀ / √d_k`` (masked places -∞), ``P = softmax(S)``, ``P̃ = P * m``
    (dropout mask ``m``), ``O = P̃ V``.
    Backward: ``dV = P̃ᵀ dO``, ``dP = (dO Vᵀ) * m``, ``dS = P * (dP - Σ_k dP * P)``,
    ``dQ = dS K / √d_k``, ``dK = dSᵀ Q / √d_k``.
    """
    q, k, v = as_tensor(q), as_tensor(k), as_tensor(v)
    check_same_device("scaled_dot_product_attention", q, k, v)
    op = "scaled_dot_product_attention"
    if min(q.ndim, k.ndim, v.ndim) < 2:
        raise ValueError(f"{op}: q, k, v need at least 2 axes (…, L, d), got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: q and k must share d_k, got q {q.shape} and k {k.shape}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{op}: k and v must have the same number of keys Lk, got k {k.shape} and v {v.shape}")
    if k.shape[-2] == 0:
        raise ValueError(f"{op}: there are no keys to attend to (Lk = 0), k {k.shape}")
    check_p(op, dropout_p)
    if concat_heads and not q.ndim == k.ndim == v.ndim == 4:
        raise ValueError(f"{op}: concat_heads needs q, k, v of shape (B, h, L, d), got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    xp = q.xp
    scale = 1.0 / math.sqrt(q.shape[-1])

    try:
        batch = q.shape[:-2] if q.shape[:-2] == k.shape[:-2] else xp.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        scores_shape = (*batch, q.shape[-2], k.shape[-2])
    except ValueError:
        raise ValueError(f"{op}: batch axes of q {q.shape} and k {k.shape} cannot be broadcast") from None
    if v.shape[:-2] != k.shape[:-2]:
        try:
            xp.broadcast_shapes(batch, v.shape[:-2])
        except ValueError:
            raise ValueError(f"{op}: batch axes of v {v.shape} do not match those of q {q.shape} "
                             f"and k {k.shape}") from None
    if mask is not None:
        mask = as_tensor(mask, q)
        check_same_device(op, q, mask)
        if mask.dtype.kind != "b":
            raise TypeError(f"{op}: mask must be boolean (True = may attend), got {mask.dtype}")
        try:
            if xp.broadcast_shapes(mask.shape, scores_shape) != scores_shape:
                raise ValueError
        except ValueError:
            raise ValueError(f"{op}: mask of shape {mask.shape} is not broadcastable to the attention "
                             f"scores' shape (…, Lq, Lk) = {scores_shape}") from None
    grads = _Gradients(q, k, v)
    if backend.fused(q.data, k.data, v.data) and len(scores_shape) <= 4 and len({q.dtype, k.dtype, v.dtype}) == 1:
        return _fused(q, k, v, mask, scale, dropout_p if training else 0.0, grads, concat_heads)

    scores = (q.data @ _t(k.data)) * q.dtype.type(scale)                     # (…, Lq, Lk)
    if mask is not None:
        scores = xp.where(mask.data, scores, -xp.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    row_max = xp.where(xp.isfinite(row_max), row_max, 0)                     # fully masked rows
    e = xp.exp(scores - row_max)
    total = e.sum(axis=-1, keepdims=True)
    P = e / xp.where(total > 0, total, 1)                                     # (…, Lq, Lk)
    P_tilde, again = apply_dropout(P, dropout_p) if training and dropout_p > 0 else (P, None)
    out = P_tilde @ v.data
    if concat_heads:
        out, heads_shape = _concat(out), out.shape

    def backward(dO):
        if concat_heads:
            dO = _split(dO, heads_shape)
        out_q, out_k, out_v = grads.destinations(xp)
        mm = xp.matmul
        dV = unbroadcast(mm(_t(P_tilde), dO, out=out_v), v.shape) if v.requires_grad else None
        dP = dO @ _t(v.data)
        if again is not None:
            dP = again(dP)
        dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
        dS *= q.dtype.type(scale)
        dQ = unbroadcast(mm(dS, k.data, out=out_q), q.shape) if q.requires_grad else None
        dK = unbroadcast(mm(_t(dS), q.data, out=out_k), k.shape) if k.requires_grad else None
        return grads.of_parents(dQ, dK, dV)
    return make_op(out, grads.parents, backward, op), Tensor(P)


def _concat(out):
    """``(B, h, L, d)`` heads -> ``(B, L, h·d)``, ``Concat(head_1, …, head_h)`` (one copy)."""
    B, h, L, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(B, L, h * d)


def _split(g, heads_shape):
    """The concatenation's gradient back as heads ``(B, h, L, d)`` (a view)."""
    B, h, L, d = heads_shape
    return g.reshape(B, L, h, d).transpose(0, 2, 1, 3)


class _Gradients:
    """Where the backward puts dQ, dK, dV. Usually three arrays, one per input. But inputs read as
    ``S[0], S[1], …`` out of one tensor S that they use up — MultiHeadAttention keeps the heads of
    Q, K and V of self-attention in one array ``(3, B, h, L, d_k)``, cross-attention's K and V in
    one ``(2, …)`` and its Q in a ``(1, …)`` — get their gradients written by the products straight
    into the parts of one array of S's shape, and S becomes the op's parent in their place: without
    it the graph walk zero-fills S's gradient and adds the parts into it (up to four more GPU
    launches per attention). Not for an input whose gradient is to be kept (``retain_grad``): it
    would get none."""

    def __init__(self, q, k, v):
        self.inputs, self.sources, self.index = (q, k, v), [], [None, None, None]
        self.parents = self.inputs
        if not any(t.requires_grad for t in self.inputs) or len({t.shape[:-2] for t in self.inputs}) != 1:
            return                       # (broadcast batch axes: their gradients are sums, not parts)
        read = {}                        # id(S) -> (S, [(input position, index in S)])
        for position, t in enumerate(self.inputs):
            backward = t._backward
            if type(backward) is PartBackward and type(backward.index) is int and not t._retain_grad:
                read.setdefault(id(t.parents[0]), (t.parents[0], []))[1].append((position, backward.index))
        for source, parts in read.values():
            if sorted(i for _, i in parts) == list(range(source.shape[0])):      # used up, each once
                for position, i in parts:
                    self.index[position] = (len(self.sources), i)
                self.sources.append(source)
        if self.sources:
            self.parents = (*(t for t, i in zip(self.inputs, self.index) if i is None), *self.sources)

    def destinations(self, xp):
        """Per input, the array its gradient is to be written into (None: a new one)."""
        self.wholes = [xp.empty(s.shape, s.dtype) for s in self.sources]
        return tuple(None if i is None else self.wholes[i[0]][i[1]] for i in self.index)

    def of_parents(self, dQ, dK, dV):
        if not self.sources:
            return dQ, dK, dV
        return (*(d for d, i in zip((dQ, dK, dV), self.index) if i is None), *self.wholes)


def _fused(q, k, v, mask, scale, dropout_p, grads, concat_heads):
    """The same op on the GPU with fused kernels: one kernel for scale + mask + softmax + dropout, one
    for dropout's and the softmax's backward (the mask is ``apply_dropout``'s: the same counter-based
    stream, drawn again); the products read transposed operands in place (kernels.batched_matmul)."""
    mm = kernels.batched_matmul
    scores, mask = mm(q.data, _t(k.data)), mask.data if mask is not None else None
    if dropout_p > 0:   # the mask apply_dropout would draw, applied by the softmax kernel itself
        seed, offset = backend.counter_stream(scores.size)
        P, P_tilde = kernels.masked_softmax_dropout(scores, mask, scale, dropout_p, seed, offset)
    else:
        seed = offset = 0
        P = P_tilde = kernels.masked_softmax(scores, mask, scale)
    out = mm(P_tilde, v.data)
    if concat_heads:
        out, heads_shape = _concat(out), out.shape

    def backward(dO):
        if concat_heads:
            dO = _split(dO, heads_shape)
        # with concat_heads dO is a transposed view here; both products below would copy it
        dO = q.xp.ascontiguousarray(dO)
        out_q, out_k, out_v = grads.destinations(q.xp)
        dV = unbroadcast(mm(_t(P_tilde), dO, out=out_v), v.shape) if v.requires_grad else None
        dP = mm(dO, _t(v.data))                     # dropout's mask is applied to it by the kernel
        dS = kernels.softmax_backward(P, dP, scale, dropout_p, seed, offset)
        dQ = unbroadcast(mm(dS, k.data, out=out_q), q.shape) if q.requires_grad else None
        dK = unbroadcast(mm(_t(dS), q.data, out=out_k), k.shape) if k.requires_grad else None
        return grads.of_parents(dQ, dK, dV)
    return make_op(out, grads.parents, backward, "scaled_dot_product_attention"), Tensor(P)
