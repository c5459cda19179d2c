"""The one module that knows NumPy from CuPy.

Everything else asks a tensor for its array module (``xp``) and never imports CuPy itself.
Devices are named ``"cpu"`` (NumPy) and ``"cuda"`` (CuPy). CuPy is optional: without it, or
without a GPU, the package works on the CPU and asking for ``"cuda"`` raises a clear error.
"""
import os

import numpy as np

try:  # CuPy is an optional extra: pip install "minitransformer[cuda12]" or "[cuda13]"
    import cupy as _cupy
except Exception:  # ImportError, or a CuPy build that cannot load its CUDA libraries
    _cupy = None

DEVICES = ("cpu", "cuda")
_INSTALL_HINT = ('install CuPy with  pip install "minitransformer[cuda12]"  (or [cuda13], '
                 'matching your CUDA driver) on a machine with an NVIDIA GPU')

_default_dtype = np.dtype(np.float32)


def cuda_is_available():
    """True when CuPy imports and sees at least one GPU."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def check_device(device):
    """Normalise a device name and fail early, with a fix, when it cannot be used."""
    if device is None:
        return "cpu"
    name = str(device).lower()
    if name.startswith("cuda:"):  # accept torch-style "cuda:0" for the first GPU
        name = "cuda"
    if name not in DEVICES:
        raise ValueError(f"unknown device {device!r}: expected one of {DEVICES}")
    if name == "cuda" and not cuda_is_available():
        why = "CuPy is not installed" if _cupy is None else "CuPy sees no GPU"
        raise RuntimeError(f"device 'cuda' requested but {why}: {_INSTALL_HINT}")
    return name


def get_array_module(array):
    """``numpy`` or ``cupy``, whichever owns ``array``."""
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy
    return np


def device_of(array):
    return "cuda" if _cupy is not None and isinstance(array, _cupy.ndarray) else "cpu"


def xp_for(device):
    """The array module of a device name."""
    return _cupy if check_device(device) == "cuda" else np


def is_array(x):
    return isinstance(x, np.ndarray) or (_cupy is not None and isinstance(x, _cupy.ndarray))


def to_device(array, device):
    """Move an array between host and GPU (a no-op when it is already there)."""
    device = check_device(device)
    if device == device_of(array):
        return array
    if device == "cuda":
        return _cupy.asarray(array)
    return _cupy.asnumpy(array)


def to_numpy(array):
    return _cupy.asnumpy(array) if device_of(array) == "cuda" else np.asarray(array)


# ---- dtypes -------------------------------------------------------------------------------

def get_default_dtype():
    return _default_dtype


def set_default_dtype(dtype):
    """float32 is the default; float64 is there for gradchecks and parity tests."""
    global _default_dtype
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"set_default_dtype: expected float32 or float64, got {dtype}")
    _default_dtype = dtype


# ---- random numbers: one generator per device, all reseeded by manual_seed -----------------

_seed = 0
_generators = {}


def manual_seed(seed):
    """Reseed every device's generator (dropout masks, parameter init, data shuffles)."""
    global _seed
    _seed = int(seed)
    _generators.clear()


def generator(device="cpu"):
    """The device's random generator, created from the last ``manual_seed``."""
    device = check_device(device)
    if device not in _generators:
        if device == "cuda":
            _generators[device] = _cupy.random.default_rng(_seed)
        else:
            _generators[device] = np.random.default_rng(_seed)
    return _generators[device]


def tf32_enabled():
    """TF32 matmuls on the GPU are opt-in (CUPY_TF32=1), fp32 by default."""
    return os.environ.get("CUPY_TF32", "0") == "1"


def scatter_add(target, index, values):
    """``target[index] += values`` where repeated indices *accumulate* (embedding backward)."""
    if device_of(target) == "cuda":
        import cupyx  # ships with CuPy
        cupyx.scatter_add(target, index, values)
    else:
        np.add.at(target, index, values)
