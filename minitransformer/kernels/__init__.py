"""Fused CUDA kernels for the hot ops, reached only through ``functional/`` (and ``optim.Adam`` and
beam search's candidates) when the arrays live on the GPU; ``backend.fused`` decides,
``MINITRANSFORMER_FUSED=0`` turns them off.

Why: an op written with array expressions launches one GPU kernel per expression and writes every
temporary to memory (softmax alone is max, subtract, exp, sum, divide). On a small model the step is
then bound by launch overhead, on a large one by memory traffic. Each kernel here does its op in one
or two passes and computes the *same formula* as the array version next to it in ``functional/``;
``tests/test_kernels.py`` checks every one against its array twin on the GPU.

Every function takes and returns CuPy arrays; ``minitransformer.kernels._source`` holds the CUDA C++.
"""
import collections
import functools
import math
import os

import numpy as np

from .. import backend
from ._source import KERNELS, NAMES, PRELUDE

_THREADS = 256


@functools.lru_cache(maxsize=None)
def _module():
    cp = backend.cupy()
    names = [f"{n}<{t}>" for n in NAMES for t in ("float", "double")]
    return cp.RawModule(code=PRELUDE + KERNELS, options=("--std=c++14", "--fmad=false"), name_expressions=names)


@functools.lru_cache(maxsize=None)
def _kernel(name, dtype):
    """The compiled kernel for a dtype (looked up once: ``get_function`` costs ~8 µs a call, and a
    small model's step makes hundreds of them)."""
    return _module().get_function(f"{name}<{'float' if dtype == np.float32 else 'double'}>")


def _block(n):
    """Threads for one row of ``n`` elements: a power of two in [32, 1024]."""
    return int(min(1024, max(32, 1 << max(0, math.ceil(math.log2(max(n, 1)))))))


