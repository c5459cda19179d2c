"""End-to-end tests of the command line (``python -m minitransformer …`` in a subprocess).

One tiny run is trained on the 1,600-pair sample once per module; translate, evaluate, attention
and resume then use it. User mistakes must end in one ``minitransformer: error: …`` line on
stderr and a non-zero exit, never a traceback.
"""
import json
import re
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minitransformer as mt
from minitransformer.data import Tokenizer, read_pairs

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "spa_sample.tsv"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = ["--preset", "tiny", "--vocab-size", "300", "--max-tokens", "400", "--eval-every", "8",
         "--checkpoint-every", "4", "--test-limit", "4", "--beam", "2", "--no-progress"]
FAST = [*QUICK, "--steps", "8"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def env(cache):
    """The environment of the commands the tests run: this checkout, a corpus cache of the module's own."""
    env = {**os.environ, "MINITRANSFORMER_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("MINITRANSFORMER_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def cli(env):
    """``cli(*args, stdin=None)`` -> CompletedProcess of ``python -m minitransformer args``, in the repo root."""
    def run(*args, stdin=None, timeout=120):
        return subprocess.run([sys.executable, "-m", "minitransformer", *map(str, args)], cwd=ROOT, env=env,
                              input=stdin, capture_output=True, text=True, timeout=timeout)
    return run


@pytest.fixture(scope="module")
def trained(cli, tmp_path_factory):
    """The module's one training run: (run directory, its CompletedProcess)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    done = cli("train", "--data", SAMPLE, *FAST, "--out", out)
    assert done.returncode == 0, done.stderr
    return out, done


@pytest.fixture(scope="module")
def run_dir(trained):
    return trained[0]


def run_patched(env, prelude, *args):
    """``minitransformer args`` in a subprocess, after the Python in ``prelude`` (which patches the package)."""
    code = f"{prelude}\nimport sys\nfrom minitransformer.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def warning_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("minitransformer: warning: ")]


def assert_user_error(done, *fragments):
    """Non-zero exit, no traceback, exactly one error line (the last line of stderr)."""
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("minitransformer: error: ")]
    assert len(errors) == 1 and done.stderr.strip().splitlines()[-1] == errors[0], done.stderr
    for fragment in fragments:
        assert fragment in errors[0]


# ------------------------------------------------------------------ train and what it leaves behind

def test_train_writes_a_complete_run(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "tokenizer.model", "last.npz", "bleu.json", "attention.png", "losses.png"} <= names
    assert {"checkpoint-00000004.npz", "checkpoint-00000008.npz"} <= names
    assert (run_dir / "attention.png").read_bytes()[:8] == PNG_MAGIC
    assert (run_dir / "losses.png").read_bytes()[:8] == PNG_MAGIC
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preset"] == "tiny" and config["model"]["d_model"] == 128 and config["model"]["num_layers"] == 2
    assert config["data"]["path"] == str(SAMPLE) and config["data"]["reverse"] is False
    assert config["data"]["split_seed"] == 0 and config["data"]["vocab_size"] == 300
    assert config["train"]["steps"] == 8
    assert config["model"]["vocab_size"] == Tokenizer.load(run_dir / "tokenizer.model").vocab_size
    bleu = json.loads((run_dir / "bleu.json").read_text())
    assert bleu["n"] == 4 and bleu["split"] == "test" and "nrefs:1" in bleu["signature"] and bleu["samples"]


def test_train_prints_progress_and_results(trained):
    run_dir, out = trained[0], trained[1].stdout
    assert "valid_loss" in out                       # the on_eval hook ran at step 8 …
    assert "→" in out                                # … with sample translations
    assert "test BLEU" in out and "nrefs:1|case:mixed" in out and "chrF" in out
    assert "4 of" in out and "evaluate --checkpoint" in out   # the capped test set says so
    for name in ("last.npz", "bleu.json", "attention.png", "losses.png"):
        assert str(run_dir / name) in out


def test_loss_curves_of_a_run():
    """losses.png's curves: the training losses as logged, the validation losses of the evaluations
    and the final one, which is not repeated when the last evaluation was at the last step."""
    from types import SimpleNamespace
    from minitransformer.cli import loss_curves
    trainer = SimpleNamespace(config=SimpleNamespace(label_smoothing=0.1), step=30,
                              losses=[(10, 5.0), (20, 4.0), (30, 3.5)],
                              history=[{"step": 10, "valid_loss": 4.8, "samples": []}, {"step": 20, "bleu": 3.0}])
    curves = loss_curves(trainer, final_valid_loss=3.9)
    assert curves == {"training (label smoothing 0.1)": [(10, 5.0), (20, 4.0), (30, 3.5)],
                      "validation": [(10, 4.8), (30, 3.9)]}
    trainer.history.append({"step": 30, "valid_loss": 3.9})
    assert loss_curves(trainer, final_valid_loss=3.9)["validation"] == [(10, 4.8), (30, 3.9)]
    trainer.config.label_smoothing, trainer.history = 0.0, []
    assert loss_curves(trainer) == {"training": trainer.losses}
    trainer.losses = []
    assert loss_curves(trainer) == {}


def test_translate_arguments_are_the_words_of_one_sentence(cli, run_dir):
    """Unquoted words are one sentence, as attention takes them (they were one sentence each); several
    sentences come one a line on standard input."""
    done = cli("translate", "--checkpoint", run_dir, "--beam", "1", "I", "like", "green", "apples.")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1
    piped = cli("translate", "--checkpoint", run_dir, "--beam", "1", stdin="I like green apples.\n")
    assert done.stdout == piped.stdout
    assert "note:" not in done.stderr
    done = cli("translate", "--checkpoint", run_dir, "--beam", "1", "I like cats.", "Where is the station?")
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1, done.stderr
    assert "one sentence" in done.stderr and "standard input" in done.stderr   # quoted sentences: a note
    help_text = " ".join(cli("translate", "--help").stdout.split())
    assert "the words of one sentence" in help_text and "one a line" in help_text


def test_translate_stdin(cli, run_dir):
    done = cli("translate", "--checkpoint", run_dir, "--beam", "2", stdin="Hello.\nI am hungry.\nGood night.\n")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 3


def test_translate_at_a_terminal_answers_each_line_at_once(env, run_dir):
    """Typed at a terminal, a line is translated when Enter is pressed, before the input ends (piped
    input is read to its end first, to translate it in batches)."""
    import pty
    import select
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "minitransformer", "translate", "--checkpoint", str(run_dir),
                             "--beam", "1"], cwd=ROOT, env=env, stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    os.close(slave)
    try:
        os.write(master, b"I like cats.\n")
        ready, _, _ = select.select([proc.stdout], [], [], 60)   # the answer comes while stdin is still open
        assert ready and proc.stdout.readline().endswith(b"\n"), proc.poll()
        os.write(master, b"Good night.\n\x04")                    # one more line, then Ctrl-D
        rest, errors = proc.communicate(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, errors
    assert len(rest.splitlines()) == 1 and b"Ctrl-D" in errors


def test_translate_a_checkpoint_file(cli, run_dir):
    done = cli("translate", "--checkpoint", run_dir / "checkpoint-00000004.npz", "--beam", "1", "Hi.")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1


def test_translate_reads_standard_input_as_utf8(env, run_dir):
    """Input that is not UTF-8 (Latin-1 "café") stops with the number of its line, not a message from
    sentencepiece's C++ bindings; a byte-order mark on the first line is dropped."""
    def translate(data):
        done = subprocess.run([sys.executable, "-m", "minitransformer", "translate", "--checkpoint", str(run_dir),
                               "--beam", "1"], cwd=ROOT, env=env, input=data, capture_output=True, timeout=120)
        done.stdout, done.stderr = done.stdout.decode("utf-8"), done.stderr.decode("utf-8")
        return done
    assert_user_error(translate(b"Hello.\ncaf\xe9\nGood night.\n"), "standard input, line 2", "not valid UTF-8")
    done = translate("\ufeffHello.\ncafé\n".encode("utf-8"))
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 2, done.stderr


def test_input_longer_than_the_model_takes(cli, run_dir, tmp_path):
    """The model's 512 positions hold at most 461 source tokens (50 more for the translation, and bos):
    translate cuts a longer sentence with one warning, attention says what the longest text is."""
    long = " ".join(["Where is the station?"] * 60)     # ≈600 subword tokens with the run's tokenizer
    done = cli("translate", "--checkpoint", run_dir, "--beam", "1", long)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1, done.stderr
    [warning] = warning_lines(done.stderr)
    assert "longer than the model takes" in warning and "the first 461 tokens" in warning
    done = cli("translate", "--checkpoint", run_dir, "--beam", "1", stdin=f"Hello.\n{long}\n{long}\n")
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 3, done.stderr
    [warning] = warning_lines(done.stderr)
    assert "2 of the inputs" in warning and "line 2:" in warning and "the first 461 tokens" in warning
    assert_user_error(cli("attention", "--checkpoint", run_dir, long, "--out", tmp_path / "a.png"),
                      "attention: the text is", "the longest this model can plot is 461 tokens")
    assert not (tmp_path / "a.png").exists()


def test_latest_checkpoint_goes_by_step_not_by_file_time(cli, run_dir, tmp_path):
    """After a copy (cp -r, rsync, unzip) file times say nothing: the step stored in each checkpoint
    decides, last.npz wins a tie, and an unreadable one is skipped with a warning."""
    from minitransformer.cli import latest_checkpoint
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    later = time.time() + 60
    os.utime(copy / "checkpoint-00000004.npz", (later, later))
    os.utime(copy / "checkpoint-00000008.npz", (later - 1, later - 1))
    assert latest_checkpoint(copy) == copy / "last.npz"
    (copy / "last.npz").write_bytes(b"PK\x03\x04 cut short")
    with pytest.warns(UserWarning, match="last.npz cannot be read"):
        assert latest_checkpoint(copy) == copy / "checkpoint-00000008.npz"
    done = cli("translate", "--checkpoint", copy, "--beam", "1", "Hi.")
    assert done.returncode == 0, done.stderr
    [warning] = warning_lines(done.stderr)
    assert str(copy / "last.npz") in warning and "skipped" in warning
    assert f"using {copy / 'checkpoint-00000008.npz'} (step 8)" in done.stderr
    (copy / "last.npz").unlink()
    assert latest_checkpoint(copy) == copy / "checkpoint-00000008.npz"
    for name in ("checkpoint-00000004.npz", "checkpoint-00000008.npz"):
        (copy / name).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a minitransformer checkpoint"):   # none readable: the error
        latest_checkpoint(copy)


def test_evaluate(cli, run_dir):
    done = cli("evaluate", "--checkpoint", run_dir, "--limit", "3", "--beam", "2", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "BLEU = " in done.stdout and "chrF = " in done.stdout and "nrefs:1" in done.stdout
    assert "3 of" in done.stdout
    assert f"using {run_dir / 'last.npz'} (step 8)" in done.stderr and not warning_lines(done.stderr)


def test_evaluate_uses_the_training_time_test_split(cli, run_dir):
    """The sentences scored at the end of training are the fixed sample of the re-derived test split
    that ``evaluate --limit`` with the same N scores."""
    bleu = json.loads((run_dir / "bleu.json").read_text())
    pairs = read_pairs(SAMPLE)
    from minitransformer.cli import sample_pairs
    from minitransformer.data import split_pairs
    test = sample_pairs(split_pairs(pairs, 0.02, 0.02, seed=0)["test"], 4)
    assert bleu["samples"] and all((s["src"], s["ref"]) in test for s in bleu["samples"])


def test_attention(cli, run_dir, tmp_path):
    png = tmp_path / "maps" / "cats.png"
    done = cli("attention", "--checkpoint", run_dir, "I like cats.", "--out", png)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert str(png) in done.stdout
    assert f"using {run_dir / 'last.npz'} (step 8)" in done.stderr


def test_attention_names_its_file_before_loading_the_model(cli, run_dir, tmp_path):
    """No suffix: .png added; a suffix matplotlib cannot write: refused before the model is loaded."""
    done = cli("attention", "--checkpoint", run_dir, "I like cats.", "--out", tmp_path / "maps")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "maps.png").read_bytes()[:8] == PNG_MAGIC and str(tmp_path / "maps.png") in done.stdout
    done = cli("attention", "--checkpoint", run_dir, "I like cats.", "--out", tmp_path / "maps.xyz")
    assert_user_error(done, "matplotlib cannot write .xyz files; use one of", ".png", ".svg")
    assert "using" not in done.stderr                      # refused before the checkpoint was read


def test_cli_version_and_alpha(cli):
    done = cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"minitransformer {mt.__version__}", done.stdout
    for bad in ("-1", "nan", "inf"):
        done = cli("translate", "--checkpoint", "x", "--alpha", bad, "hi")
        assert done.returncode == 2 and f"argument --alpha: expected a finite number >= 0, got {bad}" in done.stderr


def test_version_is_the_installed_distributions(env):
    """--version: the version pip installed (importlib.metadata); the package's __version__ when this
    checkout is not installed."""
    installed = "import importlib.metadata as m\nm.version = lambda name: '9.8.7'"
    missing = ("import importlib.metadata as m\n"
               "def version(name): raise m.PackageNotFoundError(name)\nm.version = version")
    for prelude, expected in ((installed, "9.8.7"), (missing, mt.__version__)):
        done = run_patched(env, prelude, "--version")
        assert done.returncode == 0 and done.stdout == f"minitransformer {expected}\n", (done.stdout, done.stderr)


def test_attention_of_some_layers(cli, run_dir, tmp_path):
    png = tmp_path / "last.png"
    done = cli("attention", "--checkpoint", run_dir, "I like cats.", "--out", png, "--layers", "-1")
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == PNG_MAGIC
    for layers, error in [("0", "counted from 1"), ("9", "the model has"), ("a", "such as 1,-1")]:
        done = cli("attention", "--checkpoint", run_dir, "I like cats.", "--out", png, "--layers", layers)
        assert done.returncode != 0 and error in done.stderr, (layers, done.stderr)


def test_resume_continues_a_run(cli, run_dir, tmp_path):
    """The original command with --resume added continues the run: settings equal to the stored ones are
    no change; --steps is the run's total."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "last.npz").unlink()                     # as after a crash: the newest interval checkpoint is used
    done = cli("train", "--data", SAMPLE, *QUICK, "--steps", "10", "--out", copy, "--resume", "--test-limit", "2",
               "--seed", "0", "--split-seed", "0")          # the run's own seeds, given: no change
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout and "checkpoint-00000008.npz (step 8)" in done.stdout
    assert "training to step 10 (from step 8)" in done.stdout
    assert "trained 10 steps" in done.stdout
    assert (copy / "checkpoint-00000010.npz").is_file() or (copy / "last.npz").is_file()


def test_a_resumed_budget_moves_the_intervals_the_run_chose_itself(cli, tmp_path):
    """A 10-step trial validates every 2 steps and checkpoints every step (a fifth, a twentieth); resumed
    to 40 steps it validates every 8 and checkpoints every 2, as a 40-step run would. Intervals given
    to the first command stay, and config.json records the new budget for the next --resume."""
    base = QUICK[:6] + QUICK[10:]
    assert "--eval-every" not in base and "--checkpoint-every" not in base and "--test-limit" in base
    auto, given = tmp_path / "auto", tmp_path / "given"
    for out, extra in ((auto, []), (given, ["--eval-every", "3"])):
        assert cli("train", "--data", SAMPLE, *base, *extra, "--steps", "10", "--out", out).returncode == 0
        done = cli("train", "--resume", "--out", out, "--steps", "40", "--no-progress")
        assert done.returncode == 0, done.stderr
        train = json.loads((out / "config.json").read_text())["train"]
        assert train["steps"] == 40 and train["checkpoint_every"] == 2
        assert train["eval_every"] == (8 if out == auto else 3)
        evaluated = [int(m) for m in re.findall(r"^step (\d+) \| valid_loss", done.stdout, re.M)]
        assert evaluated == ([16, 24, 32, 40] if out == auto else [12, 15, 18, 21, 24, 27, 30, 33, 36, 39])
    assert cli("train", "--resume", "--out", auto).returncode == 1     # at its recorded 40: nothing to do


def test_an_interval_given_stays_even_when_it_equals_the_runs_own_choice(cli, tmp_path):
    """--eval-every 2 on a 10-step run is the fifth the run would pick itself, but it was given:
    config.json says so ("intervals_given"), and a resume to 20 steps keeps it; one given to the resume
    is recorded too. A run from before that record is judged by the value, as before (2 → 4)."""
    base = QUICK[:6] + QUICK[10:]
    out, older = tmp_path / "given", tmp_path / "older"
    assert cli("train", "--data", SAMPLE, *base, "--eval-every", "2", "--steps", "10", "--out", out).returncode == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["eval_every"] == 2
    shutil.copytree(out, older)
    config.pop("intervals_given", None)
    (older / "config.json").write_text(json.dumps(config))
    for run, eval_every in ((out, 2), (older, 4)):
        done = cli("train", "--resume", "--out", run, "--steps", "20", "--checkpoint-every", "5", "--no-progress")
        assert done.returncode == 0, done.stderr
        config = json.loads((run / "config.json").read_text())
        assert config["train"]["eval_every"] == eval_every and config["train"]["checkpoint_every"] == 5
        assert config.get("intervals_given") == (["eval_every", "checkpoint_every"] if run == out else None)


def test_resume_past_its_step_budget_stops_without_retraining(cli, run_dir, tmp_path):
    """With --resume, --steps is the run's total: a run already there is told so (exit 1, a user
    mistake: nothing was trained) and its checkpoints, bleu.json and plots stay as they are."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    for steps in ("8", "5"):
        done = cli("train", "--data", SAMPLE, *QUICK, "--steps", steps, "--out", copy, "--resume")
        assert done.returncode == 1
        assert_user_error(done, f"already at step 8 of {steps}; pass a larger --steps")
        assert "trained" not in done.stdout and "training" not in done.stdout
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    help_text = " ".join(cli("train", "--help").stdout.split())
    assert "stop after N updates (with --resume: the run's total" in help_text


INTERRUPTED_BEFORE_SAVING = """
from minitransformer import train
def run(self):                  # stopped before last.npz could be written
    self.step += 3
    raise KeyboardInterrupt
train.Trainer.run = run
"""


def test_ctrl_c_says_saved_only_when_it_was(env, run_dir, tmp_path):
    done = run_patched(env, INTERRUPTED_BEFORE_SAVING, "train", "--data", SAMPLE, *FAST, "--out", tmp_path / "new")
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert "interrupted at step 3; no checkpoint was saved" in done.stderr and "; saved" not in done.stderr
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "last.npz").unlink()
    done = run_patched(env, INTERRUPTED_BEFORE_SAVING, "train", "--resume", "--out", copy, "--steps", "20")
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert "interrupted at step 11" in done.stderr and "; saved" not in done.stderr
    assert f"the latest checkpoint is {copy / 'checkpoint-00000008.npz'} (step 8)" in done.stderr
    assert f"train --resume --out {copy}" in done.stderr


