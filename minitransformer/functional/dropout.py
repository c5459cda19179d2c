"""Inverted dropout (§5.4 "Residual Dropout", P_drop).

Training keeps each element with probability ``1 - p`` and scales it by ``1 / (1 - p)``, so
evaluation is the identity. The mask comes from the device generator (``mt.manual_seed``) and
is saved for the backward; on the GPU the fused kernel draws it from a counter-based generator
and regenerates it in the backward instead. docs/backward.md#dropout.
"""
import numpy as np

from .. import backend, kernels
from ..tensor import as_tensor, make_op


def dropout_mask(shape, p, dtype, device):
    """``m = [u ≥ p] / (1 - p)`` with ``u ~ U[0, 1)``, as an array of ``dtype``."""
    u = backend.generator(device).random(shape, dtype=np.float32)
    return (u >= p).astype(dtype) * dtype.type(1.0 / (1.0 - p))


def apply_dropout(x, p):
    """``(x * m, again)`` for an array ``x``: ``again(g) = g * m`` reapplies the same mask in the
    backward. The one place that draws masks (F.dropout and attention both use it): on the GPU the
    fused kernel regenerates ``m`` from its (seed, offset) instead of keeping it."""
    if backend.fused(x):
        seed, offset = backend.counter_stream(x.size)
        return kernels.dropout_apply(x, p, seed, offset), lambda g: kernels.dropout_apply(g, p, seed, offset)
    mask = dropout_mask(x.shape, p, x.dtype, backend.device_of(x))
    return x * mask, lambda g: g * mask


def check_p(op, p):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: dropout probability must be in [0, 1), got {p}")


def dropout(x, p, training=True):
    """``y = x * m``; backward: ``dx = g * m`` with the same mask."""
    check_p("dropout", p)
    x = as_tensor(x)
    if not training or p == 0.0:
        return x
    y, again = apply_dropout(x.data, p)
    return make_op(y, (x,), lambda g: (again(g),), "dropout")
