"""Tensor and the reverse-mode graph walk.

A ``Tensor`` wraps a NumPy or CuPy array. Every op (``minitransformer.functional``) computes its
output array and hands ``make_op`` a closure that maps the output's gradient to its inputs'
gradients — the forward and its backward written in the same breath, as in micrograd.
``Tensor.backward`` sorts the graph topologically *without recursion* and accumulates the
gradients of reused nodes.
"""
import contextlib

import numpy as np

from . import backend

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Ops inside build no graph: for evaluation, decoding and parameter updates."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled():
    return _grad_enabled


class Tensor:
    """An array plus what autograd needs: ``grad``, ``requires_grad`` and how it was made.

    ``.grad`` is a plain array on the tensor's device; treat it as read-only (several gradients
    may share one array). Leaves (tensors you created) keep their gradient after ``backward()``;
    an intermediate tensor keeps it too once you call ``retain_grad()`` on it before.
    """

    __array_priority__ = 1000  # above CuPy's 100 and NumPy's 0: ndarray + Tensor calls Tensor.__radd__

    def __init__(self, data, requires_grad=False, dtype=None, device=None):
        if isinstance(data, Tensor):
            data = data.data
        if isinstance(data, np.generic):  # a NumPy scalar (a full reduction) keeps its dtype
            data = np.asarray(data)
        if not backend.is_array(data):
            data = _host_array(data, dtype)
        elif dtype is not None:
            data = data.astype(dtype, copy=False)
        if device is not None:
            data = backend.to_device(data, device)
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"tensor: only floating tensors can require grad, got {data.dtype}")
        self._set(data, bool(requires_grad), (), None, "")

    def _set(self, data, requires_grad, parents, backward, op):
        """Every attribute of a tensor, in one place (``make_op`` builds op outputs with it, without
        ``__init__``'s checks)."""
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self.op = op                # name of the op that made this tensor ("" for a leaf)
        self.parents = parents      # the tensors it was computed from
        self._backward = backward   # grad_out -> tuple of grads, one per parent (None = no grad)
        self._retain_grad = False

    # ---- what the tensor is ------------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def device(self):
        return backend.device_of(self.data)

    @property
    def xp(self):
        """``numpy`` or ``cupy``: the module that owns this tensor's array."""
        return backend.get_array_module(self.data)

    @property
    def is_leaf(self):
        return self._backward is None

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        body = np.array2string(self.numpy(), precision=4, threshold=20, edgeitems=2,
                               prefix="tensor(")
        extra = f", device='{self.device}'" if self.device != "cpu" else ""
        if self.op:
            extra += f", op={self.op}"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return f"tensor({body}, dtype={self.dtype}{extra})"

    # ---- conversions -------------------------------------------------------------------
    def numpy(self):
        """A host NumPy array (a copy when the tensor lives on the GPU)."""
        return backend.to_numpy(self.data)

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item: only a tensor with one element can be converted, got shape {self.shape}")
        return self.data.reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self):
        """The same array, cut off from the graph."""
        return Tensor(self.data)

    def to(self, device):
        """This tensor on ``device`` (itself when already there; a leaf copy otherwise)."""
        device = backend.check_device(device)
        if device == self.device:
            return self
        return Tensor(backend.to_device(self.data, device), requires_grad=self.requires_grad)

    def astype(self, dtype):
        from .functional import elementwise
        return elementwise.astype(self, dtype)

    def retain_grad(self):
        """Keep this intermediate tensor's gradient after ``backward()`` (to inspect it)."""
        self._retain_grad = True
        return self

    def zero_grad(self):
        self.grad = None

    # ---- the graph walk ----------------------------------------------------------------
    def backward(self, grad=None, retain_graph=False):
        """Back-propagate ``grad`` (default 1 for a scalar) to every tensor that requires grad.

        Gradients *accumulate* into ``.grad`` (call ``zero_grad`` between steps). The graph is
        freed afterwards unless ``retain_graph=True``.
        """
        if not self.requires_grad:
            raise RuntimeError("backward: this tensor does not require grad "
                               "(no input had requires_grad=True, or it was made under no_grad())")
        if grad is None:
            if self.data.size != 1:
                raise ValueError(f"backward: grad can be omitted only for a scalar output, got shape "
                                 f"{self.shape}; pass grad= with that shape")
            grad = self.xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else grad
            grad = self.xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward: grad has shape {grad.shape}, expected {self.shape}")

        grads = {id(self): grad}
        owned = set()   # ids whose array in ``grads`` the walk made itself: it may add into them in place
        for node in reversed(_topological_order(self)):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._backward is None or node._retain_grad:
                node.grad = _leaf_grad(g) if node.grad is None else node.grad + g
            if node._backward is None:
                continue
            for parent, parent_grad in zip(node.parents, node._backward(g)):
                if parent_grad is None or not parent.requires_grad:
                    continue
                key = id(parent)
                is_part = type(parent_grad) is Part
                if not is_part and parent_grad.dtype != parent.dtype:
                    # a float32 tensor mixed with a float64 one: its gradient stays float32, as in
                    # PyTorch (a Part is added into an array of the parent's dtype anyway)
                    parent_grad = parent_grad.astype(parent.dtype)
                if is_part:
                    if key not in owned:   # one zero-filled gradient of the whole parent, shared by its parts
                        # not xp.zeros: NumPy's calloc hands out fresh pages that fault on first
                        # touch every time (it doubled attention's backward on the CPU)
                        whole = parent.xp.empty(parent.shape, parent.dtype)
                        whole.fill(0)
                        if key in grads:
                            whole += grads[key]
                        grads[key] = whole
                        owned.add(key)
                    region = grads[key][parent_grad.index]
                    if backend.is_array(region):   # a view: add in place (``whole[i] += g`` would
                        region += parent_grad.grad  # also copy the sum onto itself: one more launch)
                    else:                          # NumPy gives a scalar, not a view, for one element
                        grads[key][parent_grad.index] += parent_grad.grad
                elif key not in grads:
                    grads[key] = parent_grad
                elif key in owned:
                    grads[key] += parent_grad
                else:
                    grads[key] = grads[key] + parent_grad
                    owned.add(key)
            if not retain_graph:  # free saved activations as soon as they are used
                node._backward, node.parents = _freed_backward, ()

    # ---- operators (the ops and their backwards live in functional/) -------------------
    def __add__(self, other):
        return elementwise.add(self, other)

    def __radd__(self, other):
        return elementwise.add(other, self)

    def __sub__(self, other):
        return elementwise.sub(self, other)

    def __rsub__(self, other):
        return elementwise.sub(other, self)

    def __mul__(self, other):
        return elementwise.mul(self, other)

    def __rmul__(self, other):
        return elementwise.mul(other, self)

    def __truediv__(self, other):
        return elementwise.div(self, other)

    def __rtruediv__(self, other):
        return elementwise.div(other, self)

    def __pow__(self, exponent):
        return elementwise.pow(self, exponent)

    def __neg__(self):
        return elementwise.neg(self)

    def __matmul__(self, other):
        return linear.matmul(self, other)

    def __rmatmul__(self, other):
        return linear.matmul(other, self)

    def __getitem__(self, index):
        return shape.getitem(self, index)

    def sum(self, axis=None, keepdims=False):
        return reduction.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return reduction.mean(self, axis, keepdims)

    def reshape(self, *shape_):
        return shape.reshape(self, *shape_)

    def transpose(self, *axes):
        return shape.transpose(self, *axes)

    @property
    def T(self):
        return shape.transpose(self)

    def exp(self):
        return elementwise.exp(self)

    def log(self):
        return elementwise.log(self)

    def sqrt(self):
        return elementwise.sqrt(self)

    def tanh(self):
        return elementwise.tanh(self)

    def relu(self):
        return elementwise.relu(self)

    # Comparisons give plain boolean tensors (no gradient), handy for masks.
    def __eq__(self, other):
        return Tensor(self.data == _array(other))

    def __ne__(self, other):
        return Tensor(self.data != _array(other))

    def __lt__(self, other):
        return Tensor(self.data < _array(other))

    def __le__(self, other):
        return Tensor(self.data <= _array(other))

    def __gt__(self, other):
        return Tensor(self.data > _array(other))

    def __ge__(self, other):
        return Tensor(self.data >= _array(other))

    def __invert__(self):
        return Tensor(~self.data)

    __hash__ = object.__hash__


