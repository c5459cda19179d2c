"""Softmax and log-softmax (§3.2.1 attention weights, §3.4 output distribution).

Both subtract the row maximum first, so ``exp`` never overflows. docs/backward.md#softmax.
"""
from .. import backend, kernels
from ..tensor import as_tensor, check_axis, make_op


def softmax(x, axis=-1):
    """``s = exp(x - max x) / Σ exp(x - max x)``.

    Backward: ``dx = s * (g - Σ_axis g * s)`` (the Jacobian ``diag(s) - s sᵀ`` applied to ``g``).
    """
    x = as_tensor(x)
    check_axis("softmax", axis, x)
    xp = x.xp
    if backend.fused(x.data) and axis in (-1, x.ndim - 1) and x.ndim >= 1:   # one kernel each way
        L = x.shape[-1]
        s = kernels.masked_softmax(x.data.reshape(-1, L), None, 1.0).reshape(x.shape)
        return make_op(s, (x,), lambda g: (kernels.softmax_backward(s, g, 1.0),), "softmax")
    e = xp.exp(x.data - x.data.max(axis=axis, keepdims=True))
    s = e / e.sum(axis=axis, keepdims=True)

    def backward(g):
        return (s * (g - (g * s).sum(axis=axis, keepdims=True)),)
    return make_op(s, (x,), backward, "softmax")


def log_softmax(x, axis=-1):
    """``y = x - max x - log Σ exp(x - max x)``.

    Backward: ``dx = g - exp(y) * Σ_axis g`` (``exp(y)`` is the softmax).
    """
    x = as_tensor(x)
    check_axis("log_softmax", axis, x)
    xp = x.xp
    if backend.fused(x.data) and axis in (-1, x.ndim - 1) and x.ndim >= 1:   # one kernel each way
        y = kernels.log_softmax(x.data)
        return make_op(y, (x,), lambda g: (kernels.log_softmax_backward(y, g),), "log_softmax")
    shifted = x.data - x.data.max(axis=axis, keepdims=True)
    y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))

    def backward(g):
        return (g - xp.exp(y) * g.sum(axis=axis, keepdims=True),)
    return make_op(y, (x,), backward, "log_softmax")
