"""Inverted dropout (§5.4 "Residual Dropout", P_drop).

Training keeps each element with probability ``1 - p`` and scales it by ``1 / (1 - p)``, so
evaluation is the identity. The mask comes from the device generator (``mt.manual_seed``) and
is saved for the backward; on the GPU the fused kernel draws it from a counter-based generator
and regenerates it in the backward instead. docs/backward.md#dropout.
"""
import numpy as np

from .. import backend, kernels
from ..tensor import make_op


def dropout_mask(shape, p, dtype, device):
    """``m = [u ≥ p] / (1 - p)`` with ``u ~ U[0, 1)``, as an array of ``dtype``."""
    u = backend.generator(device).random(shape, dtype=np.float32)
    return (u >= p).astype(dtype) * dtype.type(1.0 / (1.0 - p))


def check_p(op, p):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: dropout probability must be in [0, 1), got {p}")


def dropout(x, p, training=True):
    """``y = x * m``; backward: ``dx = g * m`` with the same mask."""
    check_p("dropout", p)
    if not training or p == 0.0:
        return x
    if backend.fused(x.data):   # the mask is regenerated from (seed, offset), never stored
        seed, offset = backend.counter_stream(x.size)
        return make_op(kernels.dropout_apply(x.data, p, seed, offset), (x,),
                       lambda g: (kernels.dropout_apply(g, p, seed, offset),), "dropout")
    mask = dropout_mask(x.shape, p, x.dtype, x.device)
    return make_op(x.data * mask, (x,), lambda g: (g * mask,), "dropout")