def _freed_backward(_):
    raise RuntimeError("backward: this part of the graph was already freed by an earlier "
                       "backward(); pass retain_graph=True to the first call to go through it twice")


def _topological_order(root):
    """Nodes that require grad, each after all its parents — a depth-first walk on an explicit
    stack of (node, iterator over its parents), no recursion. (A training step walks hundreds
    of nodes: this shape visits each edge once, with no second push per node.)"""
    order, visited = [], {id(root)}
    stack = [(root, iter(root.parents))]
    while stack:
        node, parents = stack[-1]
        for parent in parents:
            if parent.requires_grad and id(parent) not in visited:
                visited.add(id(parent))
                stack.append((parent, iter(parent.parents)))
                break
        else:                  # every parent is placed: the node may follow them
            stack.pop()
            order.append(node)
    return order


class Part:
    """What a backward may return for a parent it read only part of (``parent[index]``, basic
    indexing): the gradient of that part. The walk adds every part into one zero-filled gradient of
    the parent, so that several parts read out of one array cost one buffer, not one each."""

    __slots__ = ("index", "grad")

    def __init__(self, index, grad):
        self.index, self.grad = index, grad


class PartBackward:
    """The backward of ``x[index]`` with basic indexing: ``g`` is the ``Part`` ``index`` of x's
    gradient. A class, not a closure, so that an op can see that its input was read out of another
    tensor, and where (scaled dot-product attention writes the gradients of q, k and v read out of
    one tensor into one array: ``functional/attention.py``)."""

    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index

    def __call__(self, g):
        return (Part(self.index, g),)


