"""The training loop of §5: batches → loss → backward → Adam + Noam → checkpoints.

``train_step`` is one update and nothing else (the unit that tests and benchmarks time);
``Trainer`` adds what a run needs around it: a step or time budget, progress, periodic
validation, interval checkpoints that resume *exactly* (model, optimiser, schedule, data
position and random state), and a checkpoint on Ctrl-C (or SIGTERM, SIGHUP).
"""
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import backend
from . import functional as F
from .checkpoint import load_checkpoint, save_checkpoint
from .optim import Adam, NoamSchedule, clip_grad_norm
from .progress import LineProgress, progress_bar
from .tensor import no_grad


def batch_loss(model, batch, label_smoothing=0.0):
    """Label-smoothed cross-entropy (§5.4) of one batch, averaged over its target tokens."""
    logits = model(batch.src, batch.tgt_in)                              # (B, T, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.tgt_out.reshape(-1),
                           ignore_index=model.pad_id, label_smoothing=label_smoothing)


def train_step(model, optimizer, schedule, batch, label_smoothing=0.1, clip_norm=None):
    """One update. Returns the loss as a 0-d array on the model's device: reading it with
    ``float()`` waits for the GPU, so the loop does that only every few steps."""
    model.train()
    optimizer.zero_grad()
    loss = batch_loss(model, batch, label_smoothing)
    loss.backward()
    if clip_norm:
        clip_grad_norm(optimizer.params, clip_norm)
    if schedule is not None:
        schedule.step()
    optimizer.step()
    return loss.data


