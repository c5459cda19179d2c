"""Where one training step of ours spends its time on the GPU (a developer's probe, not a benchmark).

    python benchmarks/profile_step.py --config small [--ops] [--matmul]

Prints: the step split into forward / backward / optimizer (each synchronised, so GPU time), the
Python functions with the most own time over a few steps (cProfile: the host's share), and how long
a host→device copy of a small array takes while the GPU is busy (does it wait for the queue?).
``--ops``: GPU time per op (CUDA events around every functional op's forward and backward).
``--matmul``: the step's matmul shapes through CuPy and through PyTorch, side by side.
"""
import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_step import CONFIGS, make_batch, model_kwargs  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ops", action="store_true")
    parser.add_argument("--matmul", action="store_true")
    args = parser.parse_args()
    import cupy as cp
    import minitransformer as mt
    from minitransformer.data import Batch
    from minitransformer.optim import Adam, NoamSchedule
    from minitransformer.train import batch_loss, train_step
    c = CONFIGS[args.config]
    mt.manual_seed(0)
    model = mt.nn.Transformer(**model_kwargs(c, 0.1)).to("cuda")
    src, tgt_in, tgt_out = make_batch(c)
    batch = Batch(src, tgt_in, tgt_out, np.arange(len(src)))
    opt = Adam(model.parameters(), lr=0.0)
    sched = NoamSchedule(opt, c["d_model"], 4000)
    sync = cp.cuda.Device().synchronize
    for _ in range(3):
        train_step(model, opt, sched, batch)
    sync()

    parts = {"forward": [], "backward": [], "optimizer": []}
    for _ in range(args.steps):
        opt.zero_grad()
        t = time.perf_counter(); loss = batch_loss(model, batch, 0.1); sync(); parts["forward"].append(time.perf_counter() - t)
        t = time.perf_counter(); loss.backward(); sync(); parts["backward"].append(time.perf_counter() - t)
        t = time.perf_counter(); sched.step(); opt.step(); sync(); parts["optimizer"].append(time.perf_counter() - t)
    print(args.config, {k: f"{1e3 * np.median(v):.2f} ms" for k, v in parts.items()})

    if args.ops:
        op_times(model, opt, sched, batch, sync, args.steps)
    if args.matmul:
        matmul_shapes(c)

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        train_step(model, opt, sched, batch)
    sync()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
    print("\n".join(s.getvalue().splitlines()[:45]))

    # does a small host→device copy wait for queued GPU work?
    a = cp.ones((4096, 4096), dtype=cp.float32)
    host = np.arange(64, dtype=np.int64)
    for label in ("idle", "busy"):
        if label == "busy":
            for _ in range(20):
                a = a @ a * 0.001
        t = time.perf_counter(); cp.asarray(host); dt = time.perf_counter() - t
        print(f"cp.asarray(64 ints) with the GPU {label}: {1e3 * dt:.3f} ms")
        sync()
    # batched matmul on a transposed view vs contiguous
    q = cp.random.standard_normal((64, 8, 128, 64), dtype=cp.float32)
    for label, k in (("swapaxes view", q.swapaxes(-1, -2)), ("contiguous", cp.ascontiguousarray(q.swapaxes(-1, -2)))):
        for _ in range(3):
            q @ k
        sync(); t = time.perf_counter()
        for _ in range(20):
            q @ k
        sync()
        print(f"q @ kᵀ ({label}): {1e3 * (time.perf_counter() - t) / 20:.3f} ms")


