"""Beam-search decoding speed with and without the key/value cache (§6.1 settings: beam 4, α = 0.6).

    python benchmarks/decode.py --device cpu --config small [--beam 4] [--length 50] [--batch 8] [--json]
    python benchmarks/decode.py --device cuda --config small --cuda-graph     # a third variant
    python benchmarks/decode.py --device cpu --config small --fixed-cache     # the fixed-size cache, eagerly

A randomly initialised model decodes a batch of random source sentences; eos is set to an id the
model never emits, so every hypothesis runs to exactly ``--length`` tokens and both variants do the
same amount of work. Reported: output tokens/s (batch × beam × length / seconds, the median of
``--repeat`` runs, variants alternating) for each, the speed-up of the cache, and whether both
produced the same hypotheses. ``--batch 64`` is what ``translate`` and ``evaluate`` decode at once.
``--cuda-graph`` (GPU) adds the cached search over a fixed-size cache with each step replayed as a
CUDA graph (``beam_search(cuda_graph=True)``) and its speed-up over the uncached search, twice: as a
later batch of its shape ("graph": the kept search replays the graphs it recorded) and as the first
("graph_cold": an eager step and two recordings first);
``--fixed-cache`` adds the fixed-size cache run eagerly (``fixed_cache=True``, any device).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_step import CONFIGS, model_kwargs  # noqa: E402  (benchmarks/ is on sys.path as the script dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--length", type=int, default=50, help="output tokens per hypothesis")
    parser.add_argument("--batch", type=int, default=8, help="source sentences")
    parser.add_argument("--source-length", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--cuda-graph", action="store_true", help="also the cached search replayed as a CUDA graph (GPU)")
    parser.add_argument("--fixed-cache", action="store_true", help="also the fixed-size cache, eagerly")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph needs --device cuda")

    import minitransformer as mt
    from minitransformer.decode import beam_search, release_searches
    c = CONFIGS[args.config]
    mt.manual_seed(0)
    model = mt.nn.Transformer(**model_kwargs(c, 0.0)).to(args.device).eval()
    src = np.random.default_rng(0).integers(4, c["vocab_size"], size=(args.batch, args.source_length))
    never = c["vocab_size"]    # an eos id outside the vocabulary: every hypothesis runs full length
    max_len_b = args.length - args.source_length

    result = {"config": args.config, "device": args.device, "beam": args.beam, "length": args.length,
              "batch": args.batch, "repeat": args.repeat}
    variants = {"cached": dict(use_cache=True), "uncached": dict(use_cache=False)}
    if args.fixed_cache:
        variants["fixed"] = dict(fixed_cache=True)
    if args.cuda_graph:
        # "graph": the search kept from an earlier batch of this shape replays its graphs; "graph_cold":
        # the first batch of a shape, which also runs an eager step and records two graphs
        variants["graph"] = dict(cuda_graph=True)
        variants["graph_cold"] = dict(cuda_graph=True)
    for name, kwargs in list(variants.items()):   # warm-up: kernels compiled, memory pool filled
        try:
            beam_search(model, src, 2, never, args.beam, max_len_b=6 - args.source_length, **kwargs)
        except Exception as e:  # noqa: BLE001  (a failed graph still leaves the other two to measure)
            if not name.startswith("graph"):
                raise
            result["graph_error"] = f"{type(e).__name__}: {e}"
            print(f"decode.py: the CUDA-graph variant failed, measuring the others: {result['graph_error']}",
                  file=sys.stderr)
            del variants[name]
    if "graph" in variants:   # the kept search for the timed shape
        beam_search(model, src, 2, never, args.beam, max_len_b=max_len_b, **variants["graph"])
    outputs, seconds = {}, {name: [] for name in variants}
    for _ in range(args.repeat):
        for name, kwargs in variants.items():
            if name == "graph_cold":
                release_searches(model)
            t = time.perf_counter()
            outputs[name] = beam_search(model, src, 2, never, args.beam, max_len_b=max_len_b, **kwargs)
            seconds[name].append(time.perf_counter() - t)
    for name in variants:
        median = statistics.median(seconds[name])
        result[name] = {"seconds": median, "tokens_per_s": args.batch * args.beam * args.length / median,
                        "runs_s": seconds[name]}
    result["speedup"] = result["cached"]["tokens_per_s"] / result["uncached"]["tokens_per_s"]
    result["same_output"] = all(out == outputs["uncached"] for out in outputs.values())
    for name in ("graph", "graph_cold"):
        if name in variants:
            result["speedup_" + name] = result[name]["tokens_per_s"] / result["uncached"]["tokens_per_s"]
    assert all(len(h) == args.length for out in outputs.values() for h in out), "hypotheses did not run full length"
    if args.json:
        print(json.dumps(result))
        return
    print(f"beam {args.beam}, {args.length}-token outputs, {args.batch} sentences, {args.config} on {args.device}")
    for name in variants:
        r = result[name]
        print(f"  {name:9s} {r['seconds']:8.2f} s  {r['tokens_per_s']:9.0f} tok/s")
    print(f"  KV-cache speed-up: {result['speedup']:.1f}x"
          + (f"   replayed as a CUDA graph: {result['speedup_graph']:.1f}x (first batch of its shape "
             f"{result['speedup_graph_cold']:.1f}x)" if "graph" in variants else "")
          + f"   same hypotheses: {result['same_output']}")


if __name__ == "__main__":
    main()
