"""The host side of CUDA-graph capture (minitransformer/cuda_graph.py, kernels/capture.py), which
runs anywhere: the dropout counter during and after a capture, the per-step numbers Adam hands a
replay, masks built where the ids are, and clear errors. The captured step itself is tested on the
GPU (tests/test_kernels.py)."""
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
