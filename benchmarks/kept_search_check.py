"""Kept fixed-size searches on a real model and test split, on the CPU (a check, not a benchmark).

    python benchmarks/kept_search_check.py --checkpoint runs/<run>

Translates the run's test split twice with beam 4: with the growing cache (the default), and the
way ``translate(cuda_graph=True)`` does on a GPU minus the graph itself — batches padded to widths
of a multiple of 8, each decoded by a fixed-size search kept per shape (``decode._FixedSearch``) and
run eagerly. Prints how many translations differ, how many batches found a kept search, and both times.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    args = parser.parse_args()
    from minitransformer import decode, evaluate
    from minitransformer.cli import load_run, run_splits
    model, tokenizer, config, _ = load_run(args.checkpoint, "cpu")
    sources = [s for s, _ in run_splits(config["data"], progress=False)["test"]]
    t = time.perf_counter()
    growing = evaluate.translate(model, tokenizer, sources)
    t_growing = time.perf_counter() - t

    starts = {"new": 0, "kept": 0}
    start = decode._FixedSearch.start

    def counted(search, *a):
        starts["kept" if search.searches else "new"] += 1
        return start(search, *a)
    decode._FixedSearch.start = counted
    beam_search = decode.beam_search
    evaluate.beam_search = lambda *a, cuda_graph=False, **k: beam_search(*a, fixed_cache=True, **k)
    t = time.perf_counter()
    fixed = evaluate.translate(model, tokenizer, sources, cuda_graph=True)   # pads widths; the lambda drops the graph
    t_fixed = time.perf_counter() - t
    differ = [i for i in range(len(sources)) if growing[i] != fixed[i]]
    print(f"{len(sources)} sentences: {len(differ)} translations differ; batches: {starts['new']} new searches, "
          f"{starts['kept']} kept ones; growing cache {t_growing:.1f} s, kept fixed-size searches {t_fixed:.1f} s")
    for i in differ[:5]:
        print(f"  {sources[i]!r}: {growing[i]!r} vs {fixed[i]!r}")


if __name__ == "__main__":
    main()
