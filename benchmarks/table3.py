"""The paper's Table 3 (§6.2, variations on the Transformer), at the size of a CPU: one
`minitransformer train` run per row, all for the same number of steps on the same data, then the
held-out perplexity and test BLEU of each.

    python benchmarks/table3.py [--steps 800] [--jobs 2] [--out runs/table3] [--rows base,A1,E] [--train-args "…"]

Rows change one thing of the ``tiny`` preset (d_model 128, h 4, N 2, d_ff 512, P_drop 0.1,
eps_ls 0.1, sinusoidal positions), named after Table 3's groups: (A) the number of heads at a fixed
d_model, (C) the depth (and the deeper model with a longer warm-up, or pre-LN), (D) dropout and
label smoothing, (E) learned positions. ``base2`` is the base row with another seed: how far two runs
of the same row land apart, to read the rest against. Runs go ``--jobs`` at a time (with more than
one, each on one BLAS thread); a finished row (its bleu.json there) is read, not trained again.
``--json``: one line per row.
"""
import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = {   # name: (what changes, the train options that change it)
    "base": ("tiny preset: h 4, d_k 32, N 2, P_drop 0.1, eps_ls 0.1, sinusoidal", []),
    "base2": ("the same, seed 1", ["--seed", "1"]),
    "A1": ("(A) h 1, d_k 128", ["--heads", "1"]),
    "A16": ("(A) h 16, d_k 8", ["--heads", "16"]),
    "C1": ("(C) N 1", ["--layers", "1"]),
    "C4": ("(C) N 4", ["--layers", "4"]),
    "C4w": ("(C) N 4, warm-up 1,600 steps (not 400)", ["--layers", "4", "--warmup-steps", "1600"]),
    "C4p": ("(C) N 4, pre-LN (not the paper's)", ["--layers", "4", "--norm-first"]),
    "D0": ("(D) P_drop 0", ["--dropout", "0"]),
    "Dls0": ("(D) eps_ls 0", ["--label-smoothing", "0"]),
    "E": ("(E) learned positions", ["--positions", "learned"]),
}


def train(name, args):
    out = Path(args.out) / name
    if (out / "bleu.json").is_file():
        return out
    command = [sys.executable, "-m", "minitransformer", "train", "--preset", "tiny", "--steps", str(args.steps),
               "--eval-every", str(args.steps), "--checkpoint-every", str(args.steps), "--test-limit",
               str(args.test_limit), "--no-progress", "--out", str(out), *args.train_args.split(), *ROWS[name][1]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.jobs > 1:
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = "1"
    print(f"[{name}] {' '.join(command[2:])}", file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"{name}: train exited {done.returncode}:\n{done.stderr[-2000:]}")
    return out


def row(name, out):
    """A row from what the run wrote: bleu.json, and last.npz's model configuration and training time."""
    from minitransformer.checkpoint import checkpoint_info
    from minitransformer.nn.transformer import Transformer
    bleu = json.loads((out / "bleu.json").read_text())
    info = checkpoint_info(out / "last.npz")
    return {"row": name, "change": ROWS[name][0],
            "parameters": Transformer.from_config(info["config"]).num_parameters(),   # tied weights once
            "train_minutes": round(info["meta"]["elapsed"] / 60, 1),
            "valid_loss": bleu.get("valid_loss"), "bleu": bleu["bleu"], "chrf": bleu["chrf"], "n": bleu["n"],
            "step": bleu.get("step")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="runs/table3")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--train-args", default="", help="more options for every row's train, e.g. "
                                                            "\"--data my.tsv --vocab-size 300\"")
    args = parser.parse_args()
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    with ThreadPoolExecutor(args.jobs) as pool:
        finished = list(pool.map(lambda n: train(n, args), names))
    rows = [row(name, out) for name, out in zip(names, finished)]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{args.steps} steps each; held-out loss: valid split, no smoothing; BLEU: {rows[0]['n']} test sentences, beam 4")
    print("| row | change | parameters | held-out loss | perplexity | BLEU | chrF | train min |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['change']} | {r['parameters']:,} | {r['valid_loss']:.3f} | "
              f"{math.exp(r['valid_loss']):.2f} | {r['bleu']:.2f} | {r['chrf']:.2f} | {r['train_minutes']} |")


if __name__ == "__main__":
    main()
