"""Ops that move elements around without arithmetic: reshape, transpose, indexing, concat,
split, contiguous, masked_fill. Each backward puts the gradient back where the element came from.
docs/backward.md#shape-ops."""
import numpy as np

from .. import backend
from ..tensor import PartBackward, Tensor, as_tensor, check_axis, check_same_device, make_op


def reshape(x, *shape):
    """Same elements, new shape; backward reshapes the gradient back."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    x = as_tensor(x)
    try:
        y = x.data.reshape(shape)
    except ValueError:
        raise ValueError(f"reshape: cannot reshape a tensor of shape {x.shape} "
                         f"({x.size} elements) into {shape}") from None
    return make_op(y, (x,), lambda g: (g.reshape(x.shape),), "reshape")


def transpose(x, *axes):
    """Permute axes (NumPy order; none given reverses them); backward applies the inverse."""
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    x = as_tensor(x)
    axes = axes or tuple(reversed(range(x.ndim)))
    n = max(x.ndim, 1)
    if sorted(a % n for a in axes) != list(range(x.ndim)):
        raise ValueError(f"transpose: axes {axes} are not a permutation of the {x.ndim} axes of {x.shape}")
    inverse = [0] * x.ndim           # plain Python: a NumPy call costs more than this on 4 axes
    for i, a in enumerate(axes):
        inverse[a % n] = i
    return make_op(x.data.transpose(axes), (x,), lambda g: (g.transpose(inverse),), "transpose")


def _plain_index(index, x):
    """Tensors inside an index become arrays on ``x``'s device."""
    def one(i):
        if isinstance(i, Tensor):
            if i.device != x.device:
                raise ValueError(f"getitem: index is on {i.device} but the tensor is on {x.device}")
            return i.data
        if isinstance(i, (list, tuple, range)):   # a sequence inside an index is an integer array
            return x.xp.asarray(list(i))
        if isinstance(i, (bool, np.bool_)):        # a boolean scalar too (a copy, not a view)
            return x.xp.asarray(bool(i))
        if backend.is_array(i) and backend.device_of(i) != x.device:
            return backend.to_device(i, x.device)
        return i
    return tuple(one(i) for i in index) if isinstance(index, tuple) else one(index)


def _is_advanced(index):
    """Whether ``x[index]`` is a copy rather than a view (``_plain_index`` has made every
    non-basic item an array): its backward scatters, a view's adds a ``Part`` in place."""
    items = index if isinstance(index, tuple) else (index,)
    return any(backend.is_array(i) for i in items)


def getitem(x, index):
    """``x[index]`` with ints, slices, ``None``, ``...`` and integer/boolean arrays.

    Backward puts ``g`` where the elements came from in zeros of ``x``'s shape; with integer
    arrays repeated positions *add up* (a scatter-add), since each use of an element contributes
    to its gradient. With basic indexing (ints, slices) the gradient is returned as a ``Part`` of
    ``x``: the parts of ``x`` read by several getitems fill one zero-filled gradient together.
    """
    x = as_tensor(x)
    index = _plain_index(index, x)
    try:
        y = x.data[index]
    except IndexError as e:
        raise IndexError(f"getitem: {e} (tensor shape {x.shape})") from None

    if not _is_advanced(index):
        return make_op(y, (x,), PartBackward(index), "getitem")

    def backward(g):
        dx = x.xp.zeros_like(x.data)
        backend.scatter_add(dx, index, g)
        return (dx,)
    return make_op(y, (x,), backward, "getitem")


