"""What a CUDA-graph capture of a training step needs beyond plain CuPy (``minitransformer.cuda_graph``
captures; this module holds the state the kernels read while it does).

Three things differ from an eager step:
- CuPy refuses every cuBLAS call while a stream captures, but cuBLAS itself captures fine: the matrix
  products go through ``libcublas`` loaded with ``ctypes``, on a handle of our own bound to the
  capturing stream, with a fixed workspace (cuBLAS must not allocate while capturing).
- Numbers that change every step cannot be kernel arguments (a graph replays the arguments it
  captured): the dropout stream's offset and Adam's step size are read from small device arrays that
  the host sets before each replay.
- A host-to-device copy inside a capture is replayed from the same host address every time, so it
  must come from pinned memory that nothing else reuses (CuPy's own ``asarray`` stages through a
  pinned pool whose blocks later copies overwrite). ``backend.to_device`` and Adam's pointer table
  go through ``upload``, which keeps such buffers alive as long as the capture.
"""
import ctypes
import ctypes.util
import functools
import math

import numpy as np

from .. import backend

_WORKSPACE = 32 << 20


@functools.lru_cache(maxsize=None)
def _libcublas():
    """The libcublas CuPy loaded (found in this process's memory map, so the same library and no path
    guessing); ``ctypes.util.find_library`` as a fallback."""
    import cupy_backends.cuda.libs.cublas  # noqa: F401  (loads libcublas)
    path = None
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                name = line.rsplit("/", 1)[-1].strip()
                if name.startswith("libcublas.so"):
                    path = line.split(None, 5)[-1].strip()
                    break
    except OSError:
        pass
    if path is None:
        path = ctypes.util.find_library("cublas")
    if path is None:
        raise RuntimeError("CUDA graph capture: cannot find libcublas (needed to call cuBLAS while capturing)")
    return bind(ctypes.CDLL(path))


def bind(lib):
    """The cuBLAS entry points we call, given their C signatures (``ctypes`` passes them exactly)."""
    p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.cublasGemmStridedBatchedEx.argtypes = [p, i, i, i, i, i, p, p, i, i, ll, p, i, i, ll, p, p, i, i, ll, i, i, i]
    lib.cublasGemmEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
    lib.cublasSgemm_v2.argtypes = lib.cublasDgemm_v2.argtypes = [p, i, i, i, i, i, p, p, i, p, i, p, p, i]
    lib.cublasSgemv_v2.argtypes = lib.cublasDgemv_v2.argtypes = [p, i, i, i, p, p, i, p, i, p, p, i]
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(p)]
    lib.cublasSetStream_v2.argtypes = [p, p]
    lib.cublasSetWorkspace_v2.argtypes = [p, p, ctypes.c_size_t]
    lib.cublasDestroy_v2.argtypes = [p]
    return lib


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"CUDA graph capture: {what} failed with cuBLAS status {status}")


