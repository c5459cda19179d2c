"""Our own Python's share of the host time of a GPU training step — measured on the CPU, no GPU needed.

    python benchmarks/host_python.py [--config micro] [--profile]

The eager small step on a GPU is bound by host time: CuPy's per-call cost plus our Python (op
wrappers, checks, the graph walk, Adam's bookkeeping). This runs one training step through the
model's GPU code path (``backend.fused`` true for NumPy float arrays) with every fused kernel a
no-op, matrix products by NumPy and NumPy standing in for CuPy, on ``micro``'s tiny arrays: what is
left is our Python plus NumPy's per-call cost, which stands in for CuPy's (CuPy's is higher:
``benchmarks/host_costs.py`` measures it on a GPU). Numbers (no longer correct: the kernels do
nothing) do not matter here, only the time. ``--profile``: the functions with the most own time.
"""
import argparse
import cProfile
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="micro")
    parser.add_argument("--steps", type=int, default=100, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime", help="pstats order with --profile: tottime, cumtime")
    parser.add_argument("--top", type=int, default=30, help="functions listed with --profile")
    args = parser.parse_args()
    import minitransformer as mt
    from minitransformer import backend, kernels
    from minitransformer.data import Batch
    from minitransformer.optim import Adam, NoamSchedule
    from minitransformer.train import train_step
    from train_step import CONFIGS, make_batch, model_kwargs

    kernels._kernel = lambda name, dtype: (lambda grid, block, arguments: None)
    kernels.batched_matmul = lambda a, b, out=None: np.matmul(a, b, out=out)
    kernels.column_sum = lambda g: g.sum(axis=0)
    kernels.adam_step = lambda *arguments: None      # its pointer table reads CuPy's addresses
    backend.cupy = lambda: np
    backend.fused = lambda *arrays: all(a.dtype in (np.float32, np.float64) for a in arrays)
    warnings.simplefilter("ignore")                 # the no-op kernels leave garbage: overflows

    c = CONFIGS[args.config]
    mt.manual_seed(0)
    model = mt.nn.Transformer(**model_kwargs(c, 0.1))
    src, tgt_in, tgt_out = make_batch(c)
    batch = Batch(src, tgt_in, tgt_out, np.arange(len(src)))
    opt = Adam(model.parameters(), lr=0.0)
    schedule = NoamSchedule(opt, c["d_model"], 4000)
    for _ in range(5):
        train_step(model, opt, schedule, batch)
    rounds = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        for _ in range(args.steps):
            train_step(model, opt, schedule, batch)
        rounds.append((time.perf_counter() - t) / args.steps * 1e3)
    print(f"{args.config}: our Python on the GPU code path {statistics.median(rounds):.2f} ms a step "
          f"(median of {args.rounds} rounds; min {min(rounds):.2f}, max {max(rounds):.2f})")
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.steps):
            train_step(model, opt, schedule, batch)
        profile.disable()
        pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
