"""Where one beam-search step over the fixed-size cache spends its GPU time (a developer's probe, GPU).

    python benchmarks/decode_parts.py --config base --batch 64 [--beam 4] [--json]

Each part of the step — the decoder on one position, log-softmax, picking the best candidates,
the rest of beam search's bookkeeping, reordering the cache — is captured on its own as a CUDA
graph (``cuda_graph.CapturedStep``) and its replays are timed with CUDA events, so the numbers are
GPU time without the host's launch cost. The whole step is timed the same way and also eagerly (host
and GPU: what an eager search pays per step). The parts' sum can differ from the whole step (each
part replays on a warm cache of its own inputs).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_step import CONFIGS, model_kwargs  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=50, help="the cache's positions (output length)")
    parser.add_argument("--source-length", type=int, default=20)
    parser.add_argument("--position", type=int, default=25, help="the step timed (the cache filled to here)")
    parser.add_argument("--repeat", type=int, default=50, help="timed replays per part")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import time
    import cupy as cp
    import minitransformer as mt
    from minitransformer import backend
    from minitransformer.cuda_graph import CapturedStep
    from minitransformer.decode import _Beams, _best_candidates, _reorder_cache, _step_logprobs
    from minitransformer.tensor import no_grad
    from minitransformer import functional as F

    c = CONFIGS[args.config]
    mt.manual_seed(0)
    model = mt.nn.Transformer(**model_kwargs(c, 0.0)).to("cuda").eval()
    B, K, steps = args.batch, args.beam, args.length
    src = np.random.default_rng(0).integers(4, c["vocab_size"], size=(B, args.source_length))
    with no_grad():
        memory, src_mask = model.encode(np.repeat(src, K, axis=0))
        limits = cp.full(B, steps, dtype=np.int64)
        beams = _Beams(cp, B, K, steps, 1, c["vocab_size"], 0.6, limits, capturable=True)
        beams.scores[...] = cp.asarray(np.random.default_rng(1).standard_normal((B, K)))   # all beams live
        cache = model.new_cache(B * K, steps)
        at = args.position

        def rewind():      # every replay times the same step: position `at`
            cache["position"][...] = at
            cache["length"] = at
            beams.step_number[...] = at
            beams.done[...] = False

        logp = _step_logprobs(model, beams.newest(), memory, src_mask, cache)
        V = logp.shape[1]
        n = min(2 * K, K * V)
        logits = model.decode(beams.newest(), memory, src_mask, cache)

        def whole():
            rewind()
            beams.step(_step_logprobs(model, beams.newest(), memory, src_mask, cache))
            _reorder_cache(cache, beams.rows)

        parts = {
            "decoder (one position)": lambda: (rewind(), model.decode(beams.newest(), memory, src_mask, cache)),
            "log-softmax": lambda: F.log_softmax(logits[:, -1, :]),
            "best candidates": lambda: _best_candidates(beams.scores, logp, n, True),
            "best candidates by argmax rounds": lambda: backend.top_k(
                (beams.scores[:, :, None] + logp.reshape(B, K, V)).reshape(B, K * V), n, True),
            "bookkeeping (incl. candidates)": lambda: (rewind(), beams.step(logp)),
            "cache reorder": lambda: _reorder_cache(cache, beams.rows),
            "whole step": whole,
        }
        result = {"config": args.config, "batch": B, "beam": K, "vocab": V, "position": at, "ms": {}}
        for name, fn in parts.items():
            captured = CapturedStep(fn, name)
            for _ in range(3):
                captured()
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(captured.stream)
            for _ in range(args.repeat):
                captured()
            end.record(captured.stream)
            end.synchronize()
            result["ms"][name] = cp.cuda.get_elapsed_time(start, end) / args.repeat
        for _ in range(3):
            whole()
        cp.cuda.Device().synchronize()
        t = time.perf_counter()
        for _ in range(args.repeat):
            whole()
        cp.cuda.Device().synchronize()
        result["ms"]["whole step, eager"] = 1e3 * (time.perf_counter() - t) / args.repeat
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.config}, {B} sentences x beam {K} (vocab {V}), step {at}: GPU ms per step part")
        for name, ms in result["ms"].items():
            print(f"  {name:32s} {ms:8.3f}")


if __name__ == "__main__":
    main()
