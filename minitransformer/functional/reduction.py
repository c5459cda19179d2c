"""Sums and means over axes. Backward: the gradient is copied back along the reduced axes
(divided by the count for the mean). docs/backward.md#reductions."""
from ..tensor import as_tensor, check_axis, make_op


def _axes(x, axis, op):
    if axis is None:
        return tuple(range(x.ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        check_axis(op, a, x)
    return tuple(a % x.ndim for a in axes)


def _spread(g, x, axes, keepdims):
    """Broadcast ``g`` back to ``x``'s shape along the reduced ``axes``."""
    if not keepdims:
        g = x.xp.expand_dims(g, axes)
    return x.xp.broadcast_to(g, x.shape)


def sum(x, axis=None, keepdims=False):
    """``y = Σ_axis x``; backward: ``dx = g`` broadcast along ``axis``."""
    x = as_tensor(x)
    axes = _axes(x, axis, "sum")
    out = x.data.sum(axis=axes, keepdims=keepdims)
    return make_op(out, (x,), lambda g: (_spread(g, x, axes, keepdims),), "sum")


def mean(x, axis=None, keepdims=False):
    """``y = Σ_axis x / n``; backward: ``dx = g / n`` broadcast along ``axis``."""
    x = as_tensor(x)
    axes = _axes(x, axis, "mean")
    n = 1
    for a in axes:
        n *= x.shape[a]
    out = x.data.mean(axis=axes, keepdims=keepdims)
    return make_op(out, (x,), lambda g: (_spread(g / n, x, axes, keepdims),), "mean")
