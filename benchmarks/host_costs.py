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
        "kernels.column_sum (GEMV)": lambda: kernels.column_sum(rows),
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
    if args.json:
        print(json.dumps({"bench": "host_costs", "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                          "us_per_call": results}))
        return
    print("host µs per call (median of 5 rounds of 2,000 calls)")
    for name, us in results.items():
        print(f"  {name:46s} {us:7.2f}")


if __name__ == "__main__":
    main()
