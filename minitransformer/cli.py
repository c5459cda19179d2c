"""The command line: ``minitransformer train | translate | evaluate | attention | average | data fetch``.

    minitransformer train                       # Tatoeba en→es, preset and time budget fit the machine
    minitransformer train --preset small --minutes 60 --out runs/small
    minitransformer translate --checkpoint runs/small "How are you?"
    minitransformer evaluate --checkpoint runs/small --split test
    minitransformer attention --checkpoint runs/small "I like cats." --out cats.png
    minitransformer average --checkpoint runs/small --last 5
    minitransformer data fetch --corpus spa

A run directory holds everything needed to use the model again: ``config.json`` (model, data and
training settings), ``tokenizer.model``, interval checkpoints ``checkpoint-<step>.npz``,
``last.npz``, ``bleu.json``, ``attention.png`` and ``losses.png``. A user mistake prints one line,
``minitransformer: error: …``, and exits 1 (2 for a bad command line); set MINITRANSFORMER_DEBUG=1
to see the traceback instead.
"""
import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import numpy as np

from .progress import LINE_EVERY_SECONDS

# Presets: the model (§3, Table 3), vocabulary and batching of a run, from a laptop to the paper.
# ``max_tokens`` is the per-side token budget of a batch (the paper's ≈25k, scaled down), ``warmup_steps``
# the Noam schedule's warm-up (§5.3; shorter than the paper's 4000 because these runs are short), and
# ``dropout`` is P_drop (§5.4). Parameter counts are with the preset's vocabulary (embeddings tied, §3.4).
PRESETS = {
    # 2+2 layers, 1.4M parameters: learns most in a few minutes of CPU (≈150 steps/min on one core).
    "tiny": dict(d_model=128, num_heads=4, num_layers=2, d_ff=512, dropout=0.1,
                 vocab_size=4000, max_tokens=2500, warmup_steps=400),
    # 3+3 layers, 7.6M parameters: 4–7× fewer tokens/s than tiny on a 2-core CPU; for an hour or more, or a GPU.
    "small": dict(d_model=256, num_heads=4, num_layers=3, d_ff=1024, dropout=0.1,
                  vocab_size=8000, max_tokens=4000, warmup_steps=1000),
    # The paper's base model (§3, Table 3 "base"): 6+6 layers, 52M parameters with this vocabulary.
    "base": dict(d_model=512, num_heads=8, num_layers=6, d_ff=2048, dropout=0.1,
                 vocab_size=16000, max_tokens=12000, warmup_steps=4000),
}
# What ``--preset auto`` picks on each device. On a 2-core CPU tiny trains 4–7× more tokens per second
# than small, which decides a run of minutes. On a GPU small trains 1,700–2,100 steps/min (H200, 2026-11-26)
# and reaches BLEU ≈32 after 1500 of them (docs/results.md); the default 30-minute GPU budget is not
# measured as a whole.
AUTO_PRESET = {"cpu": "tiny", "cuda": "small"}
# With neither --steps nor --minutes, the whole ``train`` command (data, training, final BLEU, plot)
# is planned to finish within this many minutes; training gets what data and evaluation leave.
DEFAULT_TOTAL_MINUTES = {"cpu": 14.0, "cuda": 30.0}
# Minutes kept back for the final evaluation (valid loss, test BLEU with beam search, attention plot).
EVAL_RESERVE_MINUTES = {"cpu": 2.0, "cuda": 3.0}
# Test sentences scored at the end of ``train`` (None: all). On the 2-core CPU, scoring all 2,762 after
# a 12-minute run took 19.5 s on an idle VM, but 500 took 0.4 min on a busy one (docs/results.md), so a
# fixed random sample keeps the command inside its time budget there.
DEFAULT_TEST_LIMIT = {"cpu": 500, "cuda": None}
# Interval checkpoints close enough together that the five kept ones average well (§6.1: the paper's last
# five, 10 minutes apart, spanned the last 7 % of a 12-hour run): with a step budget one every 5 % of it,
# else every this many steps (on the CPU ≈ 40 s of tiny; on a GPU ≈ 30 s of small, 91 MB each).
CHECKPOINT_EVERY = {"cpu": 100, "cuda": 1000}
# Settings of ``train`` that shape a run (model, vocabulary, batches, schedule, regularisation): given on
# the command line they override the preset; a resumed run keeps its own and refuses them.
RUN_SETTINGS = {"vocab_size": "--vocab-size", "max_tokens": "--max-tokens", "warmup_steps": "--warmup-steps",
                "dropout": "--dropout", "d_model": "--d-model", "num_heads": "--heads", "num_layers": "--layers",
                "d_ff": "--d-ff", "label_smoothing": "--label-smoothing", "positions": "--positions",
                "norm_first": "--norm-first"}
# The intervals of ``train`` a run picks from its budget (``_intervals``) unless --eval-every or
# --checkpoint-every gives them; config.json's "intervals_given" names those given, which a resume keeps.
INTERVALS = ("eval_every", "checkpoint_every")
MAX_LEN = 64           # sentence pairs longer than this many subword tokens are left out of training
SPLIT = dict(valid_size=0.02, test_size=0.02)

_PROG = "minitransformer"


class UserError(Exception):
    """A mistake in the command line, files or data: reported as one line, no traceback."""


# ---------------------------------------------------------------------------------------------------
# Run directories
# ---------------------------------------------------------------------------------------------------

def run_checkpoints(run_dir):
    """The readable checkpoints of a run directory (``checkpoint-*.npz`` and ``last.npz``) as
    ``(step, path)`` pairs in the order of the training step stored in each (read without its
    arrays), not of file times, which a copy (``cp -r``, rsync, unzip) changes. At equal steps an
    interval checkpoint comes before ``last.npz``; one without a step comes first. A checkpoint that
    cannot be read is left out with a one-line warning, unless none can be read: then its error is raised."""
    from .checkpoint import checkpoint_info
    run_dir = Path(run_dir)
    found, unreadable = [], []
    for path in [*sorted(run_dir.glob("checkpoint-*.npz")), run_dir / "last.npz"]:
        if not path.is_file():
            continue
        try:
            step = checkpoint_info(path)["meta"].get("step")
        except (ValueError, OSError) as e:
            unreadable.append(e)
            continue
        found.append((step if isinstance(step, int) else None, path))
    if unreadable and not found:
        raise unreadable[0]
    for e in unreadable:
        warnings.warn(f"{_one_line(e)}: skipped")
    return sorted(found, key=lambda c: -1 if c[0] is None else c[0])    # stable: last.npz after its step's twin


def latest_checkpoint(run_dir):
    """The checkpoint of ``run_dir`` with the highest training step (``last.npz`` on a tie), None if it
    has none. After a finished or interrupted run that is ``last.npz``; after a crash, the newest interval one."""
    found = run_checkpoints(run_dir)
    return found[-1][1] if found else None