def test_average_writes_the_mean_of_the_last_checkpoints(cli, run_dir, tmp_path):
    """§6.1: `average` writes the element-wise mean of the run's last checkpoints (by step; last.npz
    and checkpoint-8 are the same step, counted once) beside them, and the other commands take it."""
    from minitransformer.checkpoint import checkpoint_info, read_checkpoint
    from minitransformer.cli import latest_checkpoint
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    done = cli("average", "--checkpoint", copy)
    assert done.returncode == 0, done.stderr
    averaged = copy / "average-of-2.npz"
    assert "steps 4, 8 (the run has 2, not 5)" in done.stdout and str(averaged) in done.stdout
    arrays, info = read_checkpoint(averaged)
    four, eight = (read_checkpoint(copy / f"checkpoint-0000000{n}.npz")[0] for n in (4, 8))
    assert arrays.keys() == {k for k in four if k.startswith("model.")} and "optimizer" not in info
    assert not np.array_equal(four["model.embedding.weight"], eight["model.embedding.weight"])
    for name, value in arrays.items():
        assert value.dtype == four[name].dtype
        np.testing.assert_allclose(value, (four[name].astype(np.float64) + eight[name]) / 2, rtol=1e-6, atol=1e-7)
    assert info["meta"] == {"step": 8, "steps": [4, 8], "averaged": ["checkpoint-00000004.npz", "checkpoint-00000008.npz"]}
    assert info["config"] == checkpoint_info(copy / "last.npz")["config"]
    assert latest_checkpoint(copy) == copy / "last.npz"       # a run directory still means its own last state
    done = cli("translate", "--checkpoint", averaged, "--beam", "1", "I like cats.")
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1, done.stderr


