"""Where the base model's captured step loses time against the eager one: each piece that differs
between them, timed with CUDA events on base-sized inputs (median of 20). One-off diagnostic.

    python benchmarks/graph_diag.py
"""
import statistics

import numpy as np
import cupy as cp

from minitransformer import kernels
from minitransformer.kernels.capture import Blas


def timed(fn, reps=20):
    fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


rng = np.random.default_rng(0)
ids = rng.integers(4, 37000, size=(64, 128))
g = cp.asarray(rng.standard_normal((ids.size, 512)), dtype=cp.float32)
d_ids = cp.asarray(ids)
print(f"embedding backward, sorted on host    {timed(lambda: kernels.embedding_backward(ids, g, 37000)):.3f} ms")
print(f"embedding backward, unsorted kernel   {timed(lambda: kernels.embedding_backward(d_ids, g, 37000)):.3f} ms")


def device_sorted():
    flat = d_ids.reshape(-1)
    order = cp.argsort(flat)
    sorted_ids = flat[order]
    dW = cp.zeros((37000, 512), dtype=cp.float32)
    kernels._kernel("embedding_bwd", g.dtype)((flat.size, 4), (128,), (sorted_ids, order, g, np.int64(flat.size),
                                                                       np.int32(512), dW))
    return dW


print(f"embedding backward, cupy.argsort      {timed(device_sorted):.3f} ms")
same = bool((device_sorted() == kernels.embedding_backward(ids, g, 37000)).all())
print(f"  argsort version equals the host-sorted one bit for bit: {same}")

# argsort inside a captured graph, replayed on new ids
stream = cp.cuda.Stream()
buf = cp.asarray(rng.integers(0, 50, 8192))
with stream:
    cp.argsort(buf)
    stream.synchronize()
    stream.begin_capture()
    out = cp.argsort(buf)
    graph = stream.end_capture()
    new = rng.integers(0, 50, 8192)
    buf.set(new)
    graph.launch(stream)
    stream.synchronize()
print(f"  argsort replayed in a graph sorts the new ids stably: "
      f"{bool((cp.asnumpy(out) == np.argsort(new, kind='stable')).all())}")

blas = Blas(cp.cuda.get_current_stream())
q = cp.asarray(rng.standard_normal((64, 8, 128, 64)), dtype=cp.float32)
k = cp.asarray(rng.standard_normal((64, 8, 128, 64)), dtype=cp.float32)
print(f"attention scores, CuPy handle         {timed(lambda: kernels.batched_matmul(q, k.swapaxes(-1, -2))):.3f} ms")


def ours_batched():
    C = cp.empty((64, 8, 128, 128), dtype=cp.float32)
    blas.gemm_strided_batched(np.dtype(np.float32), 1, 0, 128, 128, 64, k.data.ptr, 64, 128 * 64, q.data.ptr, 64,
                              128 * 64, C.data.ptr, 128, 128 * 128, 512, 0, 68)
    return C


print(f"attention scores, our handle          {timed(ours_batched):.3f} ms")
x = cp.asarray(rng.standard_normal((8192, 512)), dtype=cp.float32)
W = cp.asarray(rng.standard_normal((37000, 512)), dtype=cp.float32)
print(f"vocab projection, CuPy @              {timed(lambda: x @ W.T):.3f} ms")


def ours_gemm():
    C = cp.empty((8192, 37000), dtype=cp.float32)
    blas.gemm(np.dtype(np.float32), 1, 0, 37000, 8192, 512, W.data.ptr, 512, x.data.ptr, 512, C.data.ptr, 37000, 0, 68)
    return C


print(f"vocab projection, our sgemm           {timed(ours_gemm):.3f} ms")
h = cp.asarray(rng.standard_normal((8192, 2048)), dtype=cp.float32)
ones = cp.ones(8192, dtype=cp.float32)
print(f"bias gradient, CuPy ones @ g          {timed(lambda: ones @ h):.3f} ms")


def ours_gemv():
    out = cp.empty(2048, dtype=cp.float32)
    blas.gemv(np.dtype(np.float32), 2048, 8192, h.data.ptr, 2048, ones.data.ptr, out.data.ptr)
    return out


print(f"bias gradient, our gemv               {timed(ours_gemv):.3f} ms")
print(f"  equal: {bool(cp.allclose(ours_gemv(), ones @ h, rtol=1e-5))}, gemm equal: "
      f"{bool(cp.allclose(ours_gemm(), x @ W.T, rtol=1e-4, atol=1e-3))}")