def _grid(n, threads=_THREADS):
    return int(max(1, min((n + threads - 1) // threads, 65536)))


def _contiguous(a):
    return backend.cupy().ascontiguousarray(a)


# ---- softmax (§3.2.1 attention weights) ---------------------------------------------------------

def masked_softmax(scores, mask, scale):
    """``P = softmax(where(mask, scores * scale, -inf))`` over the last axis; rows with no key
    left are 0. ``mask`` (bool, True = may attend) broadcasts to ``scores`` (≤ 4 axes) or is None."""
    return _masked_softmax(scores, mask, scale, 0.0, 0, 0)[0]


def masked_softmax_dropout(scores, mask, scale, p, seed, offset):
    """``(P, P * m)``: ``masked_softmax`` and, in the same launch, dropout on its output with the
    mask ``dropout_apply(P, p, seed, offset)`` would use (attention's weights, §5.4)."""
    return _masked_softmax(scores, mask, scale, p, seed, offset)


def _masked_softmax(scores, mask, scale, p, seed, offset):
    cp = backend.cupy()
    scores = _contiguous(scores)
    shape = scores.shape
    *lead, Lq, Lk = (1,) * (4 - len(shape)) + shape
    d0, d1 = lead
    P = cp.empty_like(scores)
    P_tilde = cp.empty_like(scores) if p > 0 else None
    rows = d0 * d1 * Lq
    if rows == 0 or Lk == 0:
        return P, P_tilde
    if mask is not None:
        view = cp.broadcast_to(mask, shape).view(cp.uint8).reshape((1,) * (4 - len(shape)) + shape)
        strides = [s // view.itemsize for s in view.strides]
        mask_arg, has_mask = view, 1
    else:
        strides, mask_arg, has_mask = [0, 0, 0, 0], cp.empty(1, dtype=cp.uint8), 0
    T = scores.dtype.type
    _kernel("masked_softmax_fwd", scores.dtype)(
        (rows,), (_block(Lk),),
        (scores, mask_arg, np.int32(has_mask), *(np.int64(s) for s in strides),
         np.int32(d1), np.int32(Lq), np.int32(Lk), T(scale), P,
         *_dropout_arguments(p, seed, offset, T), P_tilde if P_tilde is not None else P))
    return P, P_tilde


def _dropout_arguments(p, seed, offset, T):
    """Every dropping kernel's five arguments ``(key, offset, base, p, 1 / (1 - p))``: number
    ``offset + i`` of stream ``seed`` decides element ``i`` (none is drawn when ``p == 0``)."""
    if p <= 0:
        return np.uint64(0), np.uint64(0), np.uint64(0), np.float32(0), T(1)
    return (np.uint64(_stream_key(seed)), np.uint64(offset), _dropout_base(), np.float32(p),
            T(1.0 / (1.0 - p)))


def _by_rows(name, *arrays, scalars=()):
    """A one-block-per-row kernel over the last axis: ``name(*arrays, L, *scalars, out)`` with
    ``out`` shaped like ``arrays[0]``."""
    arrays = [_contiguous(a) for a in arrays]
    L = arrays[0].shape[-1]
    out = backend.cupy().empty_like(arrays[0])
    rows = arrays[0].size // max(L, 1)
    if rows and L:
        _kernel(name, arrays[0].dtype)((rows,), (_block(L),), (*arrays, np.int32(L), *scalars, out))
    return out


def softmax_backward(P, dP, scale=1.0, p=0.0, seed=0, offset=0):
    """``dS = P * (dP - Σ_k dP * P) * scale`` over the last axis; with ``p > 0``, ``dP`` is first
    multiplied by the dropout mask ``dropout_apply(·, p, seed, offset)`` uses (the forward's, drawn again)."""
    T = P.dtype.type
    return _by_rows("softmax_bwd", P, dP, scalars=(T(scale), *_dropout_arguments(p, seed, offset, T)))


def log_softmax(x):
    """``y = x - max x - log Σ exp(x - max x)`` over the last axis, one block per row."""
    return _by_rows("log_softmax_fwd", x)


def log_softmax_backward(y, g):
    """``dx = g - exp(y) * Σ g`` over the last axis."""
    return _by_rows("log_softmax_bwd", y, g)


# ---- dropout (§5.4) ------------------------------------------------------------------------------

def _stream_key(seed):
    """A 64-bit key per seed (SplitMix64 of the seed), so that nearby seeds give unrelated streams."""
    z = (int(seed) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _dropout_base():
    """The pointer a dropout kernel adds to its offset: the replay's start offset while a CUDA graph
    is captured, else null (the offset is absolute)."""
    capture = backend.capturing()
    return np.uint64(capture.offset_base.data.ptr if capture is not None else 0)


def dropout_apply(x, p, seed, offset):
    """``x * m`` with ``m = [u ≥ p] / (1 - p)``, ``u`` number ``offset + i`` of stream ``seed``: the
    same call with the same ``(seed, offset)`` gives the same mask (forward and backward)."""
    cp = backend.cupy()
    x = _contiguous(x)
    y = cp.empty_like(x)
    if x.size:
        _kernel("dropout_apply", x.dtype)(
            (_grid(x.size),), (_THREADS,),
            (x, y, np.int64(x.size), *_dropout_arguments(p, seed, offset, x.dtype.type)))
    return y


def dropout_mask(shape, dtype, p, seed, offset):
    """The mask ``dropout_apply`` multiplies by (for tests and for learners who want to see it)."""
    return dropout_apply(backend.cupy().ones(shape, dtype=dtype), p, seed, offset)


# ---- LayerNorm (§3.1) ------------------------------------------------------------------------------

def _normalize_outputs(x):
    """``(rows, y, mean, rstd)`` for a LayerNorm over the last axis of ``x``: empty arrays to write."""
    cp = backend.cupy()
    rows = x.size // max(x.shape[-1], 1)
    return rows, cp.empty_like(x), cp.empty(rows, dtype=x.dtype), cp.empty(rows, dtype=x.dtype)


def _optional(array, dtype):
    """An optional array as a kernel argument: itself, or a one-element stand-in when absent."""
    return array if array is not None else backend.cupy().empty(1, dtype=dtype)


def _affine(weight, bias, dtype):
    """γ and β as kernel arguments: the arrays (stand-ins for absent ones), then two flags."""
    return (_optional(weight, dtype), _optional(bias, dtype), np.int32(weight is not None),
            np.int32(bias is not None))


def layer_norm(x, weight, bias, eps):
    """Returns ``(y, mean, rstd)``; ``mean``/``rstd`` (one per row) are what the backward needs."""
    x = _contiguous(x)
    d = x.shape[-1]
    rows, y, mean, rstd = _normalize_outputs(x)
    if rows and d:
        _kernel("layer_norm_fwd", x.dtype)(
            (rows,), (_block(min(d, 256)),),
            (x, *_affine(weight, bias, x.dtype), np.int32(d), x.dtype.type(eps), y, mean, rstd))
    return y, mean, rstd


def layer_norm_backward(x, g, weight, mean, rstd, need_weight_grads=True):
    """Returns ``(dx, dw, db)``; ``dw``/``db`` are column sums over all rows (None if not needed)."""
    cp = backend.cupy()
    x, g = _contiguous(x), _contiguous(g)
    d = x.shape[-1]
    rows = x.size // max(d, 1)
    dx = cp.empty_like(x)
    if rows == 0 or d == 0:
        zeros = cp.zeros(d, dtype=x.dtype)
        return dx, zeros, zeros.copy()
    _kernel("layer_norm_bwd_dx", x.dtype)(
        (rows,), (_block(min(d, 256)),),
        (x, g, _optional(weight, x.dtype), np.int32(weight is not None),
         mean, rstd, np.int32(d), dx))
    if not need_weight_grads:
        return dx, None, None
    return (dx, *_layer_norm_weight_grads(x, g, mean, rstd))


def _layer_norm_weight_grads(x, g, mean, rstd):
    """``(dw, db)``: column sums of ``g * x̂`` and ``g``, by chunks of rows, then one sum over the
    chunks for both (two rows of one array)."""
    cp = backend.cupy()
    d = x.shape[-1]
    rows = x.size // d
    rows_per_chunk = 32
    chunks = (rows + rows_per_chunk - 1) // rows_per_chunk
    part = cp.empty((chunks, 2, d), dtype=x.dtype)
    _kernel("layer_norm_bwd_dwdb", x.dtype)(
        (chunks, (d + 127) // 128), (128,),
        (x, g, mean, rstd, np.int64(rows), np.int32(d), np.int32(rows_per_chunk), part))
    dw_db = part.sum(axis=0)
    return dw_db[0], dw_db[1]


def add_and_norm(x, s, weight, bias, eps, p, seed, offset):
    """``LayerNorm(x + s * m)`` with ``m`` the dropout mask ``dropout_apply(·, p, seed, offset)`` would
    use on ``s`` (none when ``p == 0``). Returns ``(y, z, mean, rstd)``, ``z = x + s * m``."""
    x, s = _contiguous(x), _contiguous(s)
    d = x.shape[-1]
    rows, y, mean, rstd = _normalize_outputs(x)
    z = backend.cupy().empty_like(x)
    if rows and d:
        _kernel("add_norm_fwd", x.dtype)(
            (rows,), (_block(min(d, 256)),),
            (x, s, *_affine(weight, bias, x.dtype), np.int32(d), x.dtype.type(eps),
             *_dropout_arguments(p, seed, offset, x.dtype.type), z, y, mean, rstd))
    return y, z, mean, rstd


def add_and_norm_backward(z, g, weight, mean, rstd, p, seed, offset, need_weight_grads=True):
    """``(dz, ds, dw, db)`` for ``add_and_norm``: ``dz`` is LayerNorm's input gradient (the residual's),
    ``ds = dz * m`` (``dz`` itself when ``p == 0``); ``dw``/``db`` None unless needed."""
    cp = backend.cupy()
    g = _contiguous(g)
    d = z.shape[-1]
    rows = z.size // max(d, 1)
    dz = cp.empty_like(z)
    ds = cp.empty_like(z) if p > 0 else dz
    if rows == 0 or d == 0:
        zeros = cp.zeros(d, dtype=z.dtype)
        return dz, ds, zeros, zeros.copy()
    _kernel("add_norm_bwd", z.dtype)(
        (rows,), (_block(min(d, 256)),),
        (z, g, _optional(weight, z.dtype), np.int32(weight is not None),
         mean, rstd, np.int32(d), *_dropout_arguments(p, seed, offset, z.dtype.type), dz, ds))
    if not need_weight_grads:
        return dz, ds, None, None
    return (dz, ds, *_layer_norm_weight_grads(z, g, mean, rstd))


# ---- label-smoothed cross-entropy (§5.4) ---------------------------------------------------------------

def cross_entropy(logits, target, label_smoothing):
    """Per-row loss ``(1 - ε)(lse - x_t) + ε(lse - mean x)`` and ``lse = log Σ exp x`` (for backward)."""
    cp = backend.cupy()
    logits = _contiguous(logits)
    N, C = logits.shape
    target = _contiguous(target.astype(cp.int64, copy=False))
    loss_row = cp.empty(N, dtype=logits.dtype)
    lse = cp.empty(N, dtype=logits.dtype)
    if N:
        _kernel("cross_entropy_fwd", logits.dtype)(
            (N,), (_block(min(C, 1024)),),
            (logits, target, np.int32(C), logits.dtype.type(label_smoothing), loss_row, lse))
    return loss_row, lse


def cross_entropy_backward(logits, target, lse, row_scale, label_smoothing):
    """``dlogits = (softmax(logits) - ε/C - (1 - ε) onehot(t)) * row_scale[:, None]``."""
    cp = backend.cupy()
    logits = _contiguous(logits)
    N, C = logits.shape
    target = _contiguous(target.astype(cp.int64, copy=False))
    dlogits = cp.empty_like(logits)
    if N:
        _kernel("cross_entropy_bwd", logits.dtype)(
            (N,), (_block(min(C, 1024)),),
            (logits, target, lse, _contiguous(row_scale.astype(logits.dtype, copy=False)), np.int32(C),
             logits.dtype.type(label_smoothing), dlogits))
    return dlogits


# ---- batched matrix products with transposed operands (attention, §3.2.1) ---------------------------

_GEMM = {np.dtype(np.float32): (0, 68, 77), np.dtype(np.float64): (1, 70, 70)}   # CUDA_R_*, compute, TF32 compute


def _operand(a):
    """``(array, transposed)``: a C-contiguous array, or the C-contiguous array whose last two axes
    ``a`` swaps (a transposed view, which cuBLAS reads in place instead of CuPy copying it)."""
    if a.flags.c_contiguous:
        return a, False
    swapped = a.swapaxes(-1, -2)
    if swapped.flags.c_contiguous:
        return swapped, True
    return _contiguous(a), False


# Eager 2-D products and bias GEMVs: CuPy's ``@`` (the default), or, with ``OWN_HANDLE = True``
# (``MINITRANSFORMER_OWN_HANDLE=1``), the cuBLAS handle of our own that a captured step uses
# (``capture.Blas``: a fixed workspace, bound to the stream once). A switch for an A/B on the GPU
# (``benchmarks/train_step.py --own-handle``): on the host-bound small step ``@`` cost ~50 µs of host
# time a call (cProfile, H200), but an earlier direct sgemm on CuPy's handle (setStream and
# setPointerMode every call) made the step slower, for a reason not yet known.
OWN_HANDLE = os.environ.get("MINITRANSFORMER_OWN_HANDLE", "0") == "1"
_own_blas = collections.OrderedDict()     # stream address -> Blas, the last few streams used
_OWN_BLAS_KEPT = 4                        # each holds a handle and a 32 MiB workspace


def _eager_blas():
    """Our own cuBLAS handle on the current stream (None unless ``OWN_HANDLE``). Handles of streams
    not used lately are let go (every captured step or search has a stream of its own)."""
    if not OWN_HANDLE:
        return None
    stream = backend.cupy().cuda.get_current_stream()
    if _own_blas and next(reversed(_own_blas)) == stream.ptr:      # the stream of the last call
        return _own_blas[stream.ptr]
    from .capture import Blas
    blas = _own_blas.get(stream.ptr)
    if blas is None:
        blas = _own_blas[stream.ptr] = Blas(stream)
        while len(_own_blas) > _OWN_BLAS_KEPT:
            _own_blas.popitem(last=False)
    _own_blas.move_to_end(stream.ptr)
    return blas


def batched_matmul(a, b, out=None):
    """``a @ b`` for ``(…, m, k) @ (…, k, n)`` with the same batch axes (or none), either operand
    possibly a transposed view (``x.swapaxes(-1, -2)``): one cuBLAS strided-batched GEMM, no copy.
    Anything else (broadcast batch axes, other dtypes) goes to ``a @ b``. While a CUDA graph is being
    captured the GEMM goes through our own cuBLAS handle (``kernels.capture``). ``out``: a
    C-contiguous array of the product's shape and dtype to write it into (a part of a bigger one)."""
    cp = backend.cupy()
    capture = backend.capturing()
    blas = capture.blas if capture is not None else _eager_blas() if a.ndim == 2 else None
    if (a.ndim < 2 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2] or a.dtype != b.dtype
            or a.dtype not in _GEMM or a.shape[-1] != b.shape[-2] or 0 in a.shape or 0 in b.shape
            or (a.ndim == 2 and blas is None)
            or (out is not None and (out.dtype != a.dtype or not out.flags.c_contiguous))):
        return a @ b if out is None else cp.matmul(a, b, out=out)
    *lead, m, k = a.shape
    n = b.shape[-1]
    batch = math.prod(lead)
    A, a_t = _operand(a)
    B, b_t = _operand(b)
    if out is None:
        C = cp.empty((*lead, m, n), dtype=a.dtype)
    elif out.shape != (*lead, m, n):
        raise ValueError(f"batched_matmul: out has shape {out.shape}, the product {(*lead, m, n)}")
    else:
        C = out
    # Row-major C = A B is column-major Cᵀ = Bᵀ Aᵀ: B's memory goes first.
    dtype_id, compute, compute_tf32 = _GEMM[a.dtype]
    if compute_tf32 != compute and backend.tf32_enabled():       # float32 only
        compute = compute_tf32
    args = (1 if b_t else 0, 1 if a_t else 0, n, m, k)
    if a.ndim == 2:
        blas.gemm(a.dtype, *args, B.data.ptr, k if b_t else n, A.data.ptr, m if a_t else k,
                  C.data.ptr, n, dtype_id, compute)
        return C
    if capture is not None:
        capture.blas.gemm_strided_batched(a.dtype, *args, B.data.ptr, k if b_t else n, k * n,
                                          A.data.ptr, m if a_t else k, m * k, C.data.ptr, n, m * n,
                                          batch, dtype_id, compute)
        return C
    from cupy_backends.cuda.libs import cublas
    one, zero = _HOST_SCALAR_PTRS[a.dtype]
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setPointerMode(handle, 0)            # CUBLAS_POINTER_MODE_HOST: alpha and beta below
    cublas.gemmStridedBatchedEx(
        handle, *args, one, B.data.ptr, dtype_id, k if b_t else n, k * n,
        A.data.ptr, dtype_id, m if a_t else k, m * k,
        zero, C.data.ptr, dtype_id, n, m * n, batch, compute, -1)
    return C


# α = 1 and β = 0 of the eager strided-batched GEMMs, in host memory that lives as long as the module
# (made once: two arrays and their addresses cost ~4.5 µs of host time a call, 54 calls a small step)
_HOST_SCALARS = {np.dtype(t): (np.ones(1, dtype=t), np.zeros(1, dtype=t)) for t in (np.float32, np.float64)}
_HOST_SCALAR_PTRS = {t: (one.ctypes.data, zero.ctypes.data) for t, (one, zero) in _HOST_SCALARS.items()}


def matmul(a, b):
    """``a @ b``, except while a CUDA graph is being captured, when CuPy may not call cuBLAS (or
    with ``OWN_HANDLE``): then the same product through ``batched_matmul``'s own handle."""
    if backend.capturing() is None and not (OWN_HANDLE and backend.fused(a, b)):
        return a @ b
    return batched_matmul(a, b)


# ---- ReLU (§3.3) and the bias gradient of a linear layer -------------------------------------------

def relu(x):
    """``y = max(0, x)`` in one pass (the array version also builds a boolean mask)."""
    cp = backend.cupy()
    x = _contiguous(x)
    y = cp.empty_like(x)
    if x.size:
        _kernel("relu_fwd", x.dtype)((_grid(x.size),), (_THREADS,), (x, y, np.int64(x.size)))
    return y


def bias_relu(y, b):
    """``y = max(0, y + b)`` in place (``y`` a fresh, C-contiguous ``(n, d)`` product, ``b`` ``(d,)``):
    a linear layer's bias and the ReLU after it in one launch instead of two."""
    if y.size:
        _kernel("bias_relu_fwd", y.dtype)((_grid(y.size),), (_THREADS,),
                                          (y, _contiguous(b), np.int64(y.size), np.int32(y.shape[-1])))
    return y


def relu_backward(y, g):
    """``dx = g * [y > 0]``."""
    cp = backend.cupy()
    y, g = _contiguous(y), _contiguous(g)
    dx = cp.empty_like(g)
    if g.size:
        _kernel("relu_bwd", g.dtype)((_grid(g.size),), (_THREADS,), (y, g, dx, np.int64(g.size)))
    return dx


@functools.lru_cache(maxsize=32)
def _ones(n, dtype):
    return backend.cupy().ones(n, dtype=dtype)


def column_sum(g):
    """``Σ_rows g`` of a 2-D array as the product ``1ᵀ g`` (cuBLAS GEMV): 2–8× faster on the GPU than
    CuPy's column reduction (measured on an H200, 8192 rows: 0.022 vs 0.088 ms for 512 columns,
    0.024 vs 0.191 ms for 2048, 0.31 vs 0.63 ms for 37000; benchmarks/profile_step.py --matmul)."""
    ones = _ones(g.shape[0], g.dtype.str)
    capture = backend.capturing()
    blas = capture.blas if capture is not None else _eager_blas()
    if blas is None or g.dtype not in _GEMM:
        return ones @ g
    g = _contiguous(g)
    n, d = g.shape
    out = backend.cupy().empty(d, dtype=g.dtype)
    if n and d:     # row-major g (n, d) is column-major (d, n): out = g_colmajor @ ones
        blas.gemv(g.dtype, d, n, g.data.ptr, d, ones.data.ptr, out.data.ptr)
    else:
        out.fill(0)
    return out


# ---- embedding (§3.4) -----------------------------------------------------------------------------------

def embedding_backward(ids, g, num_embeddings):
    """``dW[v] = Σ_{i: ids[i] = v} g[i]``, summed in order of position (deterministic, no atomics).

    ``ids`` may be a host array (the usual case: batches are made on the host), whose sort order is
    then found on the host; device ids (every id inside a captured CUDA graph) are sorted on the
    device by ``cupy.argsort``, which is stable and captures (0.15 ms for base's 8192 ids, H200)."""
    cp = backend.cupy()
    g = _contiguous(g)
    d = g.shape[-1]
    flat = ids.reshape(-1)
    dW = cp.zeros((num_embeddings, d), dtype=g.dtype)
    if not (flat.size and d):
        return dW
    if backend.device_of(flat) == "cuda":
        flat = flat.astype(cp.int64, copy=False)
        order = cp.argsort(flat)
        sorted_ids = flat[order]
    else:
        order = np.argsort(flat, kind="stable")
        both = cp.asarray(np.stack([flat[order], order]).astype(np.int64, copy=False))   # one upload, not two
        sorted_ids, order = both[0], both[1]
    _kernel("embedding_bwd", g.dtype)((int(flat.size), (d + 127) // 128), (128,),
                                      (sorted_ids, order, g, np.int64(flat.size), np.int32(d), dW))
    return dW


# ---- Adam over every parameter in one launch (§5.3) ------------------------------------------------------

_CHUNK = 65536


@functools.lru_cache(maxsize=64)
def _chunk_table(sizes):
    """Which tensor and where in it each block works: the same for every step of a model."""
    cp = backend.cupy()
    tensor, start = [], []
    for i, n in enumerate(sizes):
        for s in range(0, n, _CHUNK):
            tensor.append(i)
            start.append(s)
    return (cp.asarray(np.asarray(sizes, dtype=np.int64)), cp.asarray(np.asarray(tensor, dtype=np.int32)),
            cp.asarray(np.asarray(start, dtype=np.int64)), len(tensor))


def adam_step(params, grads, ms, vs, beta1, beta2, step_size, sqrt_correction2, eps):
    """One Adam update of every (p, g, m, v) quadruple (same dtype, contiguous, on the GPU), in place.

    The device pointers go over as one small table per step (an asynchronous copy): no host sync.
    In a captured CUDA graph the table comes from pinned memory and ``step_size`` and
    ``sqrt_correction2`` from the device (``Capture.adam_scalars``, set before each replay).
    """
    cp = backend.cupy()
    if not params:
        return
    dtype = params[0].dtype
    T = dtype.type
    # CuPy's pointers read directly (hundreds a step); backend.address elsewhere (the CPU emulator's arrays)
    address = (lambda a: a.data.ptr) if backend.device_of(params[0]) == "cuda" else backend.address
    ptrs = np.array([[address(a) for a in quad] for quad in zip(params, grads, ms, vs)],
                    dtype=np.uint64).reshape(-1)
    sizes, chunk_tensor, chunk_start, blocks = _chunk_table(tuple(int(p.size) for p in params))
    capture = backend.capturing()
    table = capture.upload(ptrs) if capture is not None else cp.asarray(ptrs)
    scalars = np.uint64(capture.adam_scalars[np.dtype(dtype)].data.ptr if capture is not None else 0)
    _kernel("adam_step", dtype)(
        (blocks,), (512,),
        (table, sizes, chunk_tensor, chunk_start, np.int32(_CHUNK), T(beta1), T(beta2),
         T(1 - beta1), T(1 - beta2), T(step_size), T(sqrt_correction2), T(eps), scalars))


# ---- beam search's best candidates (§6.1) -----------------------------------------------------------------

TOPK_MAX = 32          # the most candidates a sentence keeps (the kernels' per-thread lists)
_TOPK_CHUNK = 4096     # candidates a block of pass 1 reads: many blocks per sentence keep loads in flight


def beam_top_k(scores, logp, n):
    """Of ``c[b, k·V + v] = scores[b, k] + logp[b·K + k, v]`` (float64; ``scores (B, K)`` float64,
    ``logp (B·K, V)``) the ``n`` best per sentence: ``(indices (B, n), values (B, n))``, best first,
    ties to the lower index — ``backend.top_k`` and ``take_along_axis`` on the formed ``c``, without
    forming it (``tests/test_kernels.py``). ``1 <= n <= min(TOPK_MAX, K·V)``."""
    cp = backend.cupy()
    B, K = scores.shape
    V = logp.shape[1]
    if not 1 <= n <= min(TOPK_MAX, K * V) or logp.shape[0] != B * K or scores.dtype != np.float64:
        raise ValueError(f"beam_top_k: need float64 scores (B, K), logp (B*K, V) and 1 <= n <= {TOPK_MAX}, "
                         f"got scores {scores.shape} {scores.dtype}, logp {logp.shape}, n {n}")
    scores, logp = _contiguous(scores), _contiguous(logp)
    parts = -(-(K * V) // _TOPK_CHUNK)
    part_val = cp.empty((B, parts, n), dtype=np.float64)
    part_idx = cp.empty((B, parts, n), dtype=np.int64)
    top_val = cp.empty((B, n), dtype=np.float64)
    top_idx = cp.empty((B, n), dtype=np.int64)
    if B == 0:
        return top_idx, top_val
    _kernel("beam_topk_partial", logp.dtype)(
        (parts, B), (_THREADS,), (scores, logp, np.int64(K), np.int64(V), np.int32(n), np.int64(_TOPK_CHUNK),
                                  part_val, part_idx))
    _kernel("beam_topk_final", logp.dtype)(
        (B,), (_block(min(parts * n, _THREADS)),), (part_val, part_idx, np.int32(parts), np.int32(n), top_val, top_idx))
    return top_idx, top_val
