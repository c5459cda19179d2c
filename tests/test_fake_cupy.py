"""The CPU stand-in for CuPy (``tests/fake_cupy.py``, behind ``MT_FAKE_CUDA=1``) keeps the CuPy
conventions the "cuda" tests rely on it for: were it laxer, those tests would pass where a GPU fails."""
import os
import types

import numpy as np
import pytest

import fake_cupy

cp = fake_cupy.make()


def test_device_arrays_refuse_host_arrays_as_cupy_does():
    x = cp.ones((2, 3))
    for mix in (lambda: x * np.ones(3), lambda: np.ones(3) + x, lambda: cp.where(x > 0, x, np.zeros((2, 3))),
                lambda: cp.concatenate([x, np.ones((1, 3))]), lambda: cp.add(x, 1, out=np.empty((2, 3)))):
        with pytest.raises(TypeError, match="host \\(NumPy\\) array"):
            mix()
    assert isinstance(x * 2.0 + np.float32(1), cp.ndarray)          # scalars are fine
    assert isinstance(x[np.array([1, 0])], cp.ndarray)             # host indices too (CuPy uploads them)
    target = cp.zeros(3)
    cp.add.at(target, np.array([0, 0, 2]), cp.ones(3))
    np.testing.assert_array_equal(cp.asnumpy(target), [2, 0, 1])


def test_reductions_and_one_element_give_0d_device_arrays():
    x = cp.arange(6.0).reshape(2, 3)
    for value in (x.sum(), x.max(), x[1, 2], x[1][2], cp.exp(x).mean()):
        assert isinstance(value, cp.ndarray) and value.ndim == 0
    view = x[0, 1]
    view[...] = 7                                                    # a view, as CuPy's
    assert float(x.get()[0, 1]) == 7


def test_asarray_keeps_device_arrays_and_uploads_host_data():
    x = cp.ones(3, dtype=np.float32)
    assert cp.asarray(x) is x and cp.asarray(x, dtype=np.float32) is x
    assert cp.asarray(x, dtype=np.float64).dtype == np.float64
    host = np.arange(3)
    up = cp.asarray(host)
    up[0] = 9
    assert isinstance(up, cp.ndarray) and host[0] == 0                # a copy
    assert cp.array(x) is not x
    assert type(cp.asnumpy(x)) is np.ndarray and type(x.get()) is np.ndarray


def test_argsort_is_stable():
    keys = cp.asarray(np.array([3, 1, 3, 1, 2, 1]))
    np.testing.assert_array_equal(cp.asnumpy(cp.argsort(keys)), [1, 3, 5, 4, 0, 2])


@pytest.fixture
def installed(monkeypatch):
    """The stand-in behind the package, for this test only ("cuda" is the CPU stand-in)."""
    from minitransformer import backend
    try:
        fake_cupy.install(monkeypatch.setattr, monkeypatch.setitem)
    except RuntimeError as e:      # as for the kernel emulator: CI always has a compiler (.ci/run)
        if os.environ.get("CI"):
            pytest.fail(f"the CuPy stand-in needs a C++ compiler: {e}")
        pytest.skip(f"the CuPy stand-in needs a C++ compiler ({e})")
    return backend.cupy()


def test_host_reads_are_refused_inside_no_host_reads():
    x = cp.ones(3)
    with fake_cupy.no_host_reads():
        for read in (lambda: float(x.sum()), lambda: bool(x[0]), lambda: x.sum().item(), lambda: x.get(),
                     lambda: cp.asnumpy(x), lambda: int(x[0]), lambda: x.tolist()):
            with pytest.raises(RuntimeError, match="inside no_host_reads"):
                read()
        y = (x * 2).sum()                                            # device work is fine
    assert float(y) == 6.0                                           # and reading, after


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_training_step_on_the_gpu_code_path_reads_nothing_back(installed, dropout):
    """What ``tests/test_kernels.py`` checks on a GPU with ``cupyx.allow_synchronize(False)``: no
    host read inside ``train_step`` (the loss stays on the device), here on every CI run."""
    import minitransformer as mt
    from minitransformer.data import collate
    from minitransformer.optim import Adam, NoamSchedule
    from minitransformer.train import train_step
    mt.manual_seed(0)
    model = mt.nn.Transformer(vocab_size=30, d_model=16, num_heads=4, num_layers=2, d_ff=32, dropout=dropout).to("cuda")
    opt = Adam(model.parameters(), lr=1e-3)
    schedule = NoamSchedule(opt, 16, warmup_steps=10)
    batch = collate([[5, 6, 7, 8], [9, 10]], [[8, 7, 6, 5], [10, 9]])
    train_step(model, opt, schedule, batch)                         # first step: buffers appear
    with fake_cupy.no_host_reads():
        losses = [train_step(model, opt, schedule, batch) for _ in range(3)]
    assert all(isinstance(loss, installed.ndarray) for loss in losses)
    values = [float(loss) for loss in losses]
    assert np.all(np.isfinite(values)) and values[2] < values[0]    # it trains