def evaluate_loss(model, batches):
    """Mean per-token cross-entropy (no smoothing) over ``batches``, in evaluation mode."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with no_grad():
        for batch in batches:
            n = int((np.asarray(batch.tgt_out) != model.pad_id).sum())
            total += float(batch_loss(model, batch).item()) * n
            tokens += n
    model.train(was_training)
    return total / max(tokens, 1)


@dataclass
class TrainConfig:
    steps: int = 0                  # stop after this many updates (0: no step limit)
    minutes: float = 0.0            # stop after this much wall time (0: no time limit)
    warmup_steps: int = 4000        # §5.3
    lr_factor: float = 1.0          # scales the Noam schedule
    betas: tuple = (0.9, 0.98)      # §5.3
    adam_eps: float = 1e-9          # §5.3
    label_smoothing: float = 0.1    # eps_ls, §5.4
    clip_norm: float = 0.0          # 0: no clipping
    log_every: int = 10             # read the loss (a host sync on the GPU) every N steps
    eval_every: int = 0             # validation every N steps (0: none during the run)
    checkpoint_every: int = 0       # interval checkpoints every N steps (0: only at the end)
    keep_checkpoints: int = 5       # interval checkpoints kept, for averaging (§6.1)
    cuda_graph: bool = False        # replay each batch shape's step as a CUDA graph (GPU; cuda_graph.py)


class Trainer:
    """Runs ``model`` on ``batches(epoch)`` (a function returning that epoch's batch list,
    deterministic for a given epoch) and writes checkpoints into ``out_dir``."""

    def __init__(self, model, batches, config, out_dir=None, valid_batches=None, on_eval=None,
                 progress=True):
        self.model, self.batches, self.config = model, batches, config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.valid_batches, self.on_eval, self.progress = valid_batches, on_eval, progress
        self.optimizer = Adam(model.parameters(), lr=0.0, betas=tuple(config.betas), eps=config.adam_eps)
        self.schedule = NoamSchedule(self.optimizer, model.d_model, config.warmup_steps, config.lr_factor)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.losses = []            # (step, loss) of every logged step
        self.history = []           # dicts logged at validation
        self.elapsed = 0.0          # training seconds, carried across resumes
        self.step_function = None   # train_step, or a cuda_graph.CudaGraphStep (set by run)
        self.saved = None           # the last.npz that run() wrote at its end (None: none was)

    # ---- checkpoints -------------------------------------------------------------------
    def save(self, path):
        meta = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "elapsed": self.elapsed, "losses": self.losses, "history": self.history,
                "train_config": asdict(self.config),
                "rng": backend.random_state()}
        return save_checkpoint(path, self.model, self.optimizer, self.schedule, meta)

    def resume(self, path):
        meta = load_checkpoint(path, self.model, self.optimizer, self.schedule)
        self.step, self.epoch = meta["step"], meta["epoch"]
        self.batch_in_epoch, self.elapsed = meta["batch_in_epoch"], meta["elapsed"]
        self.losses = [tuple(x) for x in meta["losses"]]
        self.history = meta["history"]
        backend.set_random_state(meta["rng"])
        return meta

    def _interval_checkpoint(self):
        path = self.save(self.out_dir / f"checkpoint-{self.step:08d}.npz")
        old = sorted(self.out_dir.glob("checkpoint-*.npz"))[: -self.config.keep_checkpoints]
        for p in old:
            p.unlink()
        return path

    # ---- the loop ----------------------------------------------------------------------
    def _stream(self):
        """(epoch, index, batch) from the saved position onwards, epoch after epoch."""
        while True:
            epoch_batches = self.batches(self.epoch)
            if not epoch_batches:
                raise ValueError("Trainer: the training data produced no batches")
            for i in range(self.batch_in_epoch, len(epoch_batches)):
                yield i, epoch_batches[i]
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _finished(self, started):
        c = self.config
        if c.steps and self.step >= c.steps:
            return True
        return bool(c.minutes) and self.elapsed + (time.perf_counter() - started) >= c.minutes * 60

    def run(self):
        """Train until the step or time budget is spent (or a stop signal); returns the last logged loss.

        Ctrl-C (SIGINT), SIGTERM and SIGHUP (``timeout``, a job scheduler, a closed ssh session)
        stop the run after the current update and save ``last.npz``; a second one stops at once,
        and then ``last.npz`` is written only if no update was cut in half (a half-applied Adam step
        would resume as if it had not happened). Signals that arrive while ``last.npz`` is being
        written wait for it. ``saved`` is the path written at the end (None if none was)."""
        c = self.config
        if not (c.steps or c.minutes):
            raise ValueError("Trainer: set a step budget (steps) or a time budget (minutes)")
        bar = _progress(c.steps, self.step, self.progress)
        started, stop, saving = time.perf_counter(), [], []
        self.saved = None

        def on_signal(signum, frame):  # stop after the current update, never half-way through one
            if stop and not saving:    # a second one stops at once (but never mid-save)
                raise KeyboardInterrupt
            stop.append(signum)
        previous = _catch_stop_signals(on_signal)
        try:
            try:
                interrupted, whole = self._loop(started, stop, bar)
            finally:
                saving.append(True)
                self.elapsed += time.perf_counter() - started
                bar.close()
            if self.out_dir is not None and whole:  # the resumable state, also after a stop signal
                self.saved = self.save(self.out_dir / "last.npz")
        finally:
            _restore_signals(previous)
        if interrupted or stop:
            raise KeyboardInterrupt
        return self.losses[-1][1] if self.losses else float("nan")

    def _loop(self, started, stop, bar):
        """The updates of ``run``: ``(interrupted, whole)`` — whether a second signal cut it short,
        and whether every update it began was completed (the state is then a resumable one)."""
        c = self.config
        tokens_since, t_since, pending, whole = 0, time.perf_counter(), [], True
        step = self.step_function = self._step_function()
        try:
            for i, batch in self._stream():
                if stop or self._finished(started):
                    break
                whole = False
                loss = step(batch)
                self.step, self.batch_in_epoch = self.step + 1, i + 1
                whole = True
                pending.append(loss)
                tokens_since += batch.num_tgt_tokens
                if self.step % c.log_every == 0 or (c.steps and self.step == c.steps):
                    value = float(pending[-1])  # the only host sync of the loop
                    self.losses.append((self.step, value))
                    now = time.perf_counter()
                    bar.set_postfix(loss=f"{value:.3f}", lr=f"{self.optimizer.lr:.2e}",
                                    tok_s=f"{tokens_since / max(now - t_since, 1e-9):.0f}", refresh=False)
                    tokens_since, t_since, pending = 0, now, []
                    if not math.isfinite(value):
                        raise FloatingPointError(f"training diverged: loss is {value} at step {self.step}")
                bar.update(1)
                if c.eval_every and self.step % c.eval_every == 0:
                    self._evaluate(bar)
                if self.out_dir is not None and c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self._interval_checkpoint()
        except KeyboardInterrupt:
            return True, whole
        if pending:   # the last loss, when the budget ended between two logged steps
            self.losses.append((self.step, float(pending[-1])))
        return False, whole

    def _step_function(self):
        c = self.config
        if c.cuda_graph:
            from .cuda_graph import CudaGraphStep
            return CudaGraphStep(self.model, self.optimizer, self.schedule, c.label_smoothing, c.clip_norm or None)
        return lambda batch: train_step(self.model, self.optimizer, self.schedule, batch, c.label_smoothing,
                                        c.clip_norm)

    def _evaluate(self, bar):
        record = {"step": self.step}
        if self.valid_batches:
            record["valid_loss"] = evaluate_loss(self.model, self.valid_batches)
        if self.on_eval is not None:
            record.update(self.on_eval(self) or {})
        self.history.append(record)
        bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                             if not isinstance(v, (list, dict))))
        for line in record.get("samples", []):
            bar.write(f"  {line}")
        return record


# the signals that stop a run cleanly: Ctrl-C, and what ``timeout``, schedulers and a closed terminal send
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _catch_stop_signals(handler):
    """Install ``handler`` for the stop signals; returns the previous handlers ({} when signals cannot
    be caught here: not the main thread, or SIGINT left to C code)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        return {}
    previous = {s: signal.getsignal(s) for s in _STOP_SIGNALS}
    for s in _STOP_SIGNALS:
        if previous[s] is not signal.SIG_IGN:   # nohup's SIGHUP stays ignored
            signal.signal(s, handler)
    return previous


def _restore_signals(previous):
    for s, handler in previous.items():
        signal.signal(s, handler)


def _progress(total, initial, enabled):
    """The run's progress bar. Without progress, a disabled ``LineProgress``: it draws nothing but still
    prints what ``write`` is given (the validation lines) to stdout, flushed, where tqdm's own disabled
    bar would leave them in stdout's buffer, late in a log file."""
    if not enabled:
        return LineProgress(total=total or None, initial=initial, unit="step", disable=True)
    return progress_bar(total=total or None, initial=initial, unit="step", dynamic_ncols=True)
