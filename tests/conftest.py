"""Shared fixtures: the ``device`` every test runs on, a fresh seed per test, random tensors.

The suite runs on the CPU (NumPy) everywhere and once more on the GPU (CuPy) where one is
present (it is not collected otherwise, so a CPU-only run shows only the three GPU-only tests as skips;
``MT_FAKE_CUDA=1`` runs the GPU copies against a CPU stand-in for CuPy, ``tests/fake_cupy.py``). Seeds come from the test's id, so a
failure reproduces; set ``MT_TEST_SEED`` to draw a different (still reproducible) set.
"""
import os
import zlib

import numpy as np
import pytest

import minitransformer as mt

BASE_SEED = int(os.environ.get("MT_TEST_SEED", "0"))


# MT_FAKE_CUDA=1: "cuda" is a stand-in for CuPy on the CPU (tests/fake_cupy.py), so that the "cuda"
# copies of the device-parametrised tests run without a GPU (CI does, after the plain run)
FAKE_CUDA = os.environ.get("MT_FAKE_CUDA") == "1"
if FAKE_CUDA:
    import fake_cupy
    fake_cupy.install()

DEVICES = ["cpu"] + (["cuda"] if mt.cuda_is_available() else [])

# test_kernels.py checks the fused GPU kernels against their array twins, and capture and replay of
# CUDA graphs: it has nothing to run (and is not collected) without a GPU or its stand-in, like the
# "cuda" copies of the device-parametrised tests.
collect_ignore = [] if mt.cuda_is_available() else ["test_kernels.py"]
if FAKE_CUDA:     # these install the stand-in themselves: the plain run has them
    collect_ignore += ["test_fake_cupy.py", "test_cublas_calls.py"]

# What the CPU stand-in cannot show (tests/fake_cupy.py): these need the real GPU
NEEDS_A_REAL_GPU = {
    "test_tf32_is_one_switch_and_off_by_default": "TF32 rounding happens in the GPU's tensor cores",
    "test_own_handle_products_and_bias_sums_match_cupys": "it compares with real cuBLAS (the stand-in's own test: test_cublas_calls.py)",
    "test_log_softmax_matches_the_array_version[shape3-float32]":
        "2,000 float32 terms summed in a row by one emulated thread round more than the GPU's tree",
    "test_log_softmax_matches_the_array_version[shape4-float32]":
        "37,000 float32 terms summed in a row by one emulated thread round more than the GPU's tree",
}


def pytest_collection_modifyitems(config, items):
    if not FAKE_CUDA:
        return
    for item in items:
        if item.path.name == "test_kernels.py":       # GPU tests all: `-k cuda` selects them
            item.extra_keyword_matches.add("cuda")
        why = NEEDS_A_REAL_GPU.get(item.name) or NEEDS_A_REAL_GPU.get(getattr(item, "originalname", None))
        if why:
            item.add_marker(pytest.mark.skip(reason=f"needs a real GPU: {why}"))


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a test runs on: always ``"cpu"``; ``"cuda"`` when CuPy sees a GPU (or, with
    ``MT_FAKE_CUDA=1``, its stand-in on the CPU)."""
    if request.param == "cuda" and not mt.cuda_is_available():
        pytest.skip("no GPU/CuPy")
    return request.param


def _test_seed(request):
    return (zlib.crc32(request.node.nodeid.encode()) + BASE_SEED) % 2**32


@pytest.fixture(autouse=True)
def _fresh_seed_and_defaults(request):
    """Reseed the package's generators per test and undo ``set_default_dtype`` afterwards."""
    mt.manual_seed(_test_seed(request))
    dtype = mt.get_default_dtype()
    yield
    mt.set_default_dtype(dtype)


@pytest.fixture
def rng(request):
    """A NumPy generator for this test's random inputs (seeded from the test id)."""
    return np.random.default_rng(_test_seed(request))


@pytest.fixture
def randn(rng, device):
    """``randn(*shape, dtype="float64", requires_grad=True)``: a standard-normal leaf tensor on
    the test's device. ``low``/``high`` draw uniformly instead; ``away_from_zero`` keeps
    ``|x| >= away_from_zero`` (for div, log, sqrt, relu's kink)."""
    def make(*shape, dtype="float64", requires_grad=True, low=None, high=None, away_from_zero=None):
        if low is not None:
            array = rng.uniform(low, high, size=shape)
        else:
            array = rng.standard_normal(shape)
        if away_from_zero is not None:
            array = np.where(array >= 0, 1.0, -1.0) * (np.abs(array) + away_from_zero)
        return mt.tensor(array, dtype=dtype, device=device, requires_grad=requires_grad)
    return make
