"""A whole training step (forward, loss, backward, Adam) captured as a CUDA graph and replayed (GPU).

Why: a small model's step is a few hundred kernel launches, each costing ~10 µs of Python and CuPy
host time, so the GPU waits for the host. A captured graph launches all of them with one call.

How it works (``CudaGraphStep``):
- One graph per batch shape. Batches are padded (with ``pad_id``, which the loss and the attention
  masks ignore) up to multiples of ``pad_to`` so that a run sees fewer shapes (90 in 1500 steps of
  the small preset on the default corpus, H200 run in docs/results.md).
- The first batch of a shape runs eagerly (a real update), then a step of that shape is captured:
  Python runs ``train_step`` once more while the GPU only records. What that run advanced on the host
  (schedule, optimizer step, dropout counter) is put back, so the capture itself changes nothing.
- A replay checks the host batch, copies it into the graph's input buffers, sets the two numbers that
  change every step (Adam's step size with the Noam rate, the dropout stream's offset) in device
  memory, and launches the graph (``kernels.capture`` explains why these live on the device).
- Memory: every graph allocates from one private pool. Graphs run one at a time on one stream and
  nothing a graph writes is read after the next launch (the loss is copied out at once), so they
  can share it. It keeps what it once held (base on the H200: 10,947 MiB in all for the graph side
  against 9,302 MiB peak for the eager step, docs/results.md).

The losses equal the eager step's to float32 rounding (``tests/test_kernels.py``): the same kernels
run, the matrix products through our own cuBLAS handle.
"""
from dataclasses import dataclass

import numpy as np

from . import backend
from .data import Batch
from .functional.embedding import check_ids
from .kernels.capture import Blas, Capture, pinned_empty, upload_async
from .optim import Adam
from .train import train_step


def record(stream, capture, what, hint, fn):
    """Record ``fn()`` on ``stream`` as a CUDA graph — the GPU runs nothing yet — and return
    ``(graph, fn's result)``; the kernels read ``capture`` (a ``Capture``, made beforehand outside
    the pool) while recording. Call it under the allocator the replays will use, after an eager run
    of ``fn`` on it (which compiles the kernels and gives the pool its blocks: the device cannot
    allocate while it records)."""
    stream.synchronize()                    # earlier work is done before recording starts
    previous = backend.set_capture(capture)
    stream.begin_capture()
    try:
        result = fn()
    except BaseException:
        try:
            stream.end_capture()            # end it before the device is touched again
        except Exception:  # noqa: BLE001  (an invalidated capture also errors here)
            pass
        raise
    finally:
        backend.set_capture(previous)
    try:
        graph = stream.end_capture()
    except Exception as e:
        raise RuntimeError(f"{what}: capturing the step as a CUDA graph failed ({e}); {hint}") from e
    return graph, result


class CapturedStep:
    """``step()`` — work on device arrays only, updating them in place, the same every call — run
    eagerly the first time, then recorded once and replayed as one CUDA graph (decoding: a beam
    search step over a fixed-size cache, ``decode.beam_search(cuda_graph=True)``).

    The arrays the step keeps must exist before the first call or be made by it (those stay
    alive); what it allocates and drops comes from a private pool that only its replays use.
    ``period``: the step's host-side state repeats every ``period`` calls (beam search swaps two
    cache buffers each step: period 2), so call ``c`` replays the graph of phase ``c % period``,
    recorded at its first call.
    """

    def __init__(self, step, what="CapturedStep", period=1):
        if period < 1:
            raise ValueError(f"CapturedStep: period must be >= 1, got {period}")
        cp = backend.cupy()
        self.step, self.what, self.period = step, what, period
        self.stream = cp.cuda.Stream()      # blocking: ordered with the default stream the rest uses
        self.pool = cp.cuda.MemoryPool()
        self.blas = Blas(self.stream)
        self.graphs = [None] * period
        self.capture = None
        self.calls = 0

    @property
    def graph(self):
        """The graph of phase 1 (the first recorded), or None before the second call."""
        return self.graphs[1 % self.period]

    def __call__(self):
        cp = backend.cupy()
        if self.calls == 1:
            self.capture = Capture(self.stream, self.blas)   # kept: the graphs read it at every replay
        with cp.cuda.using_allocator(self.pool.malloc), self.stream:
            if self.calls == 0:
                self.step()
            else:
                phase = self.calls % self.period
                if self.graphs[phase] is None:
                    self.graphs[phase], _ = record(self.stream, self.capture, self.what,
                                                   f"call {self.what} without cuda_graph", self.step)
                self.graphs[phase].launch(self.stream)
        self.calls += 1


