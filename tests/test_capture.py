"""The host side of CUDA-graph capture (minitransformer/cuda_graph.py, kernels/capture.py), which
runs anywhere: the dropout counter during and after a capture, the per-step numbers Adam hands a
replay, masks built where the ids are, clear errors, and the order in which a step is run eagerly,
recorded and launched (on a stand-in stream). The captured step itself is tested on the GPU
(tests/test_kernels.py)."""
import math

import numpy as np
import pytest

import minitransformer as mt
from minitransformer import backend, kernels
from minitransformer.nn.transformer import causal_mask
from minitransformer.optim import Adam, NoamSchedule


class _FakeCapture:
    counter_start = numbers = 0


def test_a_capture_hands_out_offsets_from_its_start_and_then_rewinds_the_counter():
    mt.manual_seed(4)
    backend.counter_stream(100)                       # an eager step drew 100 numbers
    capture = _FakeCapture()
    previous = backend.set_capture(capture)
    try:
        assert backend.capturing() is capture
        assert backend.counter_stream(30) == (4, 0)   # relative: the replay adds its own start
        assert backend.counter_stream(12) == (4, 30)
    finally:
        assert backend.set_capture(previous) is capture
    assert backend.capturing() is None
    assert capture.numbers == 42
    assert backend.random_state()["counter"] == 100   # the capture itself drew nothing
    assert backend.counter_stream(42) == (4, 100)     # what a replay takes


def test_adam_corrections_are_the_numbers_its_step_uses():
    p = mt.nn.Parameter(mt.tensor(np.ones(3)).data)
    opt = Adam([p], lr=0.0)
    schedule = NoamSchedule(opt, 64, warmup_steps=10)
    for t in (1, 2, 50):
        opt.step_count, schedule.step_count = t - 1, t - 1
        schedule.step()
        opt.step_count += 1
        step_size, c2 = opt.corrections()
        assert step_size == pytest.approx(schedule.rate(t) / (1 - 0.9 ** t))
        assert c2 == pytest.approx(math.sqrt(1 - 0.98 ** t))


def test_the_causal_mask_is_made_by_the_ids_array_module():
    np.testing.assert_array_equal(causal_mask(4), np.tril(np.ones((4, 4), dtype=bool)))
    assert causal_mask(3, np).dtype == bool


def test_kernels_matmul_is_the_at_operator_outside_a_capture(rng):
    a, b = rng.standard_normal((5, 3)), rng.standard_normal((3, 4))
    np.testing.assert_array_equal(kernels.matmul(a, b), a @ b)
    np.testing.assert_array_equal(kernels.matmul(a.T.T, b.T.T), a @ b)


def test_a_cuda_graph_step_needs_a_model_on_the_gpu():
    from minitransformer.cuda_graph import CudaGraphStep
    model = mt.nn.Transformer(vocab_size=20, d_model=8, num_heads=2, num_layers=1, d_ff=16)
    with pytest.raises(ValueError, match="CudaGraphStep: CUDA graphs need the model on the GPU"):
        CudaGraphStep(model, Adam(model.parameters()))


