"""Where one training step of ours spends its time on the GPU (a developer's probe, not a benchmark).

    python benchmarks/profile_step.py --config small

Prints: the step split into forward / backward / optimizer (each synchronised, so GPU time), the
Python functions with the most own time over a few steps (cProfile: the host's share), and how long
a host→device copy of a small array takes while the GPU is busy (does it wait for the queue?).
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


if __name__ == "__main__":
    main()