def concat(tensors, axis=0):
    """Join tensors along ``axis``; backward slices the gradient back into the pieces."""
    tensors = [as_tensor(t) for t in tensors]
    if not tensors:
        raise ValueError("concat: expected at least one tensor")
    # packed parameters (W^Q, W^K, W^V in every attention layer, every step): a view, no checks to make
    joined = _packed_view(tensors) if axis == 0 else None
    ndim = tensors[0].ndim
    if ndim == 0:
        raise ValueError("concat: scalars (0-d tensors) cannot be joined; reshape them to (1,) first")
    check_axis("concat", axis, tensors[0])
    axis = axis % ndim
    if joined is None:
        check_same_device("concat", *tensors)
        rest = tensors[0].shape[:axis] + tensors[0].shape[axis + 1:]
        for t in tensors:
            if t.ndim != ndim or t.shape[:axis] + t.shape[axis + 1:] != rest:
                raise ValueError(f"concat: all shapes must match except along axis {axis}, "
                                 f"got {[tuple(t.shape) for t in tensors]}")
        joined = tensors[0].xp.concatenate([t.data for t in tensors], axis=axis)
    bounds = [0]
    for t in tensors:
        bounds.append(bounds[-1] + t.shape[axis])

    def backward(g):
        return tuple(g[(slice(None),) * axis + (slice(lo, hi),)] if t.requires_grad else None
                     for t, lo, hi in zip(tensors, bounds[:-1], bounds[1:]))
    return make_op(joined, tuple(tensors), backward, "concat")


def _packed_view(tensors):
    """Parameters that lie one after another in one buffer (``nn.module.pack``: W^Q, W^K, W^V)
    joined along axis 0 without a copy, as a view of that buffer; None for anything else (other
    arrays, a gap or another order, shapes that differ after axis 0)."""
    first = getattr(tensors[0], "packed", None)
    if first is None:
        return None
    buffer, start = first
    end, rest = start, tensors[0].shape[1:]
    for t in tensors:
        packed = getattr(t, "packed", None)
        data = t.data
        if packed is None or packed[0] is not buffer or packed[1] != end or data.base is not buffer \
                or data.shape[1:] != rest or not data.flags.c_contiguous:
            return None
        end += data.size
    return buffer[start:end].reshape(-1, *rest)


def contiguous(x):
    """The same values laid out C-contiguously (a copy only when ``x`` is a strided view), as
    ``torch.Tensor.contiguous``; backward passes the gradient through. One copy can save several:
    products that read a strided view each copy it."""
    x = as_tensor(x)
    return make_op(x.xp.ascontiguousarray(x.data), (x,), lambda g: (g,), "contiguous")


def split(x, split_size_or_sections, axis=0):
    """Split along ``axis`` like ``torch.split``: an int is the size of each chunk (the last
    may be smaller), a list gives every chunk's size. Each chunk is a slice, so its backward
    is ``getitem``'s."""
    x = as_tensor(x)
    check_axis("split", axis, x)
    length = x.shape[axis]
    if isinstance(split_size_or_sections, int):
        if split_size_or_sections <= 0:
            raise ValueError(f"split: chunk size must be positive, got {split_size_or_sections}")
        sizes = [min(split_size_or_sections, length - i) for i in range(0, length, split_size_or_sections)]
    else:
        sizes = list(split_size_or_sections)
        if sum(sizes) != length:
            raise ValueError(f"split: sizes {sizes} add up to {sum(sizes)}, expected axis {axis} "
                             f"length {length} of shape {x.shape}")
    chunks, start = [], 0
    prefix = (slice(None),) * (axis % x.ndim)
    for size in sizes:
        chunks.append(getitem(x, prefix + (slice(start, start + size),)))
        start += size
    return chunks


def masked_fill(x, mask, value):
    """Where ``mask`` is True put ``value``; backward: ``dx = g * ~mask`` (filled places get none)."""
    x = as_tensor(x)
    mask = as_tensor(mask, x)
    check_same_device("masked_fill", x, mask)
    if mask.dtype.kind != "b":
        raise TypeError(f"masked_fill: mask must be boolean, got {mask.dtype}")
    try:
        if x.xp.broadcast_shapes(mask.shape, x.shape) != x.shape:
            raise ValueError
    except ValueError:
        raise ValueError(f"masked_fill: mask of shape {mask.shape} is not broadcastable to {x.shape}") from None
    keep = ~mask.data
    y = x.xp.where(mask.data, x.xp.asarray(value, dtype=x.dtype), x.data)
    return make_op(y, (x,), lambda g: (g * keep,), "masked_fill")