def test_the_step_benchmark_refuses_a_cuda_graph_on_the_cpu():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
    run = subprocess.run([sys.executable, str(script), "--device", "cpu", "--cuda-graph"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "--cuda-graph needs --device cuda" in run.stderr


# ---- the order of a captured step's calls, with a stand-in for CuPy's stream --------------------

class _FakeStream:
    """Logs what ``cuda_graph`` asks of a CUDA stream; ``end_capture`` hands out a graph whose
    ``launch`` is logged too (or fails, as an invalidated capture does)."""

    def __init__(self, fail_end=False):
        self.log, self.capturing, self.fail_end = [], False, fail_end

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        self.log.append("synchronize")

    def begin_capture(self):
        self.capturing = True
        self.log.append("begin")

    def end_capture(self):
        self.capturing = False
        self.log.append("end")
        if self.fail_end:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.graphs = getattr(self, "graphs", 0) + 1
        return _FakeGraph(self.graphs)


class _FakeGraph:
    def __init__(self, number):
        self.number = number                # the stream's n-th recorded graph

    def launch(self, stream):
        stream.log.append("launch")
        stream.launched = getattr(stream, "launched", []) + [self.number]


@pytest.fixture
def fake_cuda(monkeypatch):
    """``cuda_graph`` on a stand-in CuPy: streams that log, no pool, no cuBLAS."""
    import contextlib
    import types

    from minitransformer import cuda_graph
    streams = []

    def stream(fail_end=False):
        streams.append(_FakeStream(fail_end))
        return streams[-1]
    cuda = types.SimpleNamespace(Stream=stream, MemoryPool=lambda: types.SimpleNamespace(malloc=None),
                                 using_allocator=lambda malloc: contextlib.nullcontext())
    monkeypatch.setattr(backend, "cupy", lambda: types.SimpleNamespace(cuda=cuda))
    monkeypatch.setattr(cuda_graph, "Blas", lambda stream: None)
    monkeypatch.setattr(cuda_graph, "Capture", lambda stream, blas: _FakeCapture())
    return streams


def test_a_captured_step_runs_eagerly_once_is_recorded_once_then_only_launched(fake_cuda):
    from minitransformer.cuda_graph import CapturedStep
    seen = []
    step = CapturedStep(lambda: seen.append((fake_cuda[0].capturing, backend.capturing() is not None)))
    for _ in range(4):
        step()
    assert seen == [(False, False), (True, True)]          # eager, then recorded; replays run no Python
    assert fake_cuda[0].log == ["synchronize", "begin", "end", "launch", "launch", "launch"]
    assert step.calls == 4 and backend.capturing() is None


def test_a_step_with_two_phases_records_one_graph_per_phase_and_replays_them_in_turn(fake_cuda):
    """period=2 (beam search swaps two cache buffers each step): call c replays the graph recorded
    at the first call of phase c % 2, so each replay finds the buffers its graph was recorded with."""
    from minitransformer.cuda_graph import CapturedStep
    phase = []                                            # the host state: which buffer is current
    step = CapturedStep(lambda: phase.append(len(phase) % 2), period=2)
    for _ in range(7):
        step()
    assert phase == [0, 1, 0]                             # eager, then recorded at calls 1 and 2
    assert fake_cuda[0].launched == [1, 2, 1, 2, 1, 2]    # calls 1..6: phases 1, 0, 1, 0, 1, 0
    assert fake_cuda[0].log.count("begin") == 2 and step.graph is step.graphs[1]
    with pytest.raises(ValueError, match="CapturedStep: period must be >= 1"):
        CapturedStep(lambda: None, period=0)


def test_a_step_that_fails_while_recorded_ends_the_capture_and_raises(fake_cuda):
    from minitransformer.cuda_graph import CapturedStep
    calls = []

    def step():
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("a host check failed")
    captured = CapturedStep(step)
    captured()
    with pytest.raises(ValueError, match="a host check failed"):
        captured()
    assert fake_cuda[0].log == ["synchronize", "begin", "end"]   # ended before anything else touches the GPU
    assert captured.graph is None and backend.capturing() is None


def test_a_capture_the_driver_rejects_names_the_step_and_the_way_out(fake_cuda):
    from minitransformer import cuda_graph
    captured = cuda_graph.CapturedStep(lambda: None, "beam_search")
    captured.stream.fail_end = True
    captured()
    with pytest.raises(RuntimeError, match=r"beam_search: capturing the step as a CUDA graph failed "
                                           r"\(operation not permitted .*\); call beam_search without cuda_graph"):
        captured()
    assert backend.capturing() is None


def test_the_done_flag_of_a_replayed_search_is_read_one_step_late(monkeypatch):
    """``LaggedAll``: each call queues this step's ``all()`` for an asynchronous copy and returns
    the previous step's (False first), waiting only for the previous copy's event — so the host can
    launch the next step before it waits (a stand-in CuPy whose copies land at once)."""
    import ctypes
    import types

    from minitransformer import cuda_graph
    log = []

    class Scalar:                       # a 0-d "device" array: its bytes at a real address
        def __init__(self, value):
            self.host = np.array(value, dtype=np.bool_)
            self.data = types.SimpleNamespace(ptr=self.host.ctypes.data)

    class Flags:                        # the "device" done flags, set by the test between steps
        value = np.zeros(3, dtype=bool)

        def all(self):
            return Scalar(self.value.all())

    class Event:
        def __init__(self, disable_timing=False):
            self.n = len([e for e in log if e[0] == "record"])

        def record(self, stream):
            log.append(("record", self.n))

        def synchronize(self):
            log.append(("wait", self.n))

    class Stream:
        ptr = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    runtime = types.SimpleNamespace(memcpyDeviceToHost=2,
                                    memcpyAsync=lambda dst, src, n, kind, stream: ctypes.memmove(dst, src, n))
    cuda = types.SimpleNamespace(alloc_pinned_memory=lambda n: bytearray(n), runtime=runtime, Event=Event)
    monkeypatch.setattr(backend, "cupy", lambda: types.SimpleNamespace(cuda=cuda))
    flags = Flags()
    finished = cuda_graph.LaggedAll(flags, Stream())
    seen = []
    for done in ([0, 0, 0], [1, 0, 1], [1, 1, 1], [1, 1, 1]):
        flags.value = np.array(done, dtype=bool)
        seen.append(finished())
    assert seen == [False, False, False, True]            # step 3 is the first all-done, seen at step 4
    assert log == [("record", 0), ("record", 1), ("wait", 0), ("record", 2), ("wait", 1),
                   ("record", 3), ("wait", 2)]            # each call waits for the call before's copy only


def test_own_handles_are_kept_for_the_last_few_streams_only(monkeypatch):
    """kernels.OWN_HANDLE: one cuBLAS handle (and 32 MiB workspace) per stream, reused on that stream,
    let go once several other streams came after it (each captured step or search has its own)."""
    from types import SimpleNamespace
    from minitransformer.kernels import capture
    made = []

    class Blas:
        def __init__(self, stream):
            made.append(stream.ptr)

    current = [SimpleNamespace(ptr=0)]
    monkeypatch.setattr(capture, "Blas", Blas)
    monkeypatch.setattr(backend, "cupy", lambda: SimpleNamespace(cuda=SimpleNamespace(get_current_stream=lambda: current[0])))
    monkeypatch.setattr(kernels, "OWN_HANDLE", True)
    monkeypatch.setattr(kernels, "_own_blas", type(kernels._own_blas)())
    first = kernels._eager_blas()
    for ptr in range(1, 10):
        current[0] = SimpleNamespace(ptr=ptr)
        assert kernels._eager_blas() is kernels._eager_blas()        # one handle a stream
        if ptr < 4:                                                  # stream 0 is used again now and then
            current[0] = SimpleNamespace(ptr=0)
            assert kernels._eager_blas() is first
    assert len(kernels._own_blas) == kernels._OWN_BLAS_KEPT
    assert list(kernels._own_blas) == [6, 7, 8, 9]
    assert made == list(range(10))
    monkeypatch.setattr(kernels, "OWN_HANDLE", False)
    assert kernels._eager_blas() is None