def test_average_refuses_what_it_cannot_average(cli, run_dir, tmp_path):
    assert_user_error(cli("average", "--checkpoint", run_dir, "--last", "1"), "two or more")
    assert_user_error(cli("average", "--checkpoint", run_dir / "last.npz"), "expected a run directory")
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(run_dir / "last.npz", one)
    assert_user_error(cli("average", "--checkpoint", one), "one checkpoint to average")
    assert_user_error(cli("average", "--checkpoint", tmp_path / "nothing"), "expected a run directory")


def test_train_summary_says_what_it_built(cli, tmp_path):
    """One head is "1 head"; a vocabulary the text cannot fill is shown at its real size, not as asked."""
    out = tmp_path / "one-head"
    done = cli("train", "--data", SAMPLE, *QUICK, "--steps", "1", "--limit", "200", "--vocab-size", "20000",
               "--d-model", "32", "--heads", "1", "--layers", "1", "--d-ff", "48", "--test-limit", "2", "--beam", "1",
               "--out", out)
    assert done.returncode == 0, done.stderr
    actual = Tokenizer.load(out / "tokenizer.model").vocab_size
    assert actual < 20000
    assert "up to 20000 pieces" in done.stdout and "vocabulary 20000" not in done.stdout
    assert f"vocabulary {actual} (" in done.stdout
    assert "1 head," in done.stdout and "training for 1 step\n" in done.stdout