class LaggedAll:
    """``array.all()`` of a device bool array, read one call late: a call queues this step's value
    for an asynchronous copy to pinned host memory on ``stream`` and returns the one queued by the
    call before (False at the first call), waiting only for that. The host can then launch the
    next step while the GPU still runs this one, instead of draining the queue every step
    (a replayed decoding step: one launch, then the GPU would idle while the host checks)."""

    def __init__(self, array, stream):
        self.array, self.stream = array, stream
        self._memory, self._host = zip(*(pinned_empty((1,), np.bool_) for _ in range(2)))
        self._pending = [None, None]        # (event, the device flag it copies) per buffer
        self.calls = 0

    def __call__(self):
        cp = backend.cupy()
        now, before = self.calls % 2, (self.calls + 1) % 2
        with self.stream:
            flag = self.array.all()
            cp.cuda.runtime.memcpyAsync(self._host[now].ctypes.data, flag.data.ptr, 1,
                                        cp.cuda.runtime.memcpyDeviceToHost, self.stream.ptr)
            event = cp.cuda.Event(disable_timing=True)
            event.record(self.stream)
        self._pending[now] = (event, flag)  # the flag stays alive until its copy is done
        self.calls += 1
        if self._pending[before] is None:
            return False
        self._pending[before][0].synchronize()
        return bool(self._host[before][0])


@dataclass
class _Graph:
    graph: object               # cupy.cuda.Graph
    inputs: tuple               # device (src, tgt_in, tgt_out): a replay copies the batch here
    loss: object                # the 0-d device array the graph writes the loss into
    capture: Capture            # device scalars the graph reads, pinned buffers it copies from
    numbers: int                # dropout numbers one step draws
    seed: int                   # the dropout stream's seed at capture (a new manual_seed recaptures)