def test_a_capture_runs_nothing_and_a_replay_does_the_work():
    """As a CUDA graph: while a stream captures, device memory that existed keeps its values (the
    operations run here only for their shapes and are put back), and each launch redoes them, reading
    the inputs as they are then; what the capture allocated lives as long as the graph."""
    x, y = cp.ones(4), cp.zeros(4)
    stream = cp.cuda.Stream()
    with stream:
        stream.begin_capture()
        z = x * 2                                   # allocated by the capture
        y[...] = z + 1
        y += x.sum()
        graph = stream.end_capture()
    np.testing.assert_array_equal(y.get(), np.zeros(4))         # nothing ran
    graph.launch(stream)
    np.testing.assert_array_equal(y.get(), np.full(4, 7.0))     # 2 + 1 + 4
    x[...] = 3
    graph.launch(stream)
    np.testing.assert_array_equal(y.get(), np.full(4, 19.0))    # 6 + 1 + 12: inputs read at launch
    assert any(np.may_share_memory(z, m) for m in graph.memory)


def test_the_gpu_step_benchmarks_own_sides_run_on_the_stand_in(installed):
    """``benchmarks/train_step.py --device cuda --cuda-graph --three-products --own-handle``: our four
    sides (eager, replayed graph, three products, own cuBLAS handle) set up and alternate as on a GPU,
    so a GPU session does not find a broken benchmark (PyTorch's side needs a real GPU). No timing."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import train_step as bench
    finally:
        sys.path.pop(0)
    args = types.SimpleNamespace(dropout=0.1, cuda_graph=True, three_products=True, own_handle=True,
                                 tf32=False, warmup=1, rounds=2, steps=1)
    c = bench.CONFIGS["micro"]
    sides = {"ours": bench.setup_ours(c, "cuda", args),
             "ours_graph": bench.setup_ours(c, "cuda", args, graph=True),
             "ours_3prod": bench.setup_ours(c, "cuda", args, one_product=False, extra=True),
             "ours_handle": bench.own_handle_side(bench.setup_ours(c, "cuda", args, extra=True))}
    result = bench.measure(sides, args)
    assert set(result) == set(sides)
    for name, (seconds, peak, rounds) in result.items():
        assert seconds > 0 and len(rounds) == 2, name
    assert result["ours"][1] > 0 and result["ours_graph"][1] > 0      # peaks measured where they should be


def test_the_gpu_decode_benchmark_runs_on_the_stand_in(installed, monkeypatch, capsys):
    """``benchmarks/decode.py --device cuda --cuda-graph``, whole: cached, uncached and replayed searches
    (kept and cold) give the same hypotheses, and the graph variant does not fail."""
    import json
    import runpy
    import sys
    from pathlib import Path
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    monkeypatch.setattr(sys, "argv", ["decode.py", "--device", "cuda", "--config", "micro", "--cuda-graph",
                                      "--batch", "3", "--length", "12", "--source-length", "5",
                                      "--repeat", "1", "--json"])
    runpy.run_path(str(benchmarks / "decode.py"), run_name="__main__")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "graph_error" not in result, result.get("graph_error")
    assert result["same_output"] is True
    assert {"cached", "uncached", "graph", "graph_cold"} <= set(result)


def test_the_main_job_with_cuda_graphs_runs_on_the_stand_in(installed, monkeypatch, tmp_path, capsys):
    """``minitransformer train --device cuda --cuda-graph`` then ``evaluate --cuda-graph`` (training
    steps and beam searches replayed as graphs) on the sample corpus, in this process."""
    import json
    import re
    from pathlib import Path
    from minitransformer.cli import main
    monkeypatch.setenv("MINITRANSFORMER_CACHE", str(tmp_path / "cache"))
    sample = Path(__file__).resolve().parent / "data" / "spa_sample.tsv"
    quick = ["--preset", "tiny", "--vocab-size", "300", "--max-tokens", "400", "--eval-every", "8",
             "--checkpoint-every", "4", "--test-limit", "4", "--beam", "2", "--no-progress", "--steps", "8"]
    run = tmp_path / "run"
    assert main(["train", "--data", str(sample), *quick, "--device", "cuda", "--cuda-graph", "--out", str(run)]) == 0
    captured = capsys.readouterr()
    said = re.search(r"CUDA graphs: (\d+) batch shapes captured, (\d+) steps replayed", captured.out + captured.err)
    assert said and int(said[1]) >= 1 and int(said[2]) >= 1, captured.out + captured.err
    assert (run / "last.npz").exists() and (run / "bleu.json").exists()
    assert main(["evaluate", "--checkpoint", str(run), "--device", "cuda", "--cuda-graph", "--limit", "4",
                 "--no-progress"]) == 0
    assert "BLEU" in capsys.readouterr().out
    assert json.loads((run / "bleu.json").read_text())["bleu"] >= 0
