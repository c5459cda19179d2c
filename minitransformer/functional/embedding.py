"""Embedding lookup (§3.4): row ``ids[i]`` of the weight matrix.

Backward is a scatter-add: every use of a row adds its gradient there, so repeated ids add
up. docs/backward.md#embedding.
"""
import numpy as np

from .. import backend, kernels
from ..tensor import Tensor, as_tensor, make_op


def check_ids(op, ids, num_classes, what="id"):
    """Validate an integer id array on the host side of a call, where the user made it."""
    xp = backend.get_array_module(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{op}: {what}s must be integers, got dtype {ids.dtype}")
    # A CUDA-graph capture cannot read the GPU: cuda_graph.CudaGraphStep checks each batch on the host.
    if ids.size and not (backend.capturing() and xp is not np):
        if xp is np:
            low, high = int(ids.min()), int(ids.max())
        else:   # one wait for the GPU, not two
            low, high = (int(v) for v in backend.to_numpy(xp.stack([ids.min(), ids.max()])))
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise IndexError(f"{op}: {what} {bad} is out of range [0, {num_classes})")
    return xp


def id_array(op, ids, like, what="ids"):
    """The array behind ``ids``: a Tensor must be on ``like``'s device; lists and host arrays are
    accepted as they are (they are checked on the host and copied over by the caller)."""
    if isinstance(ids, Tensor):
        if ids.device != like.device:
            raise ValueError(f"{op}: {what} are on {ids.device} but the {like.shape} input is on {like.device}")
        return ids.data
    return ids if backend.is_array(ids) else np.asarray(ids)


def embedding(ids, weight):
    """``y[..., :] = W[ids[...], :]``; backward: ``dW[v] = Σ_{i: ids[i] = v} g[i]``.

    ``ids`` may be a host array or list even when ``W`` is on the GPU: it is checked where it
    was made and copied over (ids carry no gradient).
    """
    weight = as_tensor(weight)
    ids = id_array("embedding", ids, weight)
    if weight.ndim != 2:
        raise ValueError(f"embedding: weight must be 2-D (num_embeddings, d), got {weight.shape}")
    check_ids("embedding", ids, weight.shape[0])
    given = ids                     # host ids stay available: the GPU backward sorts them there
    ids = backend.to_device(ids, weight.device)
    d = weight.shape[1]

    def backward(g):
        if backend.fused(g):
            return (kernels.embedding_backward(given, g, weight.shape[0]),)
        dW = weight.xp.zeros_like(weight.data)
        backend.scatter_add(dW, ids.reshape(-1), g.reshape(-1, d))
        return (dW,)
    return make_op(weight.data[ids], (weight,), backward, "embedding")