def test_help_texts(cli):
    train = " ".join(cli("train", "--help").stdout.split())
    assert "the N shortest pairs" in train and "sorted by length" in train   # --limit on spa.tsv
    assert "--device {auto,cpu,cuda} where to train" in train
    translate = " ".join(cli("translate", "--help").stdout.split())
    assert "--batch-size BATCH_SIZE sentences decoded together" in translate
    assert "--device {auto,cpu,cuda} where to run" in translate
    evaluate = " ".join(cli("evaluate", "--help").stdout.split())
    assert "--beam BEAM beam size" in evaluate and "--batch-size BATCH_SIZE sentences" in evaluate


def test_train_with_table_3_variations(cli, tmp_path):
    """The paper's Table 3 knobs override the preset, are stored in the run, and the run loads with them."""
    out = tmp_path / "variant"
    done = cli("train", "--data", SAMPLE, *QUICK, "--steps", "2", "--out", out, "--d-model", "32", "--heads", "2",
               "--layers", "1", "--d-ff", "48", "--dropout", "0.2", "--label-smoothing", "0", "--positions", "learned",
               "--norm-first")
    assert done.returncode == 0, done.stderr
    assert "d_model 32, 2 heads, 1+1 layers, d_ff 48, learned positions, pre-LN, P_drop 0.2, eps_ls 0)" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert {k: config["model"][k] for k in ("d_model", "num_heads", "num_layers", "d_ff", "dropout", "learned_positions")} \
        == dict(d_model=32, num_heads=2, num_layers=1, d_ff=48, dropout=0.2, learned_positions=True)
    assert config["train"]["label_smoothing"] == 0.0
    from minitransformer.cli import load_run
    model = load_run(out)[0]
    assert model.config.learned_positions and model.config.norm_first and len(model.encoder.layers) == 1
    assert model.positional_encoding.state_dict()       # learned: a parameter table, loaded from the run


