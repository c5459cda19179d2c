"""One line per result of benchmarks/train_step.py and benchmarks/decode.py (their ``--json`` output).

    python benchmarks/summarize.py gpu-check/bench.jsonl [more.jsonl ...]
"""
import json
import sys


def summarize(r):
    if "speedup" in r:                      # decode.py
        return (f"decode {r['config']:5s} batch {r['batch']:3d} beam {r['beam']}: cached {r['cached']['tokens_per_s']:.0f} "
                f"tok/s, uncached {r['uncached']['tokens_per_s']:.0f} tok/s, KV-cache speed-up {r['speedup']:.2f}x"
                + (f", graph {r['graph']['tokens_per_s']:.0f} tok/s ({r['speedup_graph']:.2f}x)" if "graph" in r else "")
                + (f", first of its shape {r['graph_cold']['tokens_per_s']:.0f} tok/s ({r['speedup_graph_cold']:.2f}x)"
                   if "graph_cold" in r else "")
                + (f", graph FAILED: {r['graph_error']}" if "graph_error" in r else "")
                + f" (same hypotheses: {r['same_output']})")
    if "config" not in r or "ours" not in r:
        return json.dumps(r)[:300]
    sides = [k for k in ("ours", "ours_3prod", "ours_handle", "ours_graph", "torch") if k in r]
    ms = "  ".join(f"{k} {r[k]['ms_per_step']:.2f} ms" for k in sides)
    peaks = "/".join(f"{r[k]['peak_mib']:.0f}" for k in sides if r[k].get("peak_mib"))
    return (f"{r['config']:5s} {'tf32' if r['tf32'] else 'fp32'}: "
            f"{ms}  ratio {r['ratio_tokens_per_s']:.3f}"
            + (f" (rounds {min(r['ratio_rounds']):.3f}–{max(r['ratio_rounds']):.3f})" if r.get("ratio_rounds") else "")
            + (f"  graph ratio {r['ratio_graph_tokens_per_s']:.3f}" if "ratio_graph_tokens_per_s" in r else "")
            + (f"  one/three products {r['ratio_one_vs_three_products']:.3f}" if "ratio_one_vs_three_products" in r else "")
            + (f"  own handle/@ {r['ratio_own_handle_vs_cupy']:.3f}" if "ratio_own_handle_vs_cupy" in r else "")
            + (f"  peak MiB {peaks}" if peaks else "")
            + (f" (ours/torch {r['ratio_peak_memory']:.3f})" if "ratio_peak_memory" in r else ""))


def main(paths):
    for path in paths:
        for line in open(path):
            if line.strip():
                print(summarize(json.loads(line)))


if __name__ == "__main__":
    main(sys.argv[1:])
