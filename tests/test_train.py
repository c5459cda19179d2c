"""train (§5): a resumed run is bitwise the run that never stopped, Ctrl-C leaves a checkpoint
that resumes, budgets stop the loop, and a tiny Transformer learns to copy.

The resume and Ctrl-C tests run training in fresh Python processes (a script written into
``tmp_path``), so nothing can leak from one half of a run to the other except the checkpoint.
Subprocesses use one BLAS thread: the same arithmetic in every process (and quick on a busy CPU).
"""
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import minitransformer as mt
from minitransformer.checkpoint import read_checkpoint
from minitransformer.data import collate
from minitransformer.nn import Transformer
from minitransformer.train import Trainer, TrainConfig, evaluate_loss

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

# A run of the trainer on a reversal task: 7 batches an epoch (fewer than the 20 steps before the
# interruption, so the position inside the third epoch must be restored), dropout 0.1 (so the
# random generator's state must be restored too). Writes losses, position and parameters to ``out``.
TRAIN_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    import minitransformer as mt
    from minitransformer.data import collate
    from minitransformer.nn import Transformer
    from minitransformer.train import Trainer, TrainConfig

    args = json.loads(sys.argv[1])
    out = Path(args["out"])
    mt.manual_seed(1234)
    model = Transformer(vocab_size=20, d_model=32, num_heads=2, num_layers=2, d_ff=64, dropout=0.1, max_len=32)
    model.to(args.get("device", "cpu"))

    def batches(epoch):
        rng = np.random.default_rng((11, epoch))
        result = []
        for _ in range(7):
            src = [rng.integers(4, 20, size=rng.integers(2, 9)).tolist() for _ in range(rng.integers(4, 10))]
            result.append(collate(src, [s[::-1] for s in src]))
        return result

    config = TrainConfig(steps=args["steps"], warmup_steps=10, log_every=1,
                         checkpoint_every=args.get("checkpoint_every", 0))
    trainer = Trainer(model, batches, config, out_dir=out, progress=False)
    if args.get("resume"):
        trainer.resume(args["resume"])
    print("training from step", trainer.step, flush=True)
    try:
        trainer.run()
    except KeyboardInterrupt:
        print("interrupted at step", trainer.step, flush=True)
        sys.exit(130)
    np.savez(out / "final.npz", **model.state_dict())
    (out / "result.json").write_text(json.dumps({
        "losses": trainer.losses, "step": trainer.step, "epoch": trainer.epoch,
        "batch_in_epoch": trainer.batch_in_epoch}))
