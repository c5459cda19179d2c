"""One training step of minitransformer and of its PyTorch twin, on the same device, in the same run.

    python benchmarks/train_step.py --device cpu --config tiny
    python benchmarks/train_step.py --device cuda --config base [--tf32] [--cuda-graph] [--json]

Both models get the same config, weights and batch (random tokens, B × L source and target),
the same loss (label smoothing 0.1), Adam and the Noam schedule. Reported per side: ms/step
(median of the timed steps), target tokens/s, achieved matmul TFLOP/s (analytic count, training
= 3 × forward) and peak memory (GPU only); then the ratio ours/torch of tokens/s.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIGS = {  # the reference configurations
    "tiny": dict(vocab_size=4000, d_model=128, num_heads=4, num_layers=2, d_ff=512, batch=32, length=16),
    "small": dict(vocab_size=8000, d_model=256, num_heads=4, num_layers=3, d_ff=1024, batch=64, length=32),
    "base": dict(vocab_size=37000, d_model=512, num_heads=8, num_layers=6, d_ff=2048, batch=64, length=128),
    # small's layers with next to no arithmetic: the time is each framework's per-op host work
    # (Python, dispatch, autograd), which is what bounds a small model's step on a GPU
    "micro": dict(vocab_size=16, d_model=8, num_heads=4, num_layers=3, d_ff=16, batch=2, length=3),
}


def matmul_flops(c):
    """Forward matmul FLOPs of one batch (2 per multiply-add), times 3 for forward + backward."""
    B, L, d, ff, N, V = c["batch"], c["length"], c["d_model"], c["d_ff"], c["num_layers"], c["vocab_size"]
    S = T = L
    enc = N * (8 * B * S * d * d + 4 * B * S * S * d + 4 * B * S * d * ff)
    dec = N * (8 * B * T * d * d + 4 * B * T * T * d            # masked self-attention
               + 4 * B * T * d * d + 4 * B * S * d * d + 4 * B * T * S * d  # cross-attention
               + 4 * B * T * d * ff)
    return 3 * (enc + dec + 2 * B * T * d * V)


def make_batch(c, seed=0):
    rng = np.random.default_rng(seed)
    B, L = c["batch"], c["length"]
    src = rng.integers(4, c["vocab_size"], size=(B, L))
    tgt = rng.integers(4, c["vocab_size"], size=(B, L + 1))
    return src, tgt[:, :-1].copy(), tgt[:, 1:].copy()


def model_kwargs(c, dropout):
    keys = ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff")
    return dict({k: c[k] for k in keys}, dropout=dropout, max_len=max(512, c["length"] + 1))


def timed(step, sync, times):
    t = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - t)


def setup_ours(c, device, args, graph=False, one_product=True, extra=False):
    """(step, sync, peak) for minitransformer, eager or (``graph``) replayed as a CUDA graph;
    ``peak()`` measures one more step's peak memory. ``one_product=False``: attention computes
    Q, K, V by three products (``MultiHeadAttention.one_product``), for comparison. ``extra``: an
    eager side set up after ours, whose peak is not measured (CuPy's pool then also holds the
    other sides' models: the figure would be theirs too)."""
    import minitransformer as mt
    from minitransformer.data import Batch
    from minitransformer.optim import Adam, NoamSchedule
    from minitransformer.train import train_step
    mt.manual_seed(0)
    model = mt.nn.Transformer(**model_kwargs(c, args.dropout)).to(device)
    for m in model.modules():
        if isinstance(m, mt.nn.MultiHeadAttention):
            m.one_product = one_product
    src, tgt_in, tgt_out = make_batch(c)
    batch = Batch(src, tgt_in, tgt_out, np.arange(len(src)))
    opt = Adam(model.parameters(), lr=0.0)
    schedule = NoamSchedule(opt, c["d_model"], 4000)
    xp = mt.backend.xp_for(device)
    sync = xp.cuda.Device().synchronize if device == "cuda" else (lambda: None)

    if graph:
        from minitransformer.cuda_graph import CudaGraphStep
        graphed = CudaGraphStep(model, opt, schedule, 0.1)

        def graph_peak():
            """Bytes in use outside the graphs' pool (parameters, Adam's state, inputs) plus everything
            that pool holds: an upper bound on the replay's peak."""
            graphed(batch)
            sync()
            return (xp.get_default_memory_pool().used_bytes() + graphed.pool.total_bytes()) / 2**20
        return (lambda: graphed(batch)), sync, graph_peak

    def step():
        train_step(model, opt, schedule, batch, 0.1)
    if device != "cuda" or extra:
        return step, sync, lambda: None
    if args.cuda_graph or args.three_products or args.own_handle:   # measured now, before the
        step()                                                      # other sides share the pool
        peak = peak_allocated(xp, step, sync)
        return step, sync, lambda: peak
    return step, sync, lambda: peak_allocated(xp, step, sync)


def own_handle_side(side):
    """The same (step, sync, peak) with ``kernels.OWN_HANDLE`` on while this side runs."""
    from minitransformer import kernels
    step, sync, peak = side

    def switched(fn):
        def run():
            previous, kernels.OWN_HANDLE = kernels.OWN_HANDLE, True
            try:
                return fn()
            finally:
                kernels.OWN_HANDLE = previous
        return run
    return switched(step), sync, switched(peak)


def peak_allocated(cp, step, sync):
    """Peak bytes *in use* during one step (what torch.cuda.max_memory_allocated counts): CuPy's pool
    reports only the current figure, so every allocation goes through a wrapper that records it.
    Measured after the timing (the wrapper costs a little host time per allocation)."""
    pool = cp.get_default_memory_pool()
    peak = [pool.used_bytes()]

    def malloc(size):
        memory = pool.malloc(size)
        peak[0] = max(peak[0], pool.used_bytes())
        return memory
    cp.cuda.set_allocator(malloc)
    try:
        step()
        sync()
    finally:
        cp.cuda.set_allocator(pool.malloc)
    return peak[0] / 2**20


def setup_torch(c, device, args):
    import torch
    from torch_twin import TorchTransformer, make_optimizer, train_step
    torch.manual_seed(0)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    model = TorchTransformer(**model_kwargs(c, args.dropout)).to(device)
    src, tgt_in, tgt_out = (torch.as_tensor(a, device=device) for a in make_batch(c))
    opt = make_optimizer(model)
    counter = [0]

    def step():
        counter[0] += 1
        train_step(model, opt, counter[0], src, tgt_in, tgt_out, 0.1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def peak():
        if device != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        return torch.cuda.max_memory_allocated() / 2**20     # bytes in use, as ours
    return step, sync, peak


def measure(sides, args):
    """Warm both up, then alternate ``--rounds`` blocks of ``--steps`` synchronised steps of each side
    (clock or load drift hits both alike); per side the median step time, the peak memory, and the
    median of each round (a ratio is settled only if the rounds' ratios agree)."""
    for step, sync, _ in sides.values():
        for _ in range(args.warmup):
            step()
        sync()
    times = {name: [] for name in sides}
    rounds = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (step, sync, _) in sides.items():
            before = len(times[name])
            for _ in range(args.steps):
                timed(step, sync, times[name])
            rounds[name].append(statistics.median(times[name][before:]))
    return {name: (statistics.median(times[name]), sides[name][2](), rounds[name]) for name in sides}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls on both sides (GPU)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time our step replayed as a CUDA graph (a third side, 'ours_graph')")
    parser.add_argument("--unfused", action="store_true",
                        help="our side without the fused GPU kernels (array formulas only), for comparison")
    parser.add_argument("--three-products", action="store_true",
                        help="also time our eager step with Q, K, V by three products instead of one "
                             "(a side 'ours_3prod'; the ratio one/three is printed)")
    parser.add_argument("--own-handle", action="store_true",
                        help="also time our eager step with its 2-D products and bias GEMVs on our own cuBLAS "
                             "handle instead of CuPy's @ (kernels.OWN_HANDLE; a side 'ours_handle')")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and side")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours and torch")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed host memory for reuse, as the command line sets it "
                             "(backend.keep_freed_host_memory; both sides share the process)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.keep_freed_memory:
        from minitransformer.backend import keep_freed_host_memory
        if not keep_freed_host_memory():
            parser.error("--keep-freed-memory needs glibc's malloc")
    if args.tf32:
        os.environ["CUPY_TF32"] = "1"   # read by CuPy when it first runs a matmul
    if args.unfused:
        os.environ["MINITRANSFORMER_FUSED"] = "0"   # read when minitransformer is imported
    if args.cuda_graph and (args.device != "cuda" or args.unfused):
        parser.error("--cuda-graph needs --device cuda and the fused kernels")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    c = CONFIGS[args.config]
    tokens = c["batch"] * c["length"]
    flops = matmul_flops(c)
    result = {"config": args.config, "device": args.device, "tf32": args.tf32, "fused": not args.unfused,
              "keep_freed_memory": args.keep_freed_memory, **c}
    sides = {"ours": setup_ours(c, args.device, args)}
    if args.three_products:
        sides["ours_3prod"] = setup_ours(c, args.device, args, one_product=False, extra=True)
    if args.own_handle:
        sides["ours_handle"] = own_handle_side(setup_ours(c, args.device, args, extra=True))
    if args.cuda_graph:
        sides["ours_graph"] = setup_ours(c, args.device, args, graph=True)
    sides["torch"] = setup_torch(c, args.device, args)
    for name, (seconds, peak, rounds) in measure(sides, args).items():
        result[name] = {"ms_per_step": seconds * 1e3, "tokens_per_s": tokens / seconds,
                        "tflops": flops / seconds / 1e12, "peak_mib": peak,
                        "round_ms_per_step": [t * 1e3 for t in rounds]}
    result["ratio_tokens_per_s"] = result["ours"]["tokens_per_s"] / result["torch"]["tokens_per_s"]
    # each round's ratio (torch's time in that round over ours): how far the ratio moved within the run
    result["ratio_rounds"] = [t / o for o, t in zip(result["ours"]["round_ms_per_step"],
                                                     result["torch"]["round_ms_per_step"])]
    if args.cuda_graph:
        result["ratio_graph_tokens_per_s"] = result["ours_graph"]["tokens_per_s"] / result["torch"]["tokens_per_s"]
    if args.three_products:
        result["ratio_one_vs_three_products"] = result["ours"]["tokens_per_s"] / result["ours_3prod"]["tokens_per_s"]
    if args.own_handle:
        result["ratio_own_handle_vs_cupy"] = result["ours_handle"]["tokens_per_s"] / result["ours"]["tokens_per_s"]
    if args.device == "cuda":
        result["ratio_peak_memory"] = result["ours"]["peak_mib"] / result["torch"]["peak_mib"]
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.config} on {args.device}{' (TF32)' if args.tf32 else ''}{' (ours unfused)' if args.unfused else ''}: "
          f"batch {c['batch']}×{c['length']}")
    for name in sides:
        r = result[name]
        peak = f"{r['peak_mib']:.0f} MiB" if r["peak_mib"] is not None else "n/a"
        print(f"  {name:10s} {r['ms_per_step']:9.2f} ms/step  {r['tokens_per_s']:10.0f} tok/s  "
              f"{r['tflops']:7.3f} TFLOP/s  peak {peak}")
    print(f"  ratio ours/torch (tokens/s): {result['ratio_tokens_per_s']:.2f}"
          f" (rounds {min(result['ratio_rounds']):.2f}–{max(result['ratio_rounds']):.2f})"
          + (f"   with the CUDA graph: {result['ratio_graph_tokens_per_s']:.2f}" if args.cuda_graph else "")
          + (f"   peak memory ours/torch: {result['ratio_peak_memory']:.2f}" if "ratio_peak_memory" in result else "")
          + (f"   one/three products: {result['ratio_one_vs_three_products']:.2f}" if args.three_products else "")
          + (f"   own handle/CuPy's @: {result['ratio_own_handle_vs_cupy']:.2f}" if args.own_handle else ""))


if __name__ == "__main__":
    main()
