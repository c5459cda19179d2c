"""Element-wise ops: arithmetic with broadcasting, exp/log/sqrt/tanh, ReLU (§3.3).

Each backward follows the chain rule element by element; a broadcast input gets its gradient
summed back to its own shape (``unbroadcast``). Derivations: docs/backward.md#elementwise.
"""
from numbers import Number

import numpy as np

from .. import backend, kernels
from ..tensor import Tensor, as_tensor, check_same_device, make_op, unbroadcast


def _operands(op, a, b):
    like = a if isinstance(a, Tensor) else b
    a, b = as_tensor(a, like), as_tensor(b, like)
    check_same_device(op, a, b)
    # An integer (or boolean) operand takes the float operand's dtype, as in PyTorch: ids * 0.5 is
    # float32 by default, not NumPy's float64. Integer tensors never carry gradients.
    if a.dtype.kind == "f" and b.dtype.kind in "iub":
        b = Tensor(b.data.astype(a.dtype))
    elif b.dtype.kind == "f" and a.dtype.kind in "iub":
        a = Tensor(a.data.astype(b.dtype))
    try:
        if a.shape != b.shape:
            like.xp.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast together") from None
    return a, b


def add(a, b):
    """``a + b``; backward: ``da = g``, ``db = g`` (each un-broadcast)."""
    a, b = _operands("add", a, b)

    def backward(g):
        return (unbroadcast(g, a.shape) if a.requires_grad else None,
                unbroadcast(g, b.shape) if b.requires_grad else None)
    return make_op(a.data + b.data, (a, b), backward, "add")


def sub(a, b):
    """``a - b``; backward: ``da = g``, ``db = -g``."""
    a, b = _operands("sub", a, b)

    def backward(g):
        return (unbroadcast(g, a.shape) if a.requires_grad else None,
                unbroadcast(-g, b.shape) if b.requires_grad else None)
    return make_op(a.data - b.data, (a, b), backward, "sub")


def mul(a, b):
    """``a * b``; backward: ``da = g * b``, ``db = g * a``."""
    a, b = _operands("mul", a, b)

    def backward(g):
        return (unbroadcast(g * b.data, a.shape) if a.requires_grad else None,
                unbroadcast(g * a.data, b.shape) if b.requires_grad else None)
    return make_op(a.data * b.data, (a, b), backward, "mul")


def div(a, b):
    """``a / b``; backward: ``da = g / b``, ``db = -g * a / b**2``."""
    a, b = _operands("div", a, b)
    if a.dtype.kind != "f":     # true division of integers gives the default float dtype (PyTorch's rule)
        a = Tensor(a.data.astype(backend.get_default_dtype()))
        b = Tensor(b.data.astype(backend.get_default_dtype()))

    def backward(g):
        return (unbroadcast(g / b.data, a.shape) if a.requires_grad else None,
                unbroadcast(-g * a.data / (b.data * b.data), b.shape) if b.requires_grad else None)
    return make_op(a.data / b.data, (a, b), backward, "div")


def neg(x):
    """``-x``; backward: ``dx = -g``."""
    x = as_tensor(x)
    return make_op(-x.data, (x,), lambda g: (-g,), "neg")


def pow(x, exponent):
    """``x ** p`` for a scalar ``p``; backward: ``dx = g * p * x**(p-1)``."""
    if not isinstance(exponent, Number):
        raise TypeError(f"pow: the exponent must be a Python number, got {type(exponent).__name__}")
    x = as_tensor(x)

    def backward(g):
        if exponent == 0:      # x**0 is constant; p * x**(p-1) would be 0 * inf = nan at x = 0
            return (x.xp.zeros_like(x.data),)
        return (g * (exponent * x.data ** (exponent - 1)),)
    return make_op(x.data ** exponent, (x,), backward, "pow")


def exp(x):
    """``y = e^x``; backward: ``dx = g * y``."""
    x = as_tensor(x)
    y = x.xp.exp(x.data)
    return make_op(y, (x,), lambda g: (g * y,), "exp")


def log(x):
    """``y = ln x``; backward: ``dx = g / x``."""
    x = as_tensor(x)
    return make_op(x.xp.log(x.data), (x,), lambda g: (g / x.data,), "log")


def sqrt(x):
    """``y = √x``; backward: ``dx = g / (2 y)``."""
    x = as_tensor(x)
    y = x.xp.sqrt(x.data)
    return make_op(y, (x,), lambda g: (g / (2 * y),), "sqrt")


def tanh(x):
    """``y = tanh x``; backward: ``dx = g * (1 - y²)``."""
    x = as_tensor(x)
    y = x.xp.tanh(x.data)
    return make_op(y, (x,), lambda g: (g * (1 - y * y),), "tanh")


def relu(x):
    """``y = max(0, x)`` (§3.3); backward: ``dx = g * [x > 0]``."""
    x = as_tensor(x)
    if backend.fused(x.data):   # one pass each way; keeps y (the next layer's input anyway), no mask
        y = kernels.relu(x.data)
        return make_op(y, (x,), lambda g: (kernels.relu_backward(y, g),), "relu")
    positive = x.data > 0
    return make_op(x.data * positive, (x,), lambda g: (g * positive,), "relu")


def astype(x, dtype):
    """Change the dtype; backward casts the gradient back. A cast to integers or booleans has no
    gradient (as in PyTorch): its output is a constant."""
    x = as_tensor(x)
    source = x.dtype
    if np.dtype(dtype).kind != "f":
        return Tensor(x.data.astype(dtype))
    return make_op(x.data.astype(dtype), (x,), lambda g: (g.astype(source),), "astype")
