"""Layer normalisation (§3.1: ``LayerNorm(x + Sublayer(x))``), over the last axis, and the whole
"Add & Norm" box of Figure 1 as one op.

Same semantics as ``torch.nn.functional.layer_norm``: biased variance, ``eps`` inside the root.
docs/backward.md#layernorm.
"""
from .. import backend, kernels
from ..tensor import as_tensor, check_same_device, make_op
from .dropout import apply_dropout, check_p


def _parents(op, inputs, weight, bias):
    """``(parents, weight, bias)``: the input tensors, then γ and β as tensors (None left out of
    ``parents``), checked: γ and β of shape ``(d,)``, everything on one device."""
    d = inputs[0].shape[-1]
    affine = []
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            p = as_tensor(p)
            if p.shape != (d,):
                raise ValueError(f"{op}: {name} must have shape ({d},) for input {inputs[0].shape}, got {p.shape}")
        affine.append(p)
    parents = [*inputs, *(p for p in affine if p is not None)]
    check_same_device(op, *parents)
    return parents, affine[0], affine[1]


def _normalize(x, weight, bias, eps):
    """The array forward: ``(y, backward)`` where ``backward(g) -> (dx, dγ, dβ)`` (None for an
    absent or constant γ, β)."""
    xp, d = backend.get_array_module(x), x.shape[-1]
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    rstd = 1.0 / xp.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)
    x_hat = centered * rstd
    y = x_hat * weight.data if weight is not None else x_hat.copy()
    if bias is not None:
        y += bias.data

    def backward(g):
        dx_hat = g * weight.data if weight is not None else g
        dx = rstd * (dx_hat - dx_hat.mean(axis=-1, keepdims=True)
                     - x_hat * (dx_hat * x_hat).mean(axis=-1, keepdims=True))
        dw = (g * x_hat).reshape(-1, d).sum(axis=0) if weight is not None and weight.requires_grad else None
        db = g.reshape(-1, d).sum(axis=0) if bias is not None and bias.requires_grad else None
        return dx, dw, db
    return y, backward


def _param_grads(weight, bias, dw, db):
    """The gradients of the present affine parameters, in ``parents`` order."""
    return ([dw] if weight is not None else []) + ([db] if bias is not None else [])


def _needs_param_grads(weight, bias):
    return (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)


def layer_norm(x, weight, bias, eps=1e-5):
    """``y = x̂ * γ + β`` with ``x̂ = (x - μ) * rstd``, ``rstd = 1 / √(σ² + eps)``.

    Backward, with ``dx̂ = g * γ`` and means over the last axis:
    ``dx = rstd * (dx̂ - mean(dx̂) - x̂ * mean(dx̂ * x̂))``, ``dγ = Σ g * x̂``, ``dβ = Σ g``.
    """
    x = as_tensor(x)
    if x.ndim == 0:
        raise ValueError("layer_norm: normalises over the last axis, got a scalar (0-d tensor)")
    parents, weight, bias = _parents("layer_norm", [x], weight, bias)
    if backend.fused(*(p.data for p in parents)) and len({p.dtype for p in parents}) == 1:
        return _fused(x, weight, bias, eps, parents)
    y, normalize_backward = _normalize(x.data, weight, bias, eps)

    def backward(g):
        dx, dw, db = normalize_backward(g)
        return (dx, *_param_grads(weight, bias, dw, db))
    return make_op(y, tuple(parents), backward, "layer_norm")


def _fused(x, weight, bias, eps, parents):
    """The same op on the GPU: one kernel forward (keeps only mean and rstd per row), one for dx
    and one for the column sums of dγ, dβ."""
    w = weight.data if weight is not None else None
    y, mean, rstd = kernels.layer_norm(x.data, w, bias.data if bias is not None else None, eps)

    def backward(g):
        dx, dw, db = kernels.layer_norm_backward(x.data, g, w, mean, rstd,
                                                 need_weight_grads=_needs_param_grads(weight, bias))
        return (dx, *_param_grads(weight, bias, dw, db))
    return make_op(y, tuple(parents), backward, "layer_norm")


def add_and_norm(x, sublayer_out, weight, bias, dropout_p=0.0, training=False, eps=1e-5):
    """Figure 1's "Add & Norm" with §5.4's residual dropout: ``LayerNorm(x + Dropout(sublayer_out))``.

    One op instead of three (dropout, add, layer_norm); the same numbers as those three in a row.
    With ``z = x + s * m`` (``m`` the dropout mask, 1 without dropout) and ``dz`` from LayerNorm's
    backward: ``dx = dz`` (the residual path) and ``ds = dz * m``. On the GPU it is one kernel
    forward and one for ``dz`` and ``ds`` together (plus LayerNorm's column sums for dγ, dβ).
    """
    op = "add_and_norm"
    x, s = as_tensor(x), as_tensor(sublayer_out)
    if x.shape != s.shape:
        raise ValueError(f"{op}: the residual x and the sublayer output must have the same shape, "
                         f"got {x.shape} and {s.shape}")
    check_p(op, dropout_p)
    p = dropout_p if training else 0.0
    parents, weight, bias = _parents(op, [x, s], weight, bias)
    if backend.fused(*(t.data for t in parents)) and len({t.dtype for t in parents}) == 1:
        return _fused_add_and_norm(x, s, weight, bias, p, eps, parents)
    dropped, again = apply_dropout(s.data, p) if p > 0 else (s.data, None)
    y, normalize_backward = _normalize(x.data + dropped, weight, bias, eps)

    def backward(g):
        dz, dw, db = normalize_backward(g)
        ds = (again(dz) if again is not None else dz) if s.requires_grad else None
        return (dz, ds, *_param_grads(weight, bias, dw, db))
    return make_op(y, tuple(parents), backward, op)


def _fused_add_and_norm(x, s, weight, bias, p, eps, parents):
    """The GPU version: the dropout mask comes from the same counter-based stream as
    ``F.dropout``'s (``backend.counter_stream``), so it equals dropout, add, layer_norm in a row."""
    seed, offset = backend.counter_stream(s.size) if p > 0 else (0, 0)
    w = weight.data if weight is not None else None
    y, z, mean, rstd = kernels.add_and_norm(x.data, s.data, w, bias.data if bias is not None else None,
                                            eps, p, seed, offset)

    def backward(g):
        dz, ds, dw, db = kernels.add_and_norm_backward(
            z, g, w, mean, rstd, p, seed, offset, need_weight_grads=_needs_param_grads(weight, bias))
        return (dz, ds if s.requires_grad else None, *_param_grads(weight, bias, dw, db))
    return make_op(y, tuple(parents), backward, "add_and_norm")