""")


def start(tmp_path, **args):
    script = tmp_path / "train_script.py"
    if not script.exists():
        script.write_text(TRAIN_SCRIPT)
    Path(args["out"]).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, str(script), json.dumps({k: str(v) if isinstance(v, Path) else v
                                                                      for k, v in args.items()})],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"training process failed ({proc.returncode}):\n{stdout}\n{stderr}"
    return stdout


def result(out):
    out = Path(out)
    with np.load(out / "final.npz", allow_pickle=False) as npz:
        params = {k: npz[k] for k in npz.files}
    return json.loads((out / "result.json").read_text()), params


# ---- (a) an exact resume ----------------------------------------------------------------------

def test_resume_in_a_fresh_process_is_bitwise_the_uninterrupted_run(tmp_path):
    first = start(tmp_path, steps=20, out=tmp_path / "first")
    straight = start(tmp_path, steps=40, out=tmp_path / "straight")   # runs alongside
    finish(first)
    resumed = start(tmp_path, steps=40, out=tmp_path / "resumed", resume=tmp_path / "first" / "last.npz")
    assert "training from step 20" in finish(resumed)
    finish(straight)

    a, params_a = result(tmp_path / "first")
    r, params_r = result(tmp_path / "resumed")
    s, params_s = result(tmp_path / "straight")
    assert a["step"] == 20 and (a["epoch"], a["batch_in_epoch"]) == (2, 6)   # mid-epoch: 7 batches an epoch
    assert [step for step, _ in s["losses"]] == list(range(1, 41))
    assert a["losses"] == s["losses"][:20]
    assert r["losses"] == s["losses"]                      # all 40 losses, bit for bit
    assert (r["step"], r["epoch"], r["batch_in_epoch"]) == (s["step"], s["epoch"], s["batch_in_epoch"]) == (40, 5, 5)
    assert list(params_r) == list(params_s)
    for name in params_s:
        assert params_r[name].dtype == params_s[name].dtype
        assert np.array_equal(params_r[name], params_s[name]), name
    # and training really moved them between step 20 and 40
    assert any(not np.array_equal(params_a[n], params_s[n]) for n in params_s)
    assert len({loss for _, loss in s["losses"]}) > 30


@pytest.mark.skipif(not mt.cuda_is_available(), reason="needs a GPU and CuPy")
def test_resume_on_the_gpu_continues_the_same_run(tmp_path):
    """The same resume on CuPy: the checkpoint's random state includes the GPU dropout stream's
    counter, so the resumed run draws the masks the uninterrupted one drew (a wrong counter changes
    the losses by percents). Compared to float32 rounding rather than bit for bit: parameters whose
    gradient is zero in exact arithmetic (the key projection's bias: softmax ignores a constant
    added to every score) get Adam steps driven by rounding noise."""
    first = start(tmp_path, steps=20, out=tmp_path / "first", device="cuda")
    straight = start(tmp_path, steps=40, out=tmp_path / "straight", device="cuda")
    finish(first)
    resumed = start(tmp_path, steps=40, out=tmp_path / "resumed", resume=tmp_path / "first" / "last.npz",
                    device="cuda")
    assert "training from step 20" in finish(resumed)
    finish(straight)
    r, params_r = result(tmp_path / "resumed")
    s, params_s = result(tmp_path / "straight")
    assert [step for step, _ in r["losses"]] == list(range(1, 41))
    np.testing.assert_allclose([x for _, x in r["losses"]], [x for _, x in s["losses"]], rtol=1e-4)
    counters = [read_checkpoint(tmp_path / run / "last.npz")[1]["meta"]["rng"]["counter"]
                for run in ("first", "resumed", "straight")]
    assert 0 < counters[0] < counters[1] == counters[2]


# ---- (b) Ctrl-C ---------------------------------------------------------------------------------

def wait_for(path, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}): {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.02)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_ctrl_c_stops_training_and_leaves_a_last_checkpoint_that_resumes(tmp_path, signum):
    """Ctrl-C, and SIGTERM/SIGHUP (``timeout``, a scheduler, a closed terminal) alike."""
    out = tmp_path / "run"
    proc = start(tmp_path, steps=1_000_000, out=out, checkpoint_every=5)
    wait_for(out / "checkpoint-00000005.npz", proc)     # training is under way
    time.sleep(np.random.default_rng().uniform(0.0, 0.2))
    proc.send_signal(getattr(signal, signum))
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, f"{stdout}\n{stderr}"
    assert "interrupted at step" in stdout
    stopped_at = int(stdout.split("interrupted at step")[1].split()[0])

    arrays, info = read_checkpoint(out / "last.npz")
    meta = info["meta"]
    assert meta["step"] == stopped_at >= 5
    # a consistent state: no update half-applied when the signal came
    assert info["optimizer"]["step_count"] == info["schedule"]["step_count"] == meta["step"]
    assert [s for s, _ in meta["losses"]] == list(range(1, meta["step"] + 1))

    more = start(tmp_path, steps=stopped_at + 3, out=tmp_path / "more", resume=out / "last.npz")
    assert f"training from step {stopped_at}" in finish(more)
    r, _ = result(tmp_path / "more")
    assert r["step"] == stopped_at + 3 and len(r["losses"]) == stopped_at + 3


def small_trainer(out, steps=50):
    mt.manual_seed(0)
    model = Transformer(vocab_size=20, d_model=16, num_heads=2, num_layers=1, d_ff=32, dropout=0.0, max_len=32)
    rng = np.random.default_rng(0)
    data = [collate(*(2 * [[rng.integers(4, 20, size=5).tolist() for _ in range(4)]])) for _ in range(3)]
    return Trainer(model, lambda epoch: data, TrainConfig(steps=steps, warmup_steps=10, log_every=1),
                   out_dir=out, progress=False)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_second_ctrl_c_while_last_npz_is_written_waits_for_it(tmp_path):
    """Two Ctrl-C during the save at the end: the save finishes (it was lost, and the CLI still said
    'saved'), then the run stops as interrupted."""
    trainer = small_trainer(tmp_path)
    save = trainer.save

    def interrupted_save(path):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return save(path)
    trainer.save = interrupted_save
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert trainer.saved == tmp_path / "last.npz"
    assert read_checkpoint(tmp_path / "last.npz")[1]["meta"]["step"] == trainer.step == 50
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler      # handlers given back


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_second_ctrl_c_in_the_middle_of_an_update_saves_no_half_applied_state(tmp_path):
    """The second Ctrl-C stops at once; if it cut an update short, last.npz is not written (it would
    resume from parameters that are neither the step before nor the step after)."""
    trainer = small_trainer(tmp_path)
    make_step, calls = trainer._step_function, []

    def step_function():
        step = make_step()

        def cut(batch):
            calls.append(1)
            if len(calls) == 3:        # both arrive inside the third update
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return step(batch)
        return cut
    trainer._step_function = step_function
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert trainer.step == 2 and trainer.saved is None and not (tmp_path / "last.npz").exists()


# ---- (c) the copy task ----------------------------------------------------------------------------

COPY_SCRIPT = textwrap.dedent("""
    import json, time
    import numpy as np
    import minitransformer as mt
    from minitransformer.data import BOS_ID, EOS_ID, collate
    from minitransformer.decode import beam_search, greedy_decode
    from minitransformer.nn import Transformer
    from minitransformer.train import Trainer, TrainConfig

    def sequences(rng, n, exclude=frozenset()):
        out = []
        while len(out) < n:
            s = rng.integers(4, 20, size=rng.integers(3, 9)).tolist()
            if tuple(s) not in exclude:
                out.append(s)
        return out

    held_out = sequences(np.random.default_rng(12345), 100)
    never_train = frozenset(map(tuple, held_out))

    def batches(epoch):   # 50 fresh batches of 32 sequences an epoch, none of them held out
        rng = np.random.default_rng((0, epoch))
        return [collate(s, s) for s in (sequences(rng, 32, never_train) for _ in range(50))]

    mt.manual_seed(0)
    model = Transformer(vocab_size=20, d_model=64, num_heads=4, num_layers=2, d_ff=128, dropout=0.0, max_len=64)
    started = time.perf_counter()
    trainer = Trainer(model, batches, TrainConfig(steps=900, warmup_steps=100, lr_factor=1.0,
                                                  label_smoothing=0.0, log_every=50), progress=False)
    trainer.run()
    trainer.schedule.factor *= 0.1   # cool down: 300 more steps at a tenth of the rate
    trainer.config.steps = 1200
    trainer.run()
    seconds = time.perf_counter() - started
    src = collate(held_out, held_out).src
    greedy = greedy_decode(model, src, BOS_ID, EOS_ID, max_len_a=1.0, max_len_b=5)
    beam = beam_search(model, src, BOS_ID, EOS_ID, beam_size=4, max_len_a=1.0, max_len_b=5)
    print(json.dumps({"greedy": sum(o == s for o, s in zip(greedy, held_out)),
                      "beam": sum(o == s for o, s in zip(beam, held_out)),
                      "wrong": [[s, o] for s, o in zip(held_out, greedy) if s != o][:5],
                      "steps": trainer.step, "losses": trainer.losses, "seconds": seconds}))
