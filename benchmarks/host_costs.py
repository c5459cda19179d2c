"""What each kind of call our GPU step makes costs the host, and PyTorch's equivalents (GPU only).

    python benchmarks/host_costs.py [--json]

The eager small step is bound by the host: the same step replayed as a CUDA graph runs in a quarter
of the time. ``benchmarks/launch_count.py`` counts the launches of a step by kind on the CPU; this
script times one call of each kind on the GPU — microseconds of host time per call, on arrays so
small that the GPU finishes each kernel before the host has issued the next, so the time is the
host's. The count times the cost says where an eager step's host time goes.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def host_us(fn, sync, calls=2000, rounds=5):
    """Median over rounds of the mean host time of one call, in µs (synchronised between rounds)."""
    for _ in range(20):
        fn()
    sync()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e6)
        sync()
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import cupy as cp
    import torch
    from minitransformer import kernels
    sync = cp.cuda.Device().synchronize
    f32 = cp.float32
    a, b = cp.ones((64, 64), f32), cp.ones((64, 64), f32)
    a3, b3 = cp.ones((8, 64, 64), f32), cp.ones((8, 64, 64), f32)
    rows = cp.ones((64, 256), f32)
    ids = np.arange(64, dtype=np.int64)
    ta, tb = torch.ones((64, 64), device="cuda"), torch.ones((64, 64), device="cuda")
    cases = {
        "cupy a + b (elementwise)": lambda: a + b,
        "cupy a += b (in place)": lambda: a.__iadd__(b),
        "cupy empty (64, 64)": lambda: cp.empty((64, 64), f32),
        "cupy ascontiguousarray (already)": lambda: cp.ascontiguousarray(a),
        "cupy ascontiguousarray (a.T: copy)": lambda: cp.ascontiguousarray(a.T),
        "cupy a.sum(axis=0) (reduction)": lambda: a.sum(axis=0),
        "cupy a @ b (2-D, cuBLAS via CuPy)": lambda: a @ b,
        "kernels.batched_matmul (3-D)": lambda: kernels.batched_matmul(a3, b3),
        "kernels.column_sum (1ᵀ g by CuPy's @)": lambda: kernels.column_sum(rows),
        "kernels.softmax_backward (RawKernel + Python)": lambda: kernels.softmax_backward(rows, rows),
        "kernels.dropout_apply (RawKernel + Python)": lambda: kernels.dropout_apply(rows, 0.1, 0, 0),
        "kernels.relu": lambda: kernels.relu(rows),
        "cupy asarray (64 int64 from the host)": lambda: cp.asarray(ids),
        "torch a + b": lambda: ta + tb,
        "torch a @ b": lambda: ta @ tb,
        "torch empty (64, 64)": lambda: torch.empty((64, 64), device="cuda"),
    }
    results = {}
    for name, fn in cases.items():
        results[name] = host_us(fn, sync if not name.startswith("torch") else torch.cuda.synchronize)
    products = gemm_variants(cp, sync)
    if args.json:
        print(json.dumps({"bench": "host_costs", "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                          "us_per_call": results, "products": products}))
        return
    print("host µs per call (median of 5 rounds of 2,000 calls)")
    for name, us in results.items():
        print(f"  {name:46s} {us:7.2f}")
    print("2-D float32 products of the small step, ways to call cuBLAS: host µs per call (issuing 200),"
          " wall µs per call (200 then a sync: the larger of host and GPU), max |difference from @|")
    for shape, rows in products.items():
        print(f"  {shape}")
        for name, r in rows.items():
            print(f"    {name:44s} " + (f"host {r['host_us']:7.2f}  wall {r['wall_us']:7.2f}  diff {r['max_diff']:.1e}"
                                        if "error" not in r else f"FAILED: {r['error']}"))


def gemm_variants(cp, sync):
    """The eager step's 2-D products go through CuPy's ``@`` (~50 µs of host time a call in a cProfile
    of the small step on the H200); a direct ``sgemm`` cost 23 µs there, yet the step got slower
    with it (2026-11-26; not understood). Here each way of calling cuBLAS on the small step's shapes,
    timed for host time alone and with the GPU's work: a way that is cheap on the host but slow in
    wall time waits for the GPU (a synchronisation per call) or picks slower kernels."""
    from cupy_backends.cuda.libs import cublas
    from minitransformer.kernels.capture import Blas
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    blas = Blas(cp.cuda.get_current_stream())
    out = {}
    for m, k, n in [(2048, 256, 768), (2048, 256, 1024), (2048, 1024, 256), (1, 2048, 256)]:
        a = cp.random.standard_normal((m, k), dtype=cp.float32)
        b = cp.random.standard_normal((k, n), dtype=cp.float32)
        expected = a @ b
        handle = cp.cuda.device.get_cublas_handle()
        cublas.setPointerMode(handle, 0)
        stream = cp.cuda.get_current_stream().ptr

        def sgemm(h):      # row-major C = A B as column-major Cᵀ = Bᵀ Aᵀ
            c = cp.empty((m, n), cp.float32)
            cublas.sgemm(h, 0, 0, n, m, k, one.ctypes.data, b.data.ptr, n, a.data.ptr, k, zero.ctypes.data,
                         c.data.ptr, n)
            return c

        def with_set_stream():
            h = cp.cuda.device.get_cublas_handle()
            cublas.setStream(h, stream)
            cublas.setPointerMode(h, 0)
            return sgemm(h)

        def ours():
            c = cp.empty((m, n), cp.float32)
            blas.gemm(np.dtype(np.float32), 0, 0, n, m, k, b.data.ptr, n, a.data.ptr, k, c.data.ptr, n, 0, 68)
            return c
        variants = {"cupy @": lambda: a @ b,
                    "sgemm on CuPy's handle, fetched once": lambda: sgemm(handle),
                    "sgemm, handle fetched per call": lambda: sgemm(cp.cuda.device.get_cublas_handle()),
                    "sgemm, setStream + setPointerMode per call": with_set_stream,
                    "sgemm on our own handle (ctypes, workspace)": ours}
        rows = {}
        for name, fn in variants.items():
            try:
                diff = float(cp.abs(fn() - expected).max())
                host = host_us(fn, sync, calls=200)
                sync()
                t = time.perf_counter()
                for _ in range(200):
                    fn()
                sync()
                rows[name] = {"host_us": host, "wall_us": (time.perf_counter() - t) / 200 * 1e6, "max_diff": diff}
            except Exception as e:   # noqa: BLE001  (a probe: report and go on)
                rows[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
        out[f"({m}, {k}) @ ({k}, {n})"] = rows
    return out


if __name__ == "__main__":
    main()