class CudaGraphStep:
    """``step(batch) -> loss`` like ``train.train_step``, replaying a captured graph per batch shape.

    ``model`` must be on the GPU, ``optimizer`` an ``Adam`` over its parameters (fused kernels on).
    ``captures`` and ``replays`` count what happened (shown by the benchmark and the trainer).
    """

    def __init__(self, model, optimizer, schedule=None, label_smoothing=0.1, clip_norm=None, pad_to=8):
        if model.device != "cuda":
            raise ValueError("CudaGraphStep: CUDA graphs need the model on the GPU (model.to('cuda'))")
        if not isinstance(optimizer, Adam):
            raise TypeError(f"CudaGraphStep: the captured step updates with Adam's fused kernel, got {type(optimizer).__name__}")
        if not backend.fused(optimizer.params[0].data):
            raise RuntimeError("CudaGraphStep: CUDA graphs need the fused kernels (they are off: "
                               "MINITRANSFORMER_FUSED=0 or backend.set_fused(False))")
        if pad_to < 1:
            raise ValueError(f"CudaGraphStep: pad_to must be >= 1, got {pad_to}")
        cp = backend.cupy()
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.label_smoothing, self.clip_norm, self.pad_to = label_smoothing, clip_norm, pad_to
        self.stream = cp.cuda.Stream()      # blocking: ordered with the default stream the rest uses
        self.pool = cp.cuda.MemoryPool()
        self.blas = Blas(self.stream)
        self.dtypes = sorted({p.dtype for p in optimizer.params}, key=str)   # the Adam launches a step makes
        self.graphs = {}
        self.captures = self.replays = 0

    # ---- the step ---------------------------------------------------------------------------
    def __call__(self, batch):
        src, tgt_in, tgt_out = self._host_batch(batch)
        key = (src.shape, tgt_in.shape)
        entry = self.graphs.get(key)
        if entry is not None and entry.seed == backend.random_state()["seed"]:
            return self._replay(entry, src, tgt_in, tgt_out)
        loss = self._eager(src, tgt_in, tgt_out)
        self.graphs[key] = self._capture(src.shape, tgt_in.shape)
        return loss

    def _host_batch(self, batch):
        """The batch as int64 host arrays, checked (the graph cannot check on the GPU) and padded."""
        pad = self.model.pad_id
        V = self.model.vocab_size
        arrays = []
        for name in ("src", "tgt_in", "tgt_out"):
            a = getattr(batch, name)
            if backend.device_of(a) != "cpu":
                raise TypeError(f"CudaGraphStep: batch.{name} must be a host (NumPy) array, got a GPU array")
            a = np.asarray(a)
            if a.ndim != 2:
                raise ValueError(f"CudaGraphStep: batch.{name} must be (batch, length), got shape {a.shape}")
            check_ids("CudaGraphStep", a, V, what=f"{name} id")
            arrays.append(a)
        src, tgt_in, tgt_out = arrays
        if tgt_in.shape != tgt_out.shape or src.shape[0] != tgt_in.shape[0]:
            raise ValueError(f"CudaGraphStep: shapes src {src.shape}, tgt_in {tgt_in.shape}, tgt_out {tgt_out.shape} "
                             "do not make one batch")
        B = self._round(src.shape[0])
        return tuple(self._padded(a, B, self._round(a.shape[1]), pad) for a in arrays)

    def _round(self, n):
        return -(-n // self.pad_to) * self.pad_to

    @staticmethod
    def _padded(a, rows, cols, pad):
        if a.shape == (rows, cols):
            return np.ascontiguousarray(a, dtype=np.int64)
        out = np.full((rows, cols), pad, dtype=np.int64)
        out[:a.shape[0], :a.shape[1]] = a
        return out

    def _eager(self, src, tgt_in, tgt_out):
        """An ordinary step on the graph's stream and pool (compiles, fills caches, sizes the pool)."""
        cp = backend.cupy()
        with cp.cuda.using_allocator(self.pool.malloc), self.stream:
            batch = Batch(cp.asarray(src), cp.asarray(tgt_in), cp.asarray(tgt_out), None)
            loss = train_step(self.model, self.optimizer, self.schedule, batch, self.label_smoothing, self.clip_norm)
        self.optimizer.zero_grad()
        return loss

    def _capture(self, src_shape, tgt_shape):
        cp = backend.cupy()
        inputs = (cp.empty(src_shape, dtype=cp.int64), cp.empty(tgt_shape, dtype=cp.int64),
                  cp.empty(tgt_shape, dtype=cp.int64))
        opt, schedule = self.optimizer, self.schedule
        saved = (opt.step_count, opt.lr, schedule.step_count if schedule is not None else None)
        seed = backend.random_state()["seed"]
        capture = Capture(self.stream, self.blas)
        with cp.cuda.using_allocator(self.pool.malloc), self.stream:
            try:
                graph, loss = record(
                    self.stream, capture, "CudaGraphStep", "train without --cuda-graph",
                    lambda: train_step(self.model, opt, schedule, Batch(*inputs, None), self.label_smoothing,
                                       self.clip_norm))
            finally:
                opt.step_count, opt.lr = saved[0], saved[1]
                if schedule is not None:
                    schedule.step_count = saved[2]
                opt.zero_grad()                 # the captured gradients are the graph's, not the user's
        self.captures += 1
        return _Graph(graph, inputs, loss, capture, capture.numbers, seed)

    def _replay(self, entry, src, tgt_in, tgt_out):
        opt = self.optimizer
        for device, host in zip(entry.inputs, (src, tgt_in, tgt_out)):
            upload_async(device, host, self.stream)
        if self.schedule is not None:
            self.schedule.step()
        opt.step_count += 1
        corrections = opt.corrections()
        for dtype in self.dtypes:
            upload_async(entry.capture.adam_scalars[dtype], np.array(corrections, dtype=dtype), self.stream)
        _, offset = backend.counter_stream(entry.numbers)
        upload_async(entry.capture.offset_base, np.array([offset], dtype=np.uint64), self.stream)
        entry.graph.launch(self.stream)
        self.replays += 1
        with self.stream:
            return entry.loss.copy()            # the next replay overwrites entry.loss