def _leaf_grad(array):
    """A leaf's ``.grad``: a C-contiguous array that can be written. A broadcast view (from sum's
    backward: read-only, or with repeated elements) is copied; a contiguous slice of a bigger
    gradient (one weight of a packed projection) is kept as it is."""
    if array.flags.c_contiguous and getattr(array.flags, "writeable", True):
        return array
    return array.copy()


def _array(x):
    return x.data if isinstance(x, Tensor) else x


def _host_array(data, dtype):
    """Python data -> NumPy array: floats take the default dtype, ints int64, bools bool."""
    array = np.asarray(data, dtype=dtype)
    if dtype is None and array.dtype.kind == "f":
        array = array.astype(backend.get_default_dtype(), copy=False)
    elif dtype is None and array.dtype.kind in "iu":
        array = array.astype(np.int64, copy=False)
    return array


def tensor(data, requires_grad=False, dtype=None, device="cpu"):
    """Make a leaf tensor, like ``torch.tensor``: floats default to float32 (``set_default_dtype``)."""
    device = backend.check_device(device)
    if isinstance(data, Tensor):
        data = data.data
    if backend.is_array(data):
        data = data.astype(dtype or data.dtype, copy=True)
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)


def as_tensor(x, like=None):
    """Wrap arrays and Python numbers as constant tensors (on ``like``'s device)."""
    if isinstance(x, Tensor):
        return x
    if backend.is_array(x):
        return Tensor(x)
    try:
        kind = np.asarray(x).dtype.kind
    except ValueError:          # ragged lists
        kind = "O"
    if kind not in "biuf":      # None, strings: NumPy would make an object array (NaN, garbage)
        raise TypeError(f"expected a tensor, an array or numbers, got {type(x).__name__}: {x!r:.60}")
    numbers = kind != "b"  # a list of bools stays a boolean mask
    dtype = like.dtype if like is not None and like.dtype.kind == "f" and numbers else None
    data = _host_array(x, dtype)
    if like is not None and like.device != "cpu":
        data = backend.to_device(data, like.device)
    return Tensor(data)


def make_op(data, parents, backward, op):
    """The output of an op: records its parents and backward when any parent needs a gradient.

    Built without ``Tensor()``'s checks (an op's output is already an array on its device): a
    training step makes hundreds of these, and on a GPU a small model's step is host-bound."""
    out = Tensor.__new__(Tensor)
    data = np.asarray(data) if isinstance(data, np.generic) else data   # a full reduction's scalar
    if _grad_enabled and any(p.requires_grad for p in parents):
        out._set(data, True, parents, backward, op)
    else:
        out._set(data, False, (), None, "")
    return out


def check_axis(op, axis, x):
    """One axis of ``x`` (negative counts from the end), or a clear error naming ``op``."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{op}: axis {axis!r} is out of range for a tensor of shape {tuple(x.shape)}")


def check_int(op, name, value, low, high=None):
    """An int (NumPy's too) in ``[low, high)``, or a ValueError naming ``op``, ``name``, the range and
    the value. Floats and bools are refused: they pass the comparison and fail later, far from the caller."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or value < low or (high is not None and value >= high):
        expected = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{op}: {name} must be an int {expected}, got {value!r}")


def check_same_device(op, *tensors):
    """Ops never move data silently: inputs on two devices is the caller's mistake."""
    if len({type(t.data) for t in tensors if isinstance(t, Tensor)}) < 2:   # one array type: one device
        return
    devices = {t.device for t in tensors if isinstance(t, Tensor)}
    if len(devices) > 1:
        shapes = ", ".join(f"{t.device}{tuple(t.shape)}" for t in tensors if isinstance(t, Tensor))
        raise ValueError(f"{op}: all inputs must be on one device, got {shapes}; move them with .to(device)")


def unbroadcast(grad, shape):
    """Sum a broadcast gradient back down to ``shape`` (the backward of broadcasting)."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad


# Imported last: these modules import Tensor and make_op from here.
from .functional import elementwise, linear, reduction, shape  # noqa: E402
