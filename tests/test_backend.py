"""The NumPy/CuPy switch: device names, generators, default dtype, array helpers."""
import numpy as np
import pytest

import minitransformer as mt
from minitransformer import backend


def test_cuda_is_available_is_a_bool():
    assert isinstance(mt.cuda_is_available(), bool)


def test_check_device_normalises_names(device):
    assert backend.check_device(device) == device
    assert backend.check_device(device.upper()) == device
    assert backend.check_device(None) == "cpu"
    if device == "cuda":
        assert backend.check_device("cuda:0") == "cuda"


@pytest.mark.parametrize("name", ["tpu", "gpu", "mps", ""])
def test_check_device_rejects_unknown_names(name):
    with pytest.raises(ValueError, match=f"unknown device '{name}'.*'cpu', 'cuda'"):
        backend.check_device(name)


def test_xp_and_array_helpers(device, rng):
    xp = backend.xp_for(device)
    assert (xp is np) == (device == "cpu")
    host = rng.standard_normal((2, 3))
    array = backend.to_device(host, device)
    assert backend.device_of(array) == device and backend.get_array_module(array) is xp
    assert backend.is_array(array) and not backend.is_array([1.0])
    back = backend.to_numpy(array)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, host)
    assert backend.to_device(array, device) is array      # already there: no copy


def test_manual_seed_makes_the_generator_repeat(device):
    mt.manual_seed(42)
    first = backend.to_numpy(backend.generator(device).random(6))
    again = backend.to_numpy(backend.generator(device).random(6))
    assert not np.array_equal(first, again)                # the stream moves on
    mt.manual_seed(42)
    np.testing.assert_array_equal(backend.to_numpy(backend.generator(device).random(6)), first)
    mt.manual_seed(43)
    assert not np.array_equal(backend.to_numpy(backend.generator(device).random(6)), first)


def test_manual_seed_makes_parameter_like_draws_repeat(device):
    def draw():
        mt.manual_seed(0)
        return backend.to_numpy(backend.generator(device).standard_normal((3, 3)))
    np.testing.assert_array_equal(draw(), draw())


@pytest.mark.parametrize("dtype", [np.int64, "int32", np.float16, bool])
def test_set_default_dtype_rejects_non_float32_64(dtype):
    with pytest.raises(TypeError, match="float32 or float64"):
        mt.set_default_dtype(dtype)
    assert mt.get_default_dtype() == np.float32                # unchanged


def test_set_default_dtype_float64(device):
    mt.set_default_dtype(np.float64)
    assert mt.get_default_dtype() == np.float64
    assert mt.tensor([0.1], device=device).dtype == np.float64
    assert mt.tensor([0.1], device=device).item() == 0.1       # no float32 round trip
    mt.set_default_dtype("float32")
    assert mt.tensor([0.1], device=device).dtype == np.float32


def test_scatter_add_accumulates_repeated_indices(device):
    xp = backend.xp_for(device)
    target = xp.zeros((4, 2))
    index = xp.asarray([0, 3, 0, 0])
    values = xp.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    backend.scatter_add(target, index, values)
    np.testing.assert_array_equal(backend.to_numpy(target), [[13, 16], [0, 0], [0, 0], [3, 4]])


def test_tf32_is_opt_in(monkeypatch):
    monkeypatch.delenv("CUPY_TF32", raising=False)
    assert backend.tf32_enabled() is False
    monkeypatch.setenv("CUPY_TF32", "1")
    assert backend.tf32_enabled() is True


def test_set_tf32_is_the_one_switch(monkeypatch):
    monkeypatch.delenv("CUPY_TF32", raising=False)
    try:
        backend.set_tf32(True)
        assert backend.tf32_enabled() is True
        backend.set_tf32(False)
        assert backend.tf32_enabled() is False
    finally:
        backend.set_tf32(False)


def test_random_state_round_trips_through_json_and_reads_old_checkpoints():
    import json
    backend.manual_seed(5)
    backend.generator("cpu").random(3)
    backend.counter_stream(1000)                      # as GPU dropout would have drawn
    state = json.loads(json.dumps(backend.random_state()))
    expected = (backend.generator("cpu").random(4), backend.counter_stream(10))
    backend.manual_seed(99)
    backend.set_random_state(state)
    assert np.array_equal(backend.generator("cpu").random(4), expected[0])
    assert backend.counter_stream(10) == expected[1] == (5, 1000)
    backend.manual_seed(5)                            # a checkpoint from before the GPU counter:
    backend.generator("cpu").random(3)                # only the CPU generator's state
    old = json.loads(json.dumps(state["cpu"]))
    backend.manual_seed(99)
    backend.set_random_state(old)
    assert np.array_equal(backend.generator("cpu").random(4), expected[0])


def test_keep_freed_host_memory_takes_effect_exactly_on_glibc():
    """The command line calls it at start; it is a no-op that says so where malloc is not glibc's."""
    import platform
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert backend.keep_freed_host_memory() is on_glibc
    assert backend.keep_freed_host_memory() is on_glibc      # calling it again is harmless