def _run_paths(checkpoint):
    """``--checkpoint`` is a run directory or a ``.npz`` file inside one: (run_dir, checkpoint file)."""
    path = Path(checkpoint)
    if not path.exists():
        if path.suffix == ".npz":
            there = sorted(p.name for p in path.parent.glob("*.npz")) if path.parent.is_dir() else []
            raise UserError(f"{path}: no such checkpoint file"
                            + (f" ({path.parent} has {', '.join(there)})" if there else ""))
        raise UserError(f"{path}: no such run directory")
    if path.is_file():
        if path.suffix != ".npz":
            raise UserError(f"{path}: expected a run directory or a .npz checkpoint")
        return path.parent, path
    found = latest_checkpoint(path)
    if found is None:
        raise UserError(f"{path}: no checkpoint in this directory (expected last.npz or checkpoint-*.npz)")
    return path, found


def _read_config(run_dir):
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).exists():
        raise UserError(f"{run_dir}: no such directory")
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object of the run's settings, found a {type(config).__name__}")
    return config


def _stored(config, run_dir, key):
    """``config[key]``, or a one-line error naming the run's config.json that lacks it."""
    if key not in config:
        raise UserError(f"{Path(run_dir) / 'config.json'} lacks \"{key}\" (not written by `{_PROG} train`, "
                        f"or edited): the run's settings are incomplete")
    return config[key]


def _read_tokenizer(run_dir):
    from .data import Tokenizer
    path = Path(run_dir) / "tokenizer.model"
    if not path.is_file():
        raise UserError(f"{run_dir}: no tokenizer.model")
    try:
        return Tokenizer.load(path)
    except RuntimeError as e:   # sentencepiece: not a model file
        raise UserError(f"{path}: not a sentencepiece model ({str(e).strip().splitlines()[-1]})") from None