""")


def test_tiny_transformer_learns_to_copy(tmp_path):
    """vocab 20, d_model 64, 4 heads, 2 layers, d_ff 128, no dropout: 1200 steps of 32 random
    sequences (ids 4..19, length 3..8) copy all of 100 held-out sequences exactly. (800 steps were
    enough with this machine's BLAS but left 9 of 100 one token short with another's.)"""
    script = tmp_path / "copy_task.py"
    script.write_text(COPY_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["steps"] == 1200
    assert report["losses"][0][1] > 1.0 > 0.1 > report["losses"][-1][1]
    assert report["greedy"] == 100, report["wrong"]
    assert report["beam"] == 100


# ---- (d) loss, budgets, checkpoints, errors ---------------------------------------------------------

def reversal_batches(seed, count, size=8):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        src = [rng.integers(4, 20, size=rng.integers(2, 8)).tolist() for _ in range(size)]
        batches.append(collate(src, [s[::-1] for s in src]))
    return batches


def tiny_model(dropout=0.0):
    return Transformer(vocab_size=20, d_model=32, num_heads=2, num_layers=1, d_ff=64, dropout=dropout, max_len=32)


def test_training_lowers_the_validation_loss():
    model, valid = tiny_model(dropout=0.1), reversal_batches(1, 4)
    before = evaluate_loss(model, valid)
    assert model.training   # evaluate_loss puts the mode back
    trainer = Trainer(model, lambda epoch: reversal_batches((2, epoch), 10),
                      TrainConfig(steps=40, warmup_steps=10, log_every=1), progress=False)
    last = trainer.run()
    after = evaluate_loss(model, valid)
    assert np.log(20) - 1.0 < before < np.log(20) + 1.5   # untrained: about uniform over the vocabulary
    assert after < before - 0.3
    assert last == trainer.losses[-1][1] and len(trainer.losses) == 40
    assert evaluate_loss(model, valid) == after   # evaluation mode: no dropout, deterministic


def test_a_budget_is_required():
    with pytest.raises(ValueError, match="budget"):
        Trainer(tiny_model(), lambda e: reversal_batches(0, 2), TrainConfig(), progress=False).run()


def test_empty_epoch_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        Trainer(tiny_model(), lambda e: [], TrainConfig(steps=3), progress=False).run()


def test_a_time_budget_stops_the_run():
    minutes = 0.01
    trainer = Trainer(tiny_model(), lambda e: reversal_batches((3, e), 5),
                      TrainConfig(minutes=minutes, warmup_steps=10, log_every=1), progress=False)
    started = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - started
    assert trainer.step > 1
    assert minutes * 60 <= trainer.elapsed <= wall < minutes * 60 + 10
    assert trainer.epoch >= 1   # 5 batches an epoch: the stream went on into the next epochs
    steps = trainer.step        # the budget is spent: running again trains no further
    trainer.run()
    assert trainer.step == steps


def test_interval_checkpoints_keep_the_newest_and_validation_is_logged(tmp_path):
    seen = []
    trainer = Trainer(tiny_model(), lambda e: reversal_batches((4, e), 5),
                      TrainConfig(steps=12, warmup_steps=5, log_every=4, eval_every=4, checkpoint_every=3,
                                  keep_checkpoints=2),
                      out_dir=tmp_path, valid_batches=reversal_batches(5, 2),
                      on_eval=lambda t: seen.append(t.step) or {"custom": t.step * 10}, progress=False)
    trainer.run()
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["checkpoint-00000009.npz", "checkpoint-00000012.npz",
                                                              "last.npz"]
    assert [s for s, _ in trainer.losses] == [4, 8, 12]
    assert seen == [4, 8, 12]
    assert [h["step"] for h in trainer.history] == [4, 8, 12]
    assert all(np.isfinite(h["valid_loss"]) and h["custom"] == h["step"] * 10 for h in trainer.history)
    _, info = read_checkpoint(tmp_path / "checkpoint-00000009.npz")
    assert info["meta"]["step"] == 9 and info["optimizer"]["step_count"] == 9
    _, info = read_checkpoint(tmp_path / "last.npz")
    assert info["meta"]["step"] == 12 and len(info["meta"]["history"]) == 3
    assert info["meta"]["train_config"]["keep_checkpoints"] == 2


class _FlushRecorder(io.StringIO):
    """A stdout that remembers what it held at its last flush: what a log file would show by then."""
    flushed = ""

    def flush(self):
        self.flushed = self.getvalue()


def test_without_progress_validation_lines_reach_stdout_as_they_come(monkeypatch, capsys):
    """progress=False (``train --no-progress``): nothing on stderr, and each validation record is on
    stdout, flushed, before the next evaluation starts (a log file is not left behind the run)."""
    stdout, flushed_at_eval = _FlushRecorder(), []
    monkeypatch.setattr(sys, "stdout", stdout)

    def on_eval(trainer):
        flushed_at_eval.append(stdout.flushed == stdout.getvalue())
        return {"samples": [f"sample at {trainer.step}"]}
    trainer = Trainer(tiny_model(), lambda e: reversal_batches((6, e), 5),
                      TrainConfig(steps=8, warmup_steps=5, log_every=4, eval_every=4), on_eval=on_eval, progress=False)
    trainer.run()
    lines = stdout.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines[::2]] == ["step 4", "step 8"]
    assert lines[1::2] == ["  sample at 4", "  sample at 8"]
    assert flushed_at_eval == [True, True] and stdout.flushed == stdout.getvalue()
    assert capsys.readouterr().err == ""


# ---- (e) the GPU computes the same training run as the CPU ------------------------------------
@pytest.mark.skipif(not mt.cuda_is_available(), reason="needs a GPU and CuPy")
def test_twenty_steps_on_cupy_match_numpy_to_float32_rounding():
    """Same seed, same batches, dropout 0: the loss of each of the first 20 Adam + Noam steps on
    CuPy equals NumPy's to float32 rounding (only summation order differs between the devices)."""
    from minitransformer.optim import Adam, NoamSchedule
    from minitransformer.train import train_step

    rng = np.random.default_rng(5)
    batches = []
    for _ in range(20):
        src = [rng.integers(4, 50, size=rng.integers(3, 12)).tolist() for _ in range(8)]
        batches.append(collate(src, [s[::-1] for s in src]))
    losses = {}
    for device in ("cpu", "cuda"):
        mt.manual_seed(7)          # the same initial weights, drawn on the CPU, then moved
        model = Transformer(vocab_size=50, d_model=64, num_heads=4, num_layers=2, d_ff=128, dropout=0.0,
                            max_len=32).to(device)
        optimizer = Adam(model.parameters(), lr=0.0)
        schedule = NoamSchedule(optimizer, model.d_model, warmup_steps=10)
        losses[device] = np.array([float(train_step(model, optimizer, schedule, b)) for b in batches])
    rel = np.abs(losses["cuda"] - losses["cpu"]) / np.abs(losses["cpu"])
    print(f"worst relative difference of the 20 losses, CuPy vs NumPy: {rel.max():.2e}")
    assert losses["cpu"][-1] < losses["cpu"][0] - 0.2, "the run did not learn: the comparison would be vacuous"
    assert rel.max() < 1e-4, f"CuPy and NumPy losses differ beyond float32 rounding: {rel}"
