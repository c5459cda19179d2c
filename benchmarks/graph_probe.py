"""What CUDA-graph capture allows with CuPy on this GPU: each probe prints OK or the error.

    python benchmarks/graph_probe.py

Checks the pieces a captured training step needs: a private memory pool (warm and cold), CuPy
kernels and reductions, cuBLAS through ctypes with its own handle, host-to-device copies (pageable
and pinned) inside a capture, and whether a pageable copy outside a capture blocks the host.
"""
import ctypes
import time
import traceback

import numpy as np
import cupy as cp


def probe(name):
    def wrap(fn):
        stream = cp.cuda.Stream(non_blocking=True)
        try:
            out = fn(stream)
            print(f"OK   {name}: {out if out is not None else ''}")
        except Exception as e:  # noqa: BLE001
            try:
                if stream.is_capturing():
                    stream.end_capture()
            except Exception:  # noqa: BLE001
                pass
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc(limit=3)
        cp.cuda.Device().synchronize()
        return fn
    return wrap


def work(x, y, k):
    z = x * 2 + y                       # elementwise
    s = z.sum(axis=0)                   # reduction
    m = (x > 0).astype(cp.float32)      # compare + cast
    t = cp.tril(cp.ones((8, 8), dtype=bool))
    return s + m.sum() + t.sum() + k[0]


def setup():
    x = cp.random.standard_normal((512, 64), dtype=cp.float32)
    y = cp.random.standard_normal((512, 64), dtype=cp.float32)
    k = cp.ones(1, dtype=cp.float32)
    return x, y, k


@probe("private pool, warmed, capture + 3 launches")
def _(stream):
    pool = cp.cuda.MemoryPool()
    x, y, k = setup()
    with cp.cuda.using_allocator(pool.malloc), stream:
        ref = work(x, y, k)
        stream.synchronize()
        stream.begin_capture()
        out = work(x, y, k)
        g = stream.end_capture()
        for _ in range(3):
            g.launch(stream)
        stream.synchronize()
    return f"max err {float(abs(out - ref).max()):.2e}, pool {pool.total_bytes()} B"


@probe("private pool, cold (cudaMalloc in relaxed capture)")
def _(stream):
    pool = cp.cuda.MemoryPool()
    x, y, k = setup()
    with cp.cuda.using_allocator(pool.malloc), stream:
        stream.begin_capture()
        out = work(x, y, k)
        g = stream.end_capture()
        g.launch(stream)
        stream.synchronize()
        ref = work(x, y, k)
    return f"max err {float(abs(out - ref).max()):.2e}"


@probe("default pool, warmed")
def _(stream):
    x, y, k = setup()
    with stream:
        ref = work(x, y, k)
        stream.synchronize()
        stream.begin_capture()
        out = work(x, y, k)
        g = stream.end_capture()
        g.launch(stream)
        stream.synchronize()
    return f"max err {float(abs(out - ref).max()):.2e}"


def cublas_lib():
    import cupy_backends.cuda.libs.cublas  # noqa: F401  (loads libcublas)
    for line in open("/proc/self/maps"):
        if "libcublas.so" in line and "Lt" not in line.split("/")[-1]:
            return line.split()[-1]
    raise RuntimeError("libcublas not loaded")


@probe("ctypes cuBLAS GemmStridedBatchedEx captured")
def _(stream):
    path = cublas_lib()
    lib = ctypes.CDLL(path)
    handle = ctypes.c_void_p()
    assert lib.cublasCreate_v2(ctypes.byref(handle)) == 0
    ws = cp.empty(32 << 20, dtype=cp.uint8)
    assert lib.cublasSetStream_v2(handle, ctypes.c_void_p(stream.ptr)) == 0
    assert lib.cublasSetWorkspace_v2(handle, ctypes.c_void_p(ws.data.ptr), ctypes.c_size_t(ws.nbytes)) == 0
    a = cp.random.standard_normal((4, 64, 32), dtype=cp.float32)
    b = cp.random.standard_normal((4, 32, 48), dtype=cp.float32)
    c = cp.empty((4, 64, 48), dtype=cp.float32)
    one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
    f = lib.cublasGemmStridedBatchedEx
    f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                  ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                  ctypes.c_int, ctypes.c_int, ctypes.c_int]
    m, k, n = 64, 32, 48
    with stream:
        stream.begin_capture()
        rc = f(handle, 0, 0, n, m, k, ctypes.byref(one), b.data.ptr, 0, n, k * n, a.data.ptr, 0, k, m * k,
               ctypes.byref(zero), c.data.ptr, 0, n, m * n, 4, 68, -1)
        g = stream.end_capture()
        assert rc == 0, rc
        c[...] = 0
        g.launch(stream)
        stream.synchronize()
    err = float(cp.abs(c - a @ b).max())
    return f"{path}, max err {err:.2e}"


def captured_copy(stream, host):
    """A graph of one host-to-device copy of ``host``, launched once; returns (graph, device array)."""
    dev = cp.empty(host.shape, dtype=host.dtype)
    with stream:
        stream.begin_capture()
        cp.cuda.runtime.memcpyAsync(dev.data.ptr, host.ctypes.data, host.nbytes, 1, stream.ptr)
        g = stream.end_capture()
        g.launch(stream)
        stream.synchronize()
    return g, dev


@probe("pageable memcpyAsync inside capture")
def _(stream):
    host = np.arange(16, dtype=np.float32)
    _, dev = captured_copy(stream, host)
    return f"copied {bool((dev.get() == host).all())}"


@probe("pinned memcpyAsync inside capture, replay sees new host contents")
def _(stream):
    mem = cp.cuda.alloc_pinned_memory(64)
    host = np.frombuffer(mem, np.float32, 16)
    host[:] = 1
    g, dev = captured_copy(stream, host)
    first = float(dev.sum())
    host[:] = 2
    g.launch(stream)
    stream.synchronize()
    return f"first {first} then {float(dev.sum())}"


@probe("pageable memcpyAsync while the GPU is busy: host time")
def _(stream):
    a = cp.random.standard_normal((4096, 4096), dtype=cp.float32)
    host = np.arange(4096, dtype=np.int64)
    dev = cp.empty(4096, dtype=cp.int64)
    with stream:
        for _ in range(20):
            a @ a
        t = time.perf_counter()
        cp.cuda.runtime.memcpyAsync(dev.data.ptr, host.ctypes.data, host.nbytes, 1, stream.ptr)
        t_copy = time.perf_counter() - t
        t = time.perf_counter()
        stream.synchronize()
        t_rest = time.perf_counter() - t
    return f"copy returned after {t_copy * 1e3:.3f} ms, then synchronize waited {t_rest * 1e3:.1f} ms"


@probe("cupy.argsort inside capture")
def _(stream):
    x = cp.random.randint(0, 100, 1000)
    with stream:
        cp.argsort(x)
        stream.synchronize()
        stream.begin_capture()
        cp.argsort(x)
        g = stream.end_capture()
        g.launch(stream)
    return ""