def load_run(checkpoint, device="cpu", announce=False):
    """Rebuild a trained model from a run directory: returns ``(model, tokenizer, config, checkpoint path)``.
    ``announce``: say on stderr which checkpoint file (and step) that is."""
    from .checkpoint import read_checkpoint
    from .nn.transformer import Transformer
    run_dir, ckpt = _run_paths(checkpoint)
    config = _read_config(run_dir)
    tokenizer = _read_tokenizer(run_dir)
    arrays, info = read_checkpoint(ckpt)
    if announce:
        step = (info.get("meta") or {}).get("step")
        print(f"using {ckpt}" + (f" (step {step})" if step is not None else ""), file=sys.stderr, flush=True)
    model_config = info.get("config") or config.get("model")
    if not model_config:
        raise UserError(f"{ckpt}: holds no model configuration")
    if model_config["vocab_size"] != tokenizer.vocab_size:
        raise UserError(f"{ckpt} was trained with a vocabulary of {model_config['vocab_size']} pieces but "
                        f"{run_dir / 'tokenizer.model'} has {tokenizer.vocab_size}: they are not from the same run")
    model = Transformer.from_config(model_config)
    model.load_state_dict({k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")})
    model.to(device)
    model.eval()
    return model, tokenizer, config, ckpt


def _new_run_dir(root="runs"):
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path, n = Path(root) / stamp, 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}_{n}"
    return path


# ---------------------------------------------------------------------------------------------------
# Data: the same splits at training and at evaluation time
# ---------------------------------------------------------------------------------------------------

def _corpus_names():
    from .data import CORPORA
    return ", ".join(f"{name} ({info.description})" for name, info in CORPORA.items())


def _data_path(data, progress):
    """A TSV path, a corpus name (spa, ukr) or None (spa), as a path to a file."""
    from .data import CORPORA, fetch_corpus
    if data is None or (str(data) in CORPORA and not Path(data).exists()):
        return fetch_corpus(str(data or "spa"), progress=progress)
    path = Path(data)
    if path.is_dir():
        raise UserError(f"--data {data}: is a directory; --data takes a source<TAB>target file or a corpus "
                        f"name: {_corpus_names()}")
    if not path.exists():
        raise UserError(f"--data {data}: no such file, and not a corpus name: {_corpus_names()}")
    return path


def _same_file(a, b):
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _intervals(steps, device):
    """``(eval_every, checkpoint_every)`` a run picks itself: five validations and twenty checkpoints over
    a step budget (the last five close together, for averaging, §6.1); fixed ones for a time budget."""
    return (max(steps // 5, 1) if steps else 250,
            max(steps // 20, 1) if steps else CHECKPOINT_EVERY[device])


def run_splits(settings, data=None, progress=False, same_corpus=False):
    """Re-derive train/valid/test from the data settings stored in config.json (same seed, same
    sizes, same limit), optionally from another copy of the file (``data``, which is warned about
    when it is not the stored file). A run records its file's sha256: a file with other contents is
    refused with ``same_corpus`` (a resumed run trains on its own corpus), else warned about."""
    from .data import CORPORA, file_sha256, read_pairs, split_pairs
    stored = settings.get("path")
    if data is None:
        if stored is None:
            raise UserError("the run's config.json records no data file: pass it with --data PATH")
        if stored not in CORPORA and not Path(stored).is_file():
            name = Path(stored).stem
            again = f", or --data {name} for the corpus {name} (downloaded again if needed)" if name in CORPORA else ""
            raise UserError(f"{stored}: the run's data file (recorded in its config.json) is not there any more; "
                            f"if it moved, pass where it is now with --data NEWPATH{again}")
        path = _data_path(stored, progress)
    else:
        path = _data_path(data, progress)
        if stored is not None and not _same_file(path, stored) and "sha256" not in settings:   # older runs
            if Path(stored).exists():
                warnings.warn(f"--data {data} is not the run's data file ({stored}, recorded in its config.json): "
                              f"the splits are re-derived from it, the run's own only if it holds the same lines")
            else:
                warnings.warn(f"--data {data} stands in for the run's data file {stored}, which is not there any "
                              f"more: the splits are the run's own only if it is the same file, moved")
    if "sha256" in settings and file_sha256(Path(path)) != settings["sha256"]:
        what = f"--data {data}" if data is not None else f"the run's data file {stored}"
        if same_corpus:
            raise UserError(f"{what} holds other lines than the file the run was started on (its sha256 differs "
                            f"from the one in config.json): a resumed run trains on its own corpus; start a new "
                            f"run with another --out for this one")
        warnings.warn(f"{what} holds other lines than the file the run was started on (its sha256 differs from "
                      f"the one in config.json): its splits are not the run's own")
    pairs = read_pairs(path, reverse=settings.get("reverse", False))[:settings.get("limit")]
    return split_pairs(pairs, valid_size=settings.get("valid_size", SPLIT["valid_size"]),
                       test_size=settings.get("test_size", SPLIT["test_size"]), seed=settings.get("split_seed", 0))


def _encode(tokenizer, pairs, max_len=MAX_LEN):
    from .data import filter_by_length
    src = tokenizer.encode_batch(s for s, _ in pairs)
    tgt = tokenizer.encode_batch(t for _, t in pairs)
    kept = filter_by_length(src, tgt, max_len)
    return [src[i] for i in kept], [tgt[i] for i in kept]


def sample_pairs(pairs, limit, seed=0):
    """A fixed random subset of ``limit`` pairs (all when ``limit`` is None or not smaller), in their
    original order. Tatoeba's file is sorted by length, so the first N pairs would be the shortest."""
    if limit is None or limit >= len(pairs):
        return list(pairs)
    keep = np.sort(np.random.default_rng(seed).choice(len(pairs), size=limit, replace=False))
    return [pairs[i] for i in keep]


# ---------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------

def _say(msg):
    print(msg, flush=True)


def _fmt_minutes(seconds):
    return f"{seconds / 60:.1f} min"


def cmd_train(args):
    from . import backend
    from .checkpoint import checkpoint_config, checkpoint_info, write_json
    from .data import TokenBatcher, file_sha256, prepare_corpus
    from .evaluate import translate
    from .nn.transformer import Transformer
    from .train import TrainConfig, Trainer

    started = time.perf_counter()
    device = _device(args.device)
    progress = not args.no_progress
    out = Path(args.out) if args.out else _new_run_dir()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; --out takes a run directory (a new one, or with --resume the run "
                        f"to continue)")
    if args.tf32:
        if device != "cuda":
            raise UserError("--tf32 is a GPU setting (TF32 matmuls on tensor cores): use it with --device cuda")
        backend.set_tf32(True)
    if args.cuda_graph and device != "cuda":
        raise UserError("--cuda-graph is a GPU setting (each step replayed as a CUDA graph): use it with --device cuda")

    # ---- settings: fresh, or from the run being resumed ----------------------------------------
    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out DIR, the run directory to continue")
        config = _read_config(out)
        changed = _changed_settings(args, config, out)
        if changed:
            raise UserError(f"--resume continues {out} with the settings it was started with; "
                            f"{', '.join(changed)} cannot change (start a new run with another --out)")
        preset_name, preset = _stored(config, out, "preset"), _stored(config, out, "preset_settings")
        data_settings, seed, stored_train = _stored(config, out, "data"), _stored(config, out, "seed"), \
            _stored(config, out, "train")
        tcfg = TrainConfig(**{**stored_train, "betas": tuple(stored_train["betas"])})
        intervals_given = config.get("intervals_given")     # None: a run from before this record
        if args.steps is not None or args.minutes is not None:   # a new total budget
            # intervals the run chose itself (5 % and 20 % of a 60-step trial: every 3 and 12 steps) follow
            # the new budget, as a new run of it would pick them; ones the user gave stay. An older run
            # names none given: an interval is its own choice if it equals what the old budget picked
            automatic = _intervals(tcfg.steps, config.get("device", device))
            tcfg.steps, tcfg.minutes = args.steps or 0, args.minutes or 0.0
            for key, old, new in zip(INTERVALS, automatic, _intervals(tcfg.steps, device)):
                if (key not in intervals_given) if intervals_given is not None else getattr(tcfg, key) == old:
                    setattr(tcfg, key, new)
        tcfg.cuda_graph = tcfg.cuda_graph or args.cuda_graph
        checkpoints = run_checkpoints(out)
        if not checkpoints:
            raise UserError(f"{out}: nothing to resume (no last.npz or checkpoint-*.npz)")
        start_step, ckpt = checkpoints[-1]
        elapsed = checkpoint_info(ckpt)["meta"].get("elapsed") or 0.0
        spent = ([f"already at step {start_step} of {tcfg.steps}; pass a larger --steps"]
                 if tcfg.steps and start_step is not None and start_step >= tcfg.steps else []) + \
                ([f"already trained {elapsed / 60:.2f} of {tcfg.minutes:g} minutes; pass a larger --minutes"]
                 if tcfg.minutes and elapsed >= tcfg.minutes * 60 else [])
        if spent:   # nothing to train: leave the run's bleu.json and plots as they are
            raise UserError(f"{out} is {' and '.join(spent)} (with --resume the budgets are totals, counting "
                            f"the steps and minutes the run already has)")
        _say(f"resuming {out} from {ckpt.name} (step {start_step}) on {device}")
        tokenizer = _read_tokenizer(out)
        # --data: the same file, moved (another corpus is refused)
        splits = run_splits(data_settings, data=args.data, progress=progress, same_corpus=True)
        ids = {name: _encode(tokenizer, pairs, data_settings.get("max_len", MAX_LEN)) for name, pairs in splits.items()}
        model_config = checkpoint_config(ckpt)
        if model_config["vocab_size"] != tokenizer.vocab_size:
            raise UserError(f"{ckpt} has a vocabulary of {model_config['vocab_size']} but "
                            f"{out / 'tokenizer.model'} has {tokenizer.vocab_size}")
        backend.manual_seed(seed)
        model = Transformer.from_config(model_config)
    else:
        if out.exists() and any(out.glob("*.npz")):
            raise UserError(f"{out} already holds checkpoints: continue it with --resume --out {out}, "
                            f"or choose another --out")
        preset_name = AUTO_PRESET[device] if args.preset == "auto" else args.preset
        preset = dict(PRESETS[preset_name])
        for key in RUN_SETTINGS:
            if key in preset and getattr(args, key) is not None:
                preset[key] = getattr(args, key)
        if preset["d_model"] % preset["num_heads"]:
            raise UserError(f"{preset['num_heads']} heads do not divide d_model {preset['d_model']} "
                            f"(each head gets d_model / h dimensions, §3.2.2): choose --heads or --d-model to fit")
        seed = 0 if args.seed is None else args.seed
        split_seed = 0 if args.split_seed is None else args.split_seed
        data_path = _data_path(args.data, progress)
        # the file's sha256: a resume or evaluate given another file (or this one changed) can tell
        data_settings = dict(path=str(Path(data_path).resolve()), sha256=file_sha256(Path(data_path)),
                             reverse=args.reverse, split_seed=split_seed, vocab_size=preset["vocab_size"],
                             limit=args.limit, max_len=MAX_LEN, **SPLIT)
        _say(f"preparing {data_path} ({'target→source' if args.reverse else 'source→target'}, "
             f"a vocabulary of up to {preset['vocab_size']} pieces) …")
        corpus = prepare_corpus(data_path, reverse=args.reverse, vocab_size=preset["vocab_size"], max_len=MAX_LEN,
                                seed=split_seed, limit=args.limit, progress=progress, **SPLIT)
        tokenizer, splits, ids = corpus.tokenizer, corpus.splits, corpus.ids
        data_settings["vocab_size_actual"] = tokenizer.vocab_size
        backend.manual_seed(seed)
        model = Transformer(tokenizer.vocab_size, d_model=preset["d_model"], num_heads=preset["num_heads"],
                            num_layers=preset["num_layers"], d_ff=preset["d_ff"], dropout=preset["dropout"],
                            learned_positions=args.positions == "learned", norm_first=bool(args.norm_first))
        tcfg = TrainConfig(warmup_steps=preset["warmup_steps"], steps=args.steps or 0, minutes=args.minutes or 0.0,
                           cuda_graph=args.cuda_graph)
        if args.label_smoothing is not None:
            tcfg.label_smoothing = args.label_smoothing
    model.to(device)

    given_now = [key for key in INTERVALS if getattr(args, key) is not None]
    for key in given_now:
        setattr(tcfg, key, getattr(args, key))
    if not args.resume:
        intervals_given = given_now
    elif intervals_given is not None:
        intervals_given = [key for key in INTERVALS if key in intervals_given or key in given_now]
    auto_budget = not (tcfg.steps or tcfg.minutes)
    if auto_budget:   # fit the whole command into DEFAULT_TOTAL_MINUTES
        left = DEFAULT_TOTAL_MINUTES[device] * 60 - (time.perf_counter() - started)
        tcfg.minutes = round(max(left / 60 - EVAL_RESERVE_MINUTES[device], 0.5), 2)
    if not args.resume:
        eval_every, checkpoint_every = _intervals(tcfg.steps, device)
        if args.eval_every is None:
            tcfg.eval_every = eval_every
        if args.checkpoint_every is None:
            tcfg.checkpoint_every = checkpoint_every

    n_train = len(ids["train"][0])
    if n_train == 0:
        raise UserError("no training pairs left after splitting and length filtering: use more data")
    train_batches = TokenBatcher(*ids["train"], max_tokens=preset["max_tokens"], seed=seed)
    valid_batches = list(TokenBatcher(*ids["valid"], max_tokens=preset["max_tokens"], shuffle=False).epoch(0)) \
        if ids["valid"][0] else None
    shown_from = splits["valid"] or splits["train"]     # three sentences of varied length (the file is sorted)
    show = [shown_from[int(q * (len(shown_from) - 1))] for q in (0.3, 0.6, 0.9)]

    def on_eval(trainer):
        hyps = translate(model, tokenizer, [s for s, _ in show], beam_size=1)
        return {"samples": [f"{s}  →  {h}   (reference: {r})" for (s, r), h in zip(show, hyps)]}

    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        tokenizer.save(out / "tokenizer.model")
        config = {"preset": preset_name, "preset_settings": preset, "model": asdict(model.config),
                  "data": data_settings, "train": asdict(tcfg), "intervals_given": intervals_given,
                  "seed": seed, "device": device, "tf32": args.tf32,
                  "command": " ".join([_PROG, *sys.argv[1:]]), "created": datetime.now().isoformat(timespec="seconds")}
        write_json(out / "config.json", config)
    else:   # a new budget or interval: the next --resume's
        updated = {**config, "train": asdict(tcfg)}
        if intervals_given is not None:
            updated["intervals_given"] = intervals_given
        if json.loads(json.dumps(updated)) != config:
            write_json(out / "config.json", updated)

    trainer = Trainer(model, lambda e: list(train_batches.epoch(e)), tcfg, out_dir=out, valid_batches=valid_batches,
                      on_eval=on_eval, progress=progress)
    if args.resume:   # the budgets are the run's totals
        trainer.resume(ckpt)
        budget = " or ".join(([f"to step {tcfg.steps}"] if tcfg.steps else []) +
                             ([f"to {tcfg.minutes:g} min in all"] if tcfg.minutes else []))
        budget += f" (from step {trainer.step}" + (f", {_fmt_minutes(trainer.elapsed)}" if tcfg.minutes else "") + ")"
    else:
        steps = f"{tcfg.steps} step{'s' if tcfg.steps != 1 else ''}"
        budget = "for " + " and ".join(([steps] if tcfg.steps else []) +
                                       ([f"{tcfg.minutes:g} min"] if tcfg.minutes else []))
    heads = model.config.num_heads
    _say(f"run directory {out}\n"
         f"model: preset {preset_name} (d_model {model.config.d_model}, {heads} head{'s' if heads != 1 else ''}, "
         f"{model.config.num_layers}+{model.config.num_layers} layers, d_ff {model.config.d_ff}"
         f"{', learned positions' if model.config.learned_positions else ''}"
         f"{', pre-LN' if model.config.norm_first else ''}, P_drop {model.config.dropout:g}, "
         f"eps_ls {tcfg.label_smoothing:g}), "
         f"{model.num_parameters():,} parameters, vocabulary {tokenizer.vocab_size}"
         + (f" (the training text holds too few pieces for {preset['vocab_size']})"
            if tokenizer.vocab_size < preset["vocab_size"] else "") + f", on {device}\n"
         f"data: {n_train:,} training pairs in {len(train_batches)} batch{'es' * (len(train_batches) != 1)} "
         f"of ≤{preset['max_tokens']} tokens, "
         f"{len(ids['valid'][0]):,} valid, {len(splits['test']):,} test\n"
         f"training {budget}" + (f" (so that the whole command ends within {DEFAULT_TOTAL_MINUTES[device]:g} min; "
                                 f"--steps or --minutes choose another budget)" if auto_budget else ""))
    try:
        trainer.run()
    except KeyboardInterrupt:
        print(f"\n{_after_interrupt(out, trainer)}", file=sys.stderr, flush=True)
        return 130
    _say(f"trained {trainer.step} steps in {_fmt_minutes(trainer.elapsed)} "
         f"({60 * trainer.step / max(trainer.elapsed, 1e-9):.0f} steps/min overall)"
         + (f", final training loss {trainer.losses[-1][1]:.3f}" if trainer.losses else ""))
    graphs = getattr(trainer.step_function, "captures", None)
    if graphs is not None:
        _say(f"CUDA graphs: {graphs} batch shapes captured, {trainer.step_function.replays} steps replayed")

    try:
        return _final_evaluation(args, out, device, model, tokenizer, splits, valid_batches, show, trainer, started)
    except KeyboardInterrupt:
        print(f"\ninterrupted during the final evaluation; the trained model is saved in {out / 'last.npz'}\n"
              f"score it with:  {_PROG} evaluate --checkpoint {out}", file=sys.stderr, flush=True)
        return 130


def _changed_settings(args, config, run_dir):
    """The settings given with ``train --resume`` that differ from those the run was started with, as
    ``"--heads 2 (the run has 4)"``. A value equal to the stored one is no change: the original command
    with ``--resume`` added is accepted. The seeds count too: --seed orders the batches of the epochs
    still to come, and --split-seed decides which sentences are test data, so another one would score
    the model on sentences it trained on."""
    preset = _stored(config, run_dir, "preset_settings")
    data, model, train = _stored(config, run_dir, "data"), config.get("model") or {}, config.get("train") or {}
    stored = {"preset": _stored(config, run_dir, "preset"), "limit": data.get("limit"),
              "reverse": bool(data.get("reverse")), **{key: preset.get(key) for key in RUN_SETTINGS},
              "label_smoothing": train.get("label_smoothing"), "norm_first": bool(model.get("norm_first")),
              "positions": "learned" if model.get("learned_positions") else "sinusoidal",
              "seed": _stored(config, run_dir, "seed"), "split_seed": data.get("split_seed", 0)}  # 0: as run_splits
    given = [("reverse", "--reverse", args.reverse or None),       # None: not given
             ("preset", "--preset", None if args.preset == "auto" else args.preset),
             ("limit", "--limit", args.limit),
             ("seed", "--seed", args.seed), ("split_seed", "--split-seed", args.split_seed),
             *((key, flag, getattr(args, key)) for key, flag in RUN_SETTINGS.items())]
    changed = []
    for key, flag, value in given:
        if value is None or value == stored[key]:
            continue
        changed.append(f"{flag} (the run was started without it)" if value is True
                       else f"{flag} {value} (the run has {'none' if stored[key] is None else stored[key]})")
    return changed


def _after_interrupt(out, trainer):
    """What a stopped ``train`` says: ``last.npz`` if the trainer wrote it (``Trainer.saved``), else the
    latest checkpoint the folder has."""
    step, last = trainer.step, out / "last.npz"
    if trainer.saved is not None:
        return f"interrupted at step {step}; saved {trainer.saved}\ncontinue with:  {_PROG} train --resume --out {out}"
    try:
        found = run_checkpoints(out)
    except (ValueError, OSError):
        found = []
    if found:
        saved_step, saved = found[-1]
        return (f"interrupted at step {step}; {last} was not saved at that step, the latest checkpoint is {saved} "
                f"(step {saved_step})\ncontinue from it with:  {_PROG} train --resume --out {out}")
    return f"interrupted at step {step}; no checkpoint was saved in {out}: start the run again to train it"


def _final_evaluation(args, out, device, model, tokenizer, splits, valid_batches, show, trainer, started):
    """Validation loss, test BLEU (bleu.json), the attention maps of one test sentence (attention.png) and
    the loss curves (losses.png)."""
    from .checkpoint import write_json
    from .evaluate import attention_maps, bleu
    from .train import evaluate_loss
    from .viz import plot_all_attention, plot_losses, save_figure

    results = {}
    if valid_batches:
        results["valid_loss"] = evaluate_loss(model, valid_batches)
        _say(f"validation loss {results['valid_loss']:.3f} (perplexity {np.exp(results['valid_loss']):.1f})")
    test = splits["test"]
    limit = DEFAULT_TEST_LIMIT[device] if args.test_limit is None else (args.test_limit or None)
    scored = sample_pairs(test, limit)
    if scored:
        capped = len(scored) < len(test)
        note = f"{len(scored)} of {len(test)} test sentences" if capped else f"all {len(test)} test sentences"
        _say(f"translating {note} with beam {args.beam} …"
             + (f" (a fixed random sample, so that the command keeps to its time budget on {device}; "
                f"`{_PROG} evaluate --checkpoint {out}` scores all of it)" if capped else ""))
        t = time.perf_counter()
        results.update(bleu(model, tokenizer, scored, beam_size=args.beam, progress=not args.no_progress))
        results.update(split="test", limit=limit, total=len(test), checkpoint=str(out / "last.npz"),
                       step=trainer.step, decode_seconds=round(time.perf_counter() - t, 1))
        write_json(out / "bleu.json", results)
        _say(f"test BLEU {results['bleu']:.2f}  chrF {results['chrf']:.2f}  on {note}\n"
             f"  BLEU signature: {results['signature']}\n  chrF signature: {results['chrf_signature']}")
        for s in results["samples"]:
            _say(f"  {s['src']}  →  {s['hyp']}   (reference: {s['ref']})")
        example = sorted((s for s, _ in scored), key=len)[len(scored) // 2]     # a sentence of median length
    else:
        _say("no test sentences: skipping BLEU")
        example = show[0][0]
    maps = attention_maps(model, tokenizer, example)
    fig = plot_all_attention(maps["enc_self"], maps["dec_self"], maps["cross"], maps["src_tokens"],
                             maps["tgt_tokens"], out / "attention.png",
                             title=f"{example}  →  {maps['translation']}")
    del fig
    curves = loss_curves(trainer, results.get("valid_loss"))
    if curves:
        fig = plot_losses(curves, title=f"{out.name}: loss per target token", smooth=10)
        save_figure(fig, out / "losses.png")
    _say(f"checkpoint:     {out / 'last.npz'}\n"
         + (f"bleu:           {out / 'bleu.json'}\n" if scored else "")
         + f"attention maps: {out / 'attention.png'}\n"
         + (f"loss curves:    {out / 'losses.png'}\n" if curves else "")
         + f"total time:     {_fmt_minutes(time.perf_counter() - started)}\n"
         f"try:  {_PROG} translate --checkpoint {out} \"{example}\"")
    return 0


def loss_curves(trainer, final_valid_loss=None):
    """A run's loss curves for ``viz.plot_losses``: the training loss as the trainer read it every
    ``log_every`` steps (one batch's, label-smoothed and with dropout: not on the validation loss's
    footing), and the validation loss (plain cross-entropy) at every evaluation plus
    ``final_valid_loss`` at the last step. Curves without points are left out."""
    smoothing = trainer.config.label_smoothing
    valid = [(r["step"], r["valid_loss"]) for r in trainer.history if "valid_loss" in r]
    if final_valid_loss is not None and not (valid and valid[-1][0] == trainer.step):
        valid.append((trainer.step, final_valid_loss))
    train_name = f"training (label smoothing {smoothing:g})" if smoothing else "training"
    return {name: points for name, points in [(train_name, trainer.losses), ("validation", valid)] if points}


# ---------------------------------------------------------------------------------------------------
# translate, evaluate, attention, average, data fetch
# ---------------------------------------------------------------------------------------------------

def _device(name):
    from .backend import check_device, cuda_is_available
    if name == "auto":
        return "cuda" if cuda_is_available() else "cpu"
    return check_device(name)


def _decode_device(args):
    device = _device(args.device)
    if args.cuda_graph and device != "cuda":
        raise UserError("--cuda-graph is a GPU setting (each decoding step replayed as a CUDA graph): "
                        "use it with --device cuda")
    return device


def _warn_if_cut(tokenizer, texts, names, limit):
    """One warning for all ``texts`` longer than ``limit`` tokens, which ``translate`` cuts to their start."""
    if limit is None:
        return
    long = [(name, n) for name, n in zip(names, map(len, tokenizer.encode_batch(texts))) if n > limit]
    if long:
        shown = ", ".join(f"{name}: {n}" for name, n in long[:3]) + (", …" if len(long) > 3 else "")
        what = "the input is" if len(texts) == 1 else f"{len(long)} of the inputs are"
        warnings.warn(f"{what} longer than the model takes ({shown} tokens): translated from the first {limit} "
                      f"tokens only")


def _text_argument(words, command):
    """The TEXT words of the command line as one sentence, joined by spaces."""
    text = " ".join(words).strip()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:   # bytes that are not UTF-8 reach argv as lone surrogates
        raise UserError(f"{command}: TEXT is not valid UTF-8 text") from None
    return text


def _utf8_line(raw, n):
    """Line ``n`` of standard input as text (UTF-8; a byte-order mark on line 1 is dropped)."""
    try:
        return raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise UserError(f"standard input, line {n}: not valid UTF-8 (byte {raw[e.start]:#04x} at byte {e.start + 1} "
                        f"of the line); convert it first, e.g. iconv -f latin1 -t utf-8") from None


def cmd_translate(args):
    from .evaluate import source_limit, translate
    model, tokenizer, _, _ = load_run(args.checkpoint, _decode_device(args), announce=True)
    limit = source_limit(model)

    def run(texts, names):
        texts = [t.strip() for t in texts]
        _warn_if_cut(tokenizer, texts, names, limit)
        return translate(model, tokenizer, texts, beam_size=args.beam, alpha=args.alpha, batch_size=args.batch_size,
                         max_src_len=limit, cuda_graph=args.cuda_graph)
    if args.text:   # the words of one sentence, quoted or not (as attention takes them)
        if len(args.text) > 1 and any(" " in t.strip() for t in args.text):
            print("note: the TEXT arguments are translated as one sentence; give several sentences one a line on "
                  "standard input", file=sys.stderr, flush=True)
        print(run([_text_argument(args.text, "translate")], ["TEXT"])[0], flush=True)
        return 0
    if sys.stdin.isatty():   # someone typing: answer each line as it comes
        print("type a sentence and press Enter; Ctrl-D (Ctrl-Z Enter on Windows) ends", file=sys.stderr, flush=True)
        for n, raw in enumerate(sys.stdin.buffer, 1):
            try:
                line = _utf8_line(raw, n)
            except UserError as e:
                print(f"{_PROG}: warning: {e}: skipped", file=sys.stderr, flush=True)
                continue
            print(run([line], [f"line {n}"])[0], flush=True)
        return 0
    texts = [_utf8_line(raw, n) for n, raw in enumerate(sys.stdin.buffer, 1)]   # a file: in batches
    for line in run(texts, [f"line {n}" for n in range(1, len(texts) + 1)]):
        print(line, flush=False)
    sys.stdout.flush()
    return 0


def cmd_evaluate(args):
    from .evaluate import bleu
    model, tokenizer, config, ckpt = load_run(args.checkpoint, _decode_device(args), announce=True)
    run_dir = ckpt.parent
    splits = run_splits(_stored(config, run_dir, "data"), data=args.data, progress=not args.no_progress)
    pairs = sample_pairs(splits[args.split], args.limit)
    if not pairs:
        raise UserError(f"the {args.split} split is empty (the data was too small to hold any sentences out): "
                        f"score another split with --split train or --split valid, or train on more data")
    what = f"{len(pairs)} of {len(splits[args.split])}" if len(pairs) < len(splits[args.split]) \
        else f"all {len(pairs)}"
    print(f"translating {what} {args.split} sentences with beam {args.beam} …", file=sys.stderr, flush=True)
    r = bleu(model, tokenizer, pairs, beam_size=args.beam, batch_size=args.batch_size, progress=not args.no_progress,
             cuda_graph=args.cuda_graph)
    print(f"BLEU = {r['bleu']:.2f}  ({r['signature']})\nchrF = {r['chrf']:.2f}  ({r['chrf_signature']})\n"
          f"{args.split}: {what} sentences, beam {args.beam}, {ckpt}")
    return 0


def _figure_path(out):
    """``--out`` of ``attention``: no suffix gets ``.png``; a suffix matplotlib cannot write is refused."""
    from matplotlib.figure import Figure
    out = Path(out)
    if not out.suffix:
        return out.with_suffix(".png")
    formats = Figure().canvas.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        raise UserError(f"--out {out}: matplotlib cannot write {out.suffix} files; use one of "
                        f"{', '.join('.' + f for f in sorted(formats))}")
    return out


def cmd_attention(args):
    from .evaluate import attention_maps, source_limit
    from .viz import plot_all_attention
    args.out = _figure_path(args.out)           # before the model loads: a bad name costs nothing
    model, tokenizer, _, _ = load_run(args.checkpoint, _device(args.device), announce=True)
    N = model.config.num_layers
    if args.layers and not all(-N <= i < N for i in args.layers):
        raise UserError(f"--layers: the model has {N} layers (1 to {N}, or -1 to -{N} from the last)")
    text = _text_argument(args.text, "attention")
    n, limit = len(tokenizer.encode(text)), source_limit(model)
    if n == 0:
        raise UserError("attention: the text is empty: give the sentence whose attention to plot as TEXT")
    if limit is not None and n > limit:
        raise UserError(f"attention: the text is {n} tokens long; the longest this model can plot is {limit} "
                        f"tokens (its {model.config.max_len} positions must also hold the translation): shorten it")
    maps = attention_maps(model, tokenizer, text)
    plot_all_attention(maps["enc_self"], maps["dec_self"], maps["cross"], maps["src_tokens"], maps["tgt_tokens"],
                       args.out, title=f"{text}  →  {maps['translation']}", layers=args.layers)
    print(f"{maps['translation']}\n{args.out}")
    return 0


def cmd_average(args):
    """§6.1: one model whose parameters are the mean of the run's last N checkpoints."""
    from .checkpoint import average_checkpoints, checkpoint_info, save_checkpoint
    from .nn.transformer import Transformer
    run_dir = Path(args.checkpoint)
    if args.last < 2:
        raise UserError(f"--last {args.last}: averaging needs two or more checkpoints")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: expected a run directory (its last.npz and checkpoint-*.npz are averaged)")
    by_step = {}
    for step, path in run_checkpoints(run_dir):   # in the order of steps; an interval one wins a tie
        by_step.setdefault(step, path)
    steps = sorted(s for s in by_step if s is not None)[-args.last:]
    if len(steps) < 2:
        raise UserError(f"{run_dir}: {'no checkpoint' if not steps else 'one checkpoint'} to average, two or more "
                        f"needed (train writes one every --checkpoint-every steps, and last.npz at the end)")
    paths = [by_step[s] for s in steps]
    config = checkpoint_info(paths[-1])["config"]
    model = Transformer.from_config(config)
    model.load_state_dict(average_checkpoints(paths))
    out = run_dir / f"average-of-{len(paths)}.npz"   # beside config.json and tokenizer.model, which it needs
    save_checkpoint(out, model, meta={"step": steps[-1], "averaged": [p.name for p in paths], "steps": steps})
    fewer = f" (the run has {len(steps)}, not {args.last})" if len(steps) < args.last else ""
    print(f"averaged the checkpoints of steps {', '.join(map(str, steps))}{fewer}\n{out}\n"
          f"score it with:  {_PROG} evaluate --checkpoint {out}")
    return 0


def cmd_data_fetch(args):
    from .data import CORPORA, fetch_corpus, read_pairs
    path = fetch_corpus(args.corpus, progress=not args.no_progress)
    n = len(read_pairs(path))
    print(f"{path}\n{n} sentence pairs ({CORPORA[args.corpus].description}; {CORPORA[args.corpus].licence})")
    return 0


# ---------------------------------------------------------------------------------------------------
# Argument parsing and the one place errors become one line
# ---------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A bad command line: one line (and exit 2) instead of the usage block."""
        self.exit(2, f"{_PROG}: error: {message} (see: {self.prog} --help)\n")


def _number_type(name, convert, accept):
    """An argparse ``type``: ``convert(text)`` when ``accept`` takes it, else "expected NAME, got TEXT".
    Its ``__name__`` ("positive integer") is what argparse names it by in a message of its own."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {name}, got {text}")
        return value
    parse.__name__ = name.split(" ", 1)[1]
    return parse


_positive_int = _number_type("a positive integer", int, lambda v: v >= 1)
_nonnegative_int = _number_type("an integer >= 0", int, lambda v: v >= 0)
_probability = _number_type("a number in [0, 1)", float, lambda v: 0 <= v < 1)
_positive_float = _number_type("a positive number", float, lambda v: v > 0)
_nonnegative_float = _number_type("a finite number >= 0", float, lambda v: 0 <= v < math.inf)


def _package_version():
    """The installed distribution's version; the package's ``__version__`` when run from a checkout
    that is not installed."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(_PROG)
    except PackageNotFoundError:
        from . import __version__
        return __version__


def _layer_numbers(text):
    """``1,-1`` → list indices ``[0, -1]``: layers as the figure names them, or from the end."""
    try:
        numbers = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers such as 1,-1, got {text}") from None
    if 0 in numbers:
        raise argparse.ArgumentTypeError(f"layers are counted from 1 (or -1 for the last), got {text}")
    return [n - 1 if n > 0 else n for n in numbers]


def build_parser():
    p = _Parser(prog=_PROG, description='The Transformer of "Attention Is All You Need" on NumPy/CuPy: '
                                          "train an English→Spanish translator and use it.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train a translator (defaults: Tatoeba en→es, preset and time budget "
                                     "chosen for this machine)",
                       description="Train a model and write a run directory. With no options: the Tatoeba "
                                   "English–Spanish corpus, the preset that suits the device, and a time budget "
                                   f"so the whole command ends within {DEFAULT_TOTAL_MINUTES['cpu']:g} minutes on a "
                                   "CPU (including the final test BLEU and the attention plot).")
    t.add_argument("--data", help="source<TAB>target TSV file, or a corpus name (spa, ukr); default: spa, "
                                  "downloaded and cached on first use (with --resume: where the run's file is now)")
    t.add_argument("--reverse", action="store_true", help="swap the columns (e.g. Spanish→English)")
    t.add_argument("--preset", default="auto", choices=[*PRESETS, "auto"],
                   help=f"model size (default auto: {AUTO_PRESET['cpu']} on cpu, {AUTO_PRESET['cuda']} on cuda)")
    t.add_argument("--steps", type=_positive_int, metavar="N",
                   help="stop after N updates (with --resume: the run's total, counting the steps it has)")
    t.add_argument("--minutes", type=_positive_float, metavar="M",
                   help="stop after M minutes of training (with --resume: the run's total)")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to train (default auto: cuda if CuPy finds a GPU, else cpu)")
    t.add_argument("--out", help="run directory (default runs/<timestamp>)")
    # no argparse default: None is "not given", so that --resume refuses only a seed the user passed;
    # --seed >= 0 because NumPy's generators take no negative seed (refused here, not after the data is
    # prepared); the split seed only goes into a hash, so any int splits
    t.add_argument("--seed", type=_nonnegative_int,
                   help="parameter initialisation, dropout and batch order (default 0; with --resume, the run's)")
    t.add_argument("--split-seed", type=int,
                   help="which sentences go to valid/test (default 0; with --resume, the run's)")
    t.add_argument("--max-tokens", type=_positive_int, help="tokens per batch and side (default: the preset's)")
    t.add_argument("--vocab-size", type=_positive_int, help="BPE vocabulary size (default: the preset's)")
    t.add_argument("--warmup-steps", type=_positive_int, help="Noam warm-up steps (default: the preset's)")
    t.add_argument("--dropout", type=_probability, metavar="P", help="P_drop, §5.4 (default: the preset's)")
    # Table 3's variations (§6.2), each overriding the preset
    t.add_argument("--d-model", type=_positive_int, help="d_model (default: the preset's)")
    t.add_argument("--heads", type=_positive_int, dest="num_heads", metavar="H", help="h, attention heads; must divide d_model")
    t.add_argument("--layers", type=_positive_int, dest="num_layers", metavar="N", help="N, layers of the encoder and of the decoder")
    t.add_argument("--d-ff", type=_positive_int, help="d_ff, the feed-forward's inner size")
    t.add_argument("--label-smoothing", type=_probability, metavar="EPS", help="eps_ls, §5.4 (default 0.1)")
    t.add_argument("--positions", choices=["sinusoidal", "learned"],
                   help="positional encoding, §3.5 (default sinusoidal; Table 3 (E): learned)")
    t.add_argument("--norm-first", action="store_true", default=None,
                   help="LayerNorm before each sublayer, x + Sublayer(LayerNorm(x)) (pre-LN; not the paper's "
                        "LayerNorm(x + Sublayer(x)), §3.1)")
    t.add_argument("--limit", type=_positive_int, metavar="N",
                   help="use only the first N pairs of the file (quick runs): of the default corpus, the N shortest "
                        "pairs, as spa.tsv is sorted by length (of the English side)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint of the highest step; settings equal to the "
                        "run's are accepted, other ones refused")
    t.add_argument("--eval-every", type=_positive_int,
                   help="validation loss and sample translations every N steps (default: a fifth of --steps, "
                        "else 250)")
    t.add_argument("--checkpoint-every", type=_positive_int,
                   help="write checkpoint-<step>.npz every N steps, the last five kept for `average` (default: every "
                        "5%% of --steps, else every 100 steps on a CPU, 1000 on a GPU)")
    t.add_argument("--test-limit", type=_nonnegative_int,
                   help=f"test sentences for the final BLEU (default {DEFAULT_TEST_LIMIT['cpu']} on cpu, all on "
                        "cuda; 0: all)")
    t.add_argument("--beam", type=_positive_int, default=4, help="beam size of the final BLEU (default 4, §6.1)")
    t.add_argument("--tf32", action="store_true",
                   help="TF32 matmuls on the GPU: about 2x faster steps for base (H200), inputs of the products "
                        "rounded to a 10-bit mantissa; fp32 by default")
    t.add_argument("--cuda-graph", action="store_true",
                   help="GPU: capture the training step once per batch shape (lengths padded to multiples of 8) "
                        "and replay it as a CUDA graph: one launch instead of hundreds")
    t.add_argument("--no-progress", action="store_true",
                   help="no progress bars (when stderr is not a terminal, e.g. a log file, a plain line every "
                        f"{LINE_EVERY_SECONDS:g} s takes their place)")
    t.set_defaults(func=cmd_train)

    def model_args(q):
        q.add_argument("--checkpoint", required=True, metavar="DIR",
                       help="run directory (or one .npz checkpoint inside it)")
        q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="where to run the model (default auto: cuda if CuPy finds a GPU, else cpu)")

    def decode_args(q):
        q.add_argument("--cuda-graph", action="store_true",
                       help="GPU: decode over a fixed-size key/value cache and replay each beam-search step as "
                            "a CUDA graph (one launch a step instead of one per op; on an H200 beam search ran "
                            "4-6x faster than without the cache, same hypotheses)")

    tr = sub.add_parser("translate", help="translate sentences with a trained model",
                        description="Translate TEXT, the words of one sentence (quoted or not, joined by spaces, "
                                    "as attention takes them), or each line of standard input (several sentences: "
                                    "one a line, piped or from a file, < FILE), read as UTF-8; one line out per "
                                    "sentence. Typed at a terminal, each line is answered as soon as you press "
                                    "Enter. A sentence longer than the model takes is cut, with a warning.")
    model_args(tr)
    tr.add_argument("text", nargs="*", metavar="TEXT", help="the sentence (default: read standard input)")
    tr.add_argument("--beam", type=_positive_int, default=4, help="beam size (1: greedy; default 4)")
    tr.add_argument("--alpha", type=_nonnegative_float, default=0.6, help="length penalty α (default 0.6, §6.1)")
    tr.add_argument("--batch-size", type=_positive_int, default=64,
                    help="sentences decoded together (default 64; lower it if memory runs short)")
    decode_args(tr)
    tr.set_defaults(func=cmd_translate)

    ev = sub.add_parser("evaluate", help="sacreBLEU and chrF of a trained model on a split",
                        description="Score a split of the run's data; the split is re-derived with the run's "
                                    "seed, so 'test' is the test split of training time.")
    model_args(ev)
    ev.add_argument("--data", help="the TSV (default: the file recorded in the run's config.json; a copy of it "
                                   "elsewhere is the same; a file with other lines is scored with a warning, as "
                                   "its split is not the run's)")
    ev.add_argument("--split", default="test", choices=["train", "valid", "test"],
                    help="which split of the run's data to score (default test)")
    ev.add_argument("--beam", type=_positive_int, default=4, help="beam size (1: greedy; default 4, §6.1)")
    ev.add_argument("--limit", type=_positive_int, help="score a fixed random sample of N sentences")
    ev.add_argument("--batch-size", type=_positive_int, default=64,
                    help="sentences decoded together (default 64; lower it if memory runs short)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    decode_args(ev)
    ev.set_defaults(func=cmd_evaluate)

    at = sub.add_parser("attention", help="plot every attention map of one translation",
                        description="Translate TEXT greedily, then plot encoder self-, decoder self- and "
                                    "cross-attention of every layer and head into one PNG.")
    model_args(at)
    at.add_argument("text", nargs="+", metavar="TEXT", help="the sentence (its words joined by spaces)")
    at.add_argument("--out", required=True, metavar="PNG",
                    help="the image to write (.png added to a name without a suffix; .pdf, .svg, … work too)")
    at.add_argument("--layers", type=_layer_numbers, metavar="N[,N…]",
                    help="only these layers of each kind, counted from 1 (-1: the last), e.g. --layers 1,-1 "
                         "(default: all; the base model has 6 × 8 heads of each kind)")
    at.set_defaults(func=cmd_attention)

    av = sub.add_parser("average", help="average a run's last checkpoints into one model (§6.1)",
                        description="Write DIR/average-of-N.npz: one checkpoint whose parameters are the element-wise mean of the run's "
                                    "last N checkpoints (interval ones and last.npz, by step), as the paper's base "
                                    "models were (§6.1: the last 5). translate, evaluate and attention take it as "
                                    "--checkpoint; it holds no optimiser state, so training cannot resume from it.")
    av.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory")
    av.add_argument("--last", type=_positive_int, default=5, metavar="N", help="how many checkpoints (default 5)")
    av.set_defaults(func=cmd_average)

    da = sub.add_parser("data", help="corpus utilities")
    dsub = da.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    dsub.required = True
    fe = dsub.add_parser("fetch", help="download and cache a Tatoeba corpus, print its path and size")
    fe.add_argument("--corpus", default="spa", choices=["spa", "ukr"],
                    help="spa: English–Spanish (the default), ukr: English–Ukrainian")
    fe.add_argument("--no-progress", action="store_true", help="no download progress")
    fe.set_defaults(func=cmd_data_fetch)
    return p


def _one_line(e):
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(str(msg).split()) or type(e).__name__
    return msg


def _warning_line(message, category, filename, lineno, line=None):
    return f"{_PROG}: warning: {message}\n"


def main(argv=None):
    """Entry point of ``minitransformer`` and ``python -m minitransformer``; returns the exit status."""
    from .data import DataError
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _warning_line
    from .backend import keep_freed_host_memory
    keep_freed_host_memory()     # 3.6x fewer page faults on the CPU (docs/results.md); this process is ours
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\n{_PROG}: interrupted", file=sys.stderr)
        return 130
    except (UserError, DataError, FileNotFoundError, IsADirectoryError, PermissionError, ValueError, KeyError,
            RuntimeError, FloatingPointError, OSError) as e:
        if os.environ.get("MINITRANSFORMER_DEBUG"):
            raise
        hint = ("; lower the learning rate with a longer --warmup-steps, or try another --seed"
                if isinstance(e, FloatingPointError) else "")
        print(f"{_PROG}: error: {_one_line(e)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