def test_train_refuses_variations_that_do_not_fit(cli, tmp_path, run_dir):
    assert_user_error(cli("train", "--data", SAMPLE, *FAST, "--out", tmp_path / "a", "--heads", "3"),
                      "3 heads do not divide d_model 128")
    done = cli("train", "--data", SAMPLE, *FAST, "--out", tmp_path / "b", "--label-smoothing", "1")
    assert done.returncode == 2 and "expected a number in [0, 1), got 1" in done.stderr
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert_user_error(cli("train", "--resume", "--out", copy, "--heads", "2", "--dropout", "0.3", "--norm-first",
                          "--d-model", "128", "--vocab-size", "300", "--preset", "tiny"),
                      "--dropout 0.3 (the run has 0.1), --heads 2 (the run has 4), --norm-first (the run was "
                      "started without it) cannot change")
    assert_user_error(cli("train", "--resume", "--out", copy, "--preset", "small", "--limit", "5", "--reverse"),
                      "--reverse (the run was started without it), --preset small (the run has tiny), "
                      "--limit 5 (the run has none) cannot change")


def test_resume_refuses_another_seed_or_split_seed(cli, run_dir, tmp_path):
    """The split seed decides which sentences are test data and the seed the order of the batches still to
    come: --resume refuses other ones, naming the run's value, before preparing anything. Only seeds the user
    gives count: without them the run's own are used, whatever they are (here 5, not the default 0)."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["seed"] = config["data"]["split_seed"] = 5
    (copy / "config.json").write_text(json.dumps(config))
    done = cli("train", "--resume", "--out", copy, "--seed", "0", "--split-seed", "6")
    assert_user_error(done, "--seed 0 (the run has 5), --split-seed 6 (the run has 5) cannot change")
    assert "resuming" not in done.stdout and "preparing" not in done.stdout
    assert_user_error(cli("train", "--resume", "--out", copy, "--split-seed", "0"), "--split-seed 0 (the run has 5)")
    # not given, or given as stored: accepted (refused only for the spent step budget, which is checked next)
    for seeds in ([], ["--seed", "5", "--split-seed", "5"]):
        assert_user_error(cli("train", "--resume", "--out", copy, "--steps", "8", *seeds), "already at step 8")


def test_train_refuses_a_negative_seed_on_the_command_line(cli, tmp_path):
    """--seed seeds NumPy's generators, which take none below 0; --split-seed only goes into a hash."""
    done = cli("train", "--data", SAMPLE, *FAST, "--out", tmp_path / "r", "--seed", "-1")
    assert done.returncode == 2 and "argument --seed: expected an integer >= 0, got -1" in done.stderr, done.stderr
    from minitransformer.data import split_pairs
    pairs = [(f"s{i}", f"t{i}") for i in range(200)]
    splits = [split_pairs(pairs, valid_size=20, test_size=20, seed=seed) for seed in (-1, 1)]
    assert all(len(s["test"]) == 20 for s in splits) and splits[0]["test"] != splits[1]["test"]