def op_times(model, opt, sched, batch, sync, steps):
    """GPU milliseconds per op and direction, from CUDA events recorded around each call."""
    import collections
    import importlib
    import cupy as cp
    import minitransformer.functional as F
    from minitransformer.tensor import PartBackward, Tensor
    from minitransformer.train import train_step
    events = []

    def wrap(name, fn):
        def timed(*a, **k):
            e0 = cp.cuda.Event()
            e0.record()
            out = fn(*a, **k)
            e1 = cp.cuda.Event()
            e1.record()
            events.append((name, "fwd", e0, e1))
            t = out[0] if isinstance(out, tuple) else out
            # (not getitem's PartBackward: attention looks for it to write dQ, dK, dV into one array)
            if isinstance(t, Tensor) and t._backward is not None and type(t._backward) is not PartBackward:
                inner = t._backward

                def timed_backward(g):
                    b0 = cp.cuda.Event()
                    b0.record()
                    r = inner(g)
                    b1 = cp.cuda.Event()
                    b1.record()
                    events.append((name, "bwd", b0, b1))
                    return r
                t._backward = timed_backward
            return out
        return timed

    originals = []
    for modname in ("elementwise", "linear", "shape", "softmax", "normalization", "embedding", "dropout",
                    "loss", "attention", "reduction"):
        mod = importlib.import_module(f"minitransformer.functional.{modname}")
        for name, fn in list(vars(mod).items()):
            if callable(fn) and getattr(fn, "__module__", "") == mod.__name__ and not name.startswith("_") \
                    and name[0].islower():
                originals.append((mod, name, fn))
                setattr(mod, name, wrap(name, fn))
                if getattr(F, name, None) is fn:
                    originals.append((F, name, fn))
                    setattr(F, name, getattr(mod, name))
    try:
        for _ in range(steps):
            e0 = cp.cuda.Event()
            e0.record()
            train_step(model, opt, sched, batch)
            e1 = cp.cuda.Event()
            e1.record()
            events.append(("whole step", "", e0, e1))
        sync()
    finally:
        for mod, name, fn in originals:
            setattr(mod, name, fn)
    total = collections.defaultdict(float)
    count = collections.Counter()
    for name, way, e0, e1 in events:
        total[(name, way)] += cp.cuda.get_elapsed_time(e0, e1) / steps
        count[(name, way)] += 1
    print(f"GPU ms per step by op ({steps} steps, events around each call):")
    for key, ms in sorted(total.items(), key=lambda kv: -kv[1])[:30]:
        print(f"  {key[0]:32s} {key[1]:3s} {ms:8.2f} ms  {count[key] // steps:5d} calls")


def matmul_shapes(c):
    """The linear layers' three products (y = x Wᵀ, dx = g W, dW = gᵀ x) and the bias gradient,
    through CuPy and PyTorch on the same arrays."""
    import cupy as cp
    import torch
    R = c["batch"] * c["length"]
    shapes = [(c["d_model"], c["d_model"]), (c["d_ff"], c["d_model"]), (c["d_model"], c["d_ff"]),
              (c["vocab_size"], c["d_model"])]

    def bench(fn, sync):
        for _ in range(3):
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        sync()
        return 1e3 * (time.perf_counter() - t) / 20
    print(f"matmul shapes, R = {R} rows: ms, CuPy vs torch")
    for out_f, in_f in shapes:
        x = cp.random.standard_normal((R, in_f), dtype=cp.float32)
        W = cp.random.standard_normal((out_f, in_f), dtype=cp.float32)
        g = cp.random.standard_normal((R, out_f), dtype=cp.float32)
        tx, tW, tg = (torch.as_tensor(a, device="cuda") for a in (x, W, g))
        ones = cp.ones(R, dtype=cp.float32)
        cs = cp.cuda.Device().synchronize
        ts = torch.cuda.synchronize
        rows = [("x @ W.T", lambda: x @ W.T, lambda: tx @ tW.T),
                ("g @ W", lambda: g @ W, lambda: tg @ tW),
                ("g.T @ x", lambda: g.T @ x, lambda: tg.T @ tx),
                ("g.sum(0)", lambda: g.sum(axis=0), lambda: tg.sum(0)),
                ("ones @ g", lambda: ones @ g, lambda: tg.sum(0))]
        for label, ours, theirs in rows:
            print(f"  W {out_f}x{in_f}  {label:9s} cupy {bench(ours, cs):7.3f}  torch {bench(theirs, ts):7.3f}")


if __name__ == "__main__":
    main()