class Blas:
    """A cuBLAS handle of our own on one stream, with a fixed workspace."""

    def __init__(self, stream):
        cp = backend.cupy()
        self.lib = _libcublas()
        self.handle = ctypes.c_void_p()
        _check(self.lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self.workspace = cp.empty(_WORKSPACE, dtype=cp.uint8)
        _check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream.ptr)), "cublasSetStream")
        _check(self.lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                              ctypes.c_size_t(_WORKSPACE)), "cublasSetWorkspace")
        self._one = {np.dtype(np.float32): ctypes.c_float(1.0), np.dtype(np.float64): ctypes.c_double(1.0)}
        self._zero = {np.dtype(np.float32): ctypes.c_float(0.0), np.dtype(np.float64): ctypes.c_double(0.0)}
        # per dtype, what an eager 2-D product passes every call: made once (host time is the
        # small step's limit)
        self._gemm = {t: (self.lib.cublasSgemm_v2 if t == np.float32 else self.lib.cublasDgemm_v2,
                          ctypes.byref(self._one[t]), ctypes.byref(self._zero[t])) for t in self._one}

    def gemm_strided_batched(self, dtype, trans_a, trans_b, m, n, k, A, lda, stride_a, B, ldb, stride_b,
                             C, ldc, stride_c, batch, dtype_id, compute):
        """``cublasGemmStridedBatchedEx`` (column-major, as cuBLAS), alpha = 1, beta = 0."""
        _check(self.lib.cublasGemmStridedBatchedEx(
            self.handle, trans_a, trans_b, m, n, k, ctypes.byref(self._one[dtype]), A, dtype_id, lda, stride_a,
            B, dtype_id, ldb, stride_b, ctypes.byref(self._zero[dtype]), C, dtype_id, ldc, stride_c, batch,
            compute, -1), "cublasGemmStridedBatchedEx")

    def gemm(self, dtype, trans_a, trans_b, m, n, k, A, lda, B, ldb, C, ldc, dtype_id, compute):
        """One 2-D product through the plain GEMM routines (sgemm/dgemm; GemmEx for TF32), as CuPy's
        ``@`` uses: as fast as it at base size (6.30 vs 6.38 ms for the vocabulary projection, H200,
        benchmarks/graph_diag.py)."""
        gemm, one, zero = self._gemm[dtype]
        if dtype == np.float32 and compute != 68:       # TF32 tensor cores
            status = self.lib.cublasGemmEx(self.handle, trans_a, trans_b, m, n, k, one, A, dtype_id, lda,
                                           B, dtype_id, ldb, zero, C, dtype_id, ldc, compute, -1)
        else:
            status = gemm(self.handle, trans_a, trans_b, m, n, k, one, A, lda, B, ldb, zero, C, ldc)
        if status:
            _check(status, "gemm")

    def gemv(self, dtype, m, n, A, lda, x, y):
        """``y = A x`` for a column-major ``(m, n)`` matrix ``A`` (a bias gradient's column sums)."""
        gemv = self.lib.cublasSgemv_v2 if dtype == np.float32 else self.lib.cublasDgemv_v2
        _check(gemv(self.handle, 0, m, n, ctypes.byref(self._one[dtype]), A, lda, x, 1,
                    ctypes.byref(self._zero[dtype]), y, 1), "gemv")

    def __del__(self):
        try:
            self.lib.cublasDestroy_v2(self.handle)
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass


class Capture:
    """The state kernels read while a step is being captured on ``stream``.

    ``offset_base`` (uint64[1]) and ``adam_scalars[dtype]`` ([step_size, √(1-β2^t)]) live on the device
    and are written by the host before every replay; ``counter_start`` is the dropout stream's counter
    when the capture began (offsets handed out during the capture are relative to it).
    """

    def __init__(self, stream, blas):
        cp = backend.cupy()
        self.stream, self.blas = stream, blas
        self.offset_base = cp.zeros(1, dtype=cp.uint64)
        self.adam_scalars = {dtype: cp.zeros(2, dtype=dtype) for dtype in (np.dtype(np.float32), np.dtype(np.float64))}
        self.pinned = []            # host buffers the graph copies from at every replay
        self.counter_start = self.numbers = 0   # set by backend.set_capture

    def upload(self, host):
        """A device copy of ``host`` made inside the capture (from a pinned buffer kept alive here)."""
        cp = backend.cupy()
        host = np.ascontiguousarray(host)
        memory, pinned = pinned_empty(host.shape, host.dtype)
        pinned[...] = host
        self.pinned.append(memory)
        device = cp.empty(host.shape, dtype=host.dtype)
        if host.nbytes:
            cp.cuda.runtime.memcpyAsync(device.data.ptr, pinned.ctypes.data, host.nbytes,
                                        cp.cuda.runtime.memcpyHostToDevice, self.stream.ptr)
        return device


def pinned_empty(shape, dtype):
    """``(memory, array)``: a host array in page-locked memory (the GPU copies to or from it
    asynchronously; keep ``memory`` alive as long as a copy or a graph may use it)."""
    dtype = np.dtype(dtype)
    size = math.prod(shape)
    memory = backend.cupy().cuda.alloc_pinned_memory(max(size * dtype.itemsize, 1))
    return memory, np.frombuffer(memory, dtype=dtype, count=size).reshape(shape)


def upload_async(device, host, stream):
    """Copy a host array into ``device`` without waiting for the GPU (pageable memory is staged at once)."""
    cp = backend.cupy()
    host = np.ascontiguousarray(host, dtype=device.dtype)
    if host.shape != device.shape:
        raise ValueError(f"upload: host shape {host.shape} does not match the device buffer's {device.shape}")
    if host.nbytes:
        cp.cuda.runtime.memcpyAsync(device.data.ptr, host.ctypes.data, host.nbytes,
                                    cp.cuda.runtime.memcpyHostToDevice, stream.ptr)