def test_the_table_3_benchmark_trains_each_row_with_its_change(env, tmp_path):
    """benchmarks/table3.py: one train run per row, each with its own change, read back into one table."""
    extra = f"--data {SAMPLE} --vocab-size 300 --max-tokens 400 --beam 1"
    done = subprocess.run([sys.executable, "benchmarks/table3.py", "--steps", "2", "--rows", "base,A1,E", "--out",
                           str(tmp_path), "--test-limit", "2", "--json", "--train-args", extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {r["row"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert list(rows) == ["base", "A1", "E"] and all(r["step"] == 2 and r["n"] == 2 for r in rows.values())
    models = {name: json.loads((tmp_path / name / "config.json").read_text())["model"] for name in rows}
    assert models["base"]["num_heads"] == 4 and models["A1"]["num_heads"] == 1
    assert not models["base"]["learned_positions"] and models["E"]["learned_positions"]
    assert rows["E"]["parameters"] > rows["base"]["parameters"] == rows["A1"]["parameters"]


def test_data_fetch_uses_the_cache(cli, cache):
    shutil.copy(SAMPLE, cache / "spa.tsv")           # a cached corpus: no download
    done = cli("data", "fetch", "--corpus", "spa", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert str(cache / "spa.tsv") in done.stdout and "1600 sentence pairs" in done.stdout


def test_no_progress_bar_frames_without_a_terminal(env, run_dir):
    """Written to a log file or a pipe, progress is plain lines, not a bar redrawn with carriage returns."""
    code = ("from minitransformer.progress import progress_bar\nbar = progress_bar(total=3, unit='step')\n"
            "for _ in range(3):\n    bar.update(1)\n    bar.set_postfix(loss='1.000')\nbar.close()")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode == 0 and b"\r" not in done.stderr, done.stderr
    assert b"3/3 step (100%)" in done.stderr and b"loss=1.000" in done.stderr
    done = subprocess.run([sys.executable, "-m", "minitransformer", "evaluate", "--checkpoint", str(run_dir),
                           "--limit", "2", "--beam", "1"], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert done.returncode == 0 and b"\r" not in done.stderr, done.stderr


def test_evaluate_warns_about_a_data_file_with_other_lines(cli, run_dir, tmp_path):
    """The run records its file's sha256: a copy elsewhere is the same corpus (no warning), a file with
    other lines is warned about; a run from before the record warns for any other path."""
    copy, other = tmp_path / "copy.tsv", tmp_path / "other.tsv"
    shutil.copy(SAMPLE, copy)
    other.write_text("".join(Path(SAMPLE).read_text(encoding="utf-8").splitlines(keepends=True)[1:]), encoding="utf-8")
    evaluate = ("evaluate", "--limit", "2", "--beam", "1", "--no-progress", "--checkpoint")
    for data in (SAMPLE, copy):
        done = cli(*evaluate, run_dir, "--data", data)
        assert done.returncode == 0 and not warning_lines(done.stderr), done.stderr
    done = cli(*evaluate, run_dir, "--data", other)
    assert done.returncode == 0, done.stderr
    [warning] = warning_lines(done.stderr)
    assert f"--data {other} holds other lines than the file the run was started on" in warning
    older = tmp_path / "older-run"
    shutil.copytree(run_dir, older)
    config = json.loads((older / "config.json").read_text())
    del config["data"]["sha256"]
    (older / "config.json").write_text(json.dumps(config))
    done = cli(*evaluate, older, "--data", copy)
    [warning] = warning_lines(done.stderr)
    assert f"--data {copy} is not the run's data file ({SAMPLE}" in warning


def test_resume_refuses_another_corpus_and_takes_the_same_one_moved(cli, run_dir, tmp_path):
    copy, other = tmp_path / "copy.tsv", tmp_path / "other.tsv"
    shutil.copy(SAMPLE, copy)
    other.write_text("Hello.\tHola.\n" + Path(SAMPLE).read_text(encoding="utf-8"), encoding="utf-8")
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    steps = str(json.loads((run / "config.json").read_text())["train"]["steps"] + 1)    # one more step
    before = (run / "last.npz").read_bytes()
    done = cli("train", "--resume", "--out", run, "--data", other, "--steps", steps)
    assert_user_error(done, f"--data {other} holds other lines than the file the run was started on",
                      "start a new run with another --out")
    assert (run / "last.npz").read_bytes() == before                   # not one step trained
    done = cli("train", "--resume", "--out", run, "--data", copy, "--steps", steps, "--no-progress")
    assert done.returncode == 0 and not warning_lines(done.stderr), done.stderr
    assert mt.checkpoint.checkpoint_info(run / "last.npz")["meta"]["step"] == int(steps)


# ------------------------------------------------------------------ user mistakes: one line, no traceback

def test_missing_data_file(cli, tmp_path):
    assert_user_error(cli("train", "--data", tmp_path / "nope.tsv", *FAST, "--out", tmp_path / "r"), "no such file")


def test_empty_tsv(cli, tmp_path):
    (tmp_path / "empty.tsv").write_text("")
    assert_user_error(cli("train", "--data", tmp_path / "empty.tsv", *FAST, "--out", tmp_path / "r"), "no usable")


def test_malformed_tsv(cli, tmp_path):
    (tmp_path / "bad.tsv").write_text("just one column\nanother one\n")
    done = cli("train", "--data", tmp_path / "bad.tsv", *FAST, "--out", tmp_path / "r")
    assert_user_error(done, "no usable")
    assert "minitransformer: warning: " in done.stderr   # which lines were skipped, and why


def test_binary_file(cli, tmp_path):
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 8)
    assert_user_error(cli("train", "--data", tmp_path / "model.bin", *FAST, "--out", tmp_path / "r"), "binary")


def test_unknown_preset(cli, tmp_path):
    assert_user_error(cli("train", "--data", SAMPLE, "--preset", "huge", "--out", tmp_path / "r"), "huge")


def test_no_command(cli):
    assert_user_error(cli())


@pytest.mark.skipif(mt.cuda_is_available(), reason="a GPU is present")
def test_cuda_without_gpu(cli, tmp_path):
    assert_user_error(cli("train", "--data", SAMPLE, *FAST, "--device", "cuda", "--out", tmp_path / "r"), "cuda")


def test_tf32_is_refused_on_the_cpu(cli, tmp_path):
    assert_user_error(cli("train", "--data", SAMPLE, *FAST, "--device", "cpu", "--tf32", "--out", tmp_path / "r"),
                      "--tf32", "--device cuda")


def test_cuda_graph_is_refused_on_the_cpu(cli, tmp_path):
    assert_user_error(cli("train", "--data", SAMPLE, *FAST, "--device", "cpu", "--cuda-graph", "--out", tmp_path / "r"),
                      "--cuda-graph", "--device cuda")


def test_cuda_graph_decoding_is_refused_on_the_cpu(cli, tmp_path):
    for command in (["translate", "Hi."], ["evaluate"]):
        assert_user_error(cli(command[0], "--checkpoint", tmp_path / "run", "--device", "cpu", "--cuda-graph",
                              *command[1:]), "--cuda-graph", "--device cuda")


def test_missing_checkpoint_dir(cli, tmp_path):
    for command in (["translate", "Hi."], ["evaluate"], ["attention", "Hi.", "--out", tmp_path / "a.png"]):
        assert_user_error(cli(command[0], "--checkpoint", tmp_path / "nowhere", *command[1:]), "no such run directory")


def test_checkpoint_dir_without_files(cli, tmp_path, run_dir):
    assert_user_error(cli("translate", "--checkpoint", tmp_path, "Hi."), "no checkpoint")
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "config.json").unlink()
    assert_user_error(cli("translate", "--checkpoint", copy, "Hi."), "config.json")


def test_swapped_tokenizer(cli, run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    pairs = read_pairs(SAMPLE)
    other = Tokenizer.train([s for s, _ in pairs] + [t for _, t in pairs], vocab_size=200, cache=tmp_path / "tok")
    other.save(copy / "tokenizer.model")
    for command in (["translate", "Hi."], ["evaluate"]):
        assert_user_error(cli(command[0], "--checkpoint", copy, *command[1:]), "vocabulary")


def test_out_dir_of_another_run(cli, run_dir):
    assert_user_error(cli("train", "--data", SAMPLE, *FAST, "--out", run_dir), "--resume")


def test_resume_needs_a_run(cli, tmp_path):
    assert_user_error(cli("train", "--resume", "--out", tmp_path / "nothing"), f"{tmp_path / 'nothing'}: no such directory")
    (tmp_path / "empty").mkdir()
    assert_user_error(cli("train", "--resume", "--out", tmp_path / "empty"), "not a run directory (no config.json)")
    assert_user_error(cli("train", "--resume", "--preset", "tiny"), "--out")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT")
def test_ctrl_c_saves_and_explains_how_to_resume(env, tmp_path):
    """Ctrl-C while training: last.npz is written, the resume command is printed, exit 130, no traceback."""
    import signal
    import time
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "minitransformer", "train", "--data", str(SAMPLE), *QUICK,
                             "--steps", "100000", "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:                     # wait until the training loop has started
            if line.startswith("training for"):
                break
        deadline = time.time() + 60
        while not any(out.glob("checkpoint-*.npz")) and time.time() < deadline:
            time.sleep(0.1)                          # a few steps done (checkpoint every 4)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"train --resume --out {out}" in stderr
    assert (out / "last.npz").is_file()


def test_a_moved_data_file_asks_for_its_new_place(cli, run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["data"]["path"] = str(tmp_path / "moved-away.tsv")
    (copy / "config.json").write_text(json.dumps(config))
    for command in (["evaluate", "--checkpoint", copy, "--limit", "2"],
                    ["train", "--resume", "--out", copy, "--steps", "12"]):
        assert_user_error(cli(*command), "moved-away.tsv", "--data NEWPATH")
    done = cli("evaluate", "--checkpoint", copy, "--data", SAMPLE, "--limit", "2", "--beam", "1", "--no-progress")
    assert done.returncode == 0 and not warning_lines(done.stderr), done.stderr   # its sha256: the same file


def test_messages_name_what_the_user_gave(cli, run_dir, tmp_path):
    done = cli("train", "--steps", "abc")
    assert done.returncode == 2 and "--steps: expected a positive integer, got abc" in done.stderr, done.stderr
    assert "_positive_int" not in done.stderr
    assert_user_error(cli("attention", "--checkpoint", run_dir, "", "--out", tmp_path / "a.png"),
                      "attention: the text is empty")
    assert_user_error(cli("translate", "--checkpoint", run_dir / "nope.npz", "Hi."),
                      "nope.npz: no such checkpoint file", "last.npz")
    for data in (tmp_path, "spanish"):
        assert_user_error(cli("evaluate", "--checkpoint", run_dir, "--data", data), "corpus name", "spa (", "ukr (")
        assert_user_error(cli("train", "--data", data, *FAST, "--out", tmp_path / "r"), "corpus name", "spa (")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a run\n")
    done = cli("train", "--data", SAMPLE, *FAST, "--out", a_file)
    assert_user_error(done, f"--out {a_file}: is a file")
    assert "preparing" not in done.stdout                      # refused before any data preparation
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    del config["preset"]
    (copy / "config.json").write_text(json.dumps(config))
    assert_user_error(cli("train", "--resume", "--out", copy, "--steps", "12"), "config.json lacks \"preset\"")
