"""The one module that knows NumPy from CuPy.

Everything else asks a tensor for its array module (``xp``) and never imports CuPy itself.
Devices are named ``"cpu"`` (NumPy) and ``"cuda"`` (CuPy). CuPy is optional: without it, or
without a GPU, the package works on the CPU and asking for ``"cuda"`` raises a clear error.
"""
import ctypes
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


def address(array):
    """Where an array's data starts in its device's memory (a captured CUDA graph reads there)."""
    return array.data.ptr if device_of(array) == "cuda" else array.ctypes.data


def is_array(x):
    return isinstance(x, np.ndarray) or (_cupy is not None and isinstance(x, _cupy.ndarray))


def to_device(array, device):
    """Move an array between host and GPU (a no-op when it is already there)."""
    device = check_device(device)
    if device == device_of(array):
        return array
    if device == "cuda":
        if _capture is not None:   # a graph copies again at every replay: from a buffer nothing else reuses
            return _capture.upload(np.asarray(array))
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


_counter = 0   # how many numbers the GPU's counter-based dropout generator has handed out


def manual_seed(seed):
    """Reseed every device's generator (dropout masks, parameter init, data shuffles)."""
    global _seed, _counter
    _seed, _counter = int(seed), 0
    _generators.clear()


def counter_stream(n):
    """``(seed, offset)`` for ``n`` numbers of the GPU's counter-based generator, then advance it.

    The fused dropout kernel draws number ``i`` of a call as ``hash(seed, offset + i)``: no
    generator state lives on the GPU, the backward regenerates the mask instead of storing it,
    and the whole state is two integers a checkpoint can hold (see ``random_state``).
    """
    global _counter
    offset = _counter
    _counter += int(n)
    if _capture is not None:      # a captured graph adds the step's start offset at every replay
        offset -= _capture.counter_start
    return _seed, offset


def random_state():
    """Everything the package's random numbers depend on, as JSON-able values (for checkpoints)."""
    return {"seed": _seed, "counter": _counter,
            "cpu": _jsonable(generator("cpu").bit_generator.state)}


def set_random_state(state):
    """Restore ``random_state()``: the same dropout masks and shuffles follow, on CPU and GPU."""
    global _seed, _counter
    if "cpu" not in state:            # checkpoints written before the GPU counter existed
        state = {"seed": _seed, "counter": _counter, "cpu": state}
    _seed, _counter = int(state["seed"]), int(state["counter"])
    _generators.clear()
    generator("cpu").bit_generator.state = state["cpu"]


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.integer):
        return int(value)
    return value


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
    """TF32 matmuls on the GPU are opt-in (CUPY_TF32=1 or ``set_tf32(True)``), fp32 by default."""
    return os.environ.get("CUPY_TF32", "0") == "1"


def set_tf32(enabled):
    """The one switch for TF32 matmuls on the GPU (tensor cores, inputs rounded to a 10-bit mantissa;
    the base model's step ran 2.1× faster with it on an H200, docs/results.md): off by default,
    because results then no longer match fp32 to rounding.
    Sets ``CUPY_TF32`` (read by CuPy at its first matmul) and, if CuPy already ran one, its
    compute type for float32."""
    os.environ["CUPY_TF32"] = "1" if enabled else "0"
    if _cupy is not None:
        try:
            from cupy._core import _routines_linalg as linalg
            linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT)
        except (ImportError, AttributeError):   # a CuPy without the hook reads the variable lazily
            pass


# ---- CUDA-graph capture (minitransformer.cuda_graph) --------------------------------------------

_capture = None


def capturing():
    """The ``kernels.capture.Capture`` of the step being captured as a CUDA graph, or None (eager)."""
    return _capture


def set_capture(capture):
    """Enter (a ``Capture``) or leave (None) capture mode; returns the previous one.

    A capture only records: leaving it puts the dropout counter back where it was and notes in
    ``capture.numbers`` how many numbers one replay draws (each replay then takes its own)."""
    global _capture, _counter
    previous, _capture = _capture, capture
    if capture is not None:
        capture.counter_start = _counter
    elif previous is not None:
        previous.numbers = _counter - previous.counter_start
        _counter = previous.counter_start
    return previous


# ---- host memory ------------------------------------------------------------------------------

def keep_freed_host_memory():
    """Have glibc's ``malloc`` keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees the same large arrays (activations, gradients) every
    time. By default glibc serves big blocks with ``mmap`` and returns them on ``free``, so each
    step pays page faults to touch fresh memory again. Serving blocks below 32 MiB from the heap
    and never trimming it (``mallopt``) cut the minor page faults of ``benchmarks/train_step.py
    --config tiny`` from 356,887 to 99,081 with about the same peak memory; what that does to
    speed was mostly within the 2-core VM's run-to-run spread (docs/results.md). It changes the
    whole process, so the command line turns it on (its processes are ours) and library users may
    call it. Returns whether it took effect (False where the C library is not glibc).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # from glibc's <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


# ---- fused GPU kernels (minitransformer/kernels) ----------------------------------------------

_fused = os.environ.get("MINITRANSFORMER_FUSED", "1") != "0"


def cupy():
    """The CuPy module, for ``minitransformer.kernels`` (which compiles the fused kernels)."""
    if _cupy is None:
        raise RuntimeError(f"CuPy is not installed: {_INSTALL_HINT}")
    return _cupy


_FLOATS = frozenset({np.dtype(np.float32), np.dtype(np.float64)})


def fused(*arrays):
    """Whether an op on these arrays runs its fused CUDA kernel: they are CuPy float32/float64
    arrays and fused kernels are on (``MINITRANSFORMER_FUSED=0`` or ``set_fused(False)`` turns
    them off, to compare with the array version or to debug). ``fused()``: whether they are on.
    (Called by every op: a plain loop, no generator.)"""
    if not _fused:
        return False
    for a in arrays:
        if _cupy is None or not isinstance(a, _cupy.ndarray) or a.dtype not in _FLOATS:
            return False
    return True


def set_fused(enabled):
    """Turn the fused GPU kernels on or off; returns the previous setting."""
    global _fused
    previous, _fused = _fused, bool(enabled)
    return previous


def top_k(scores, k, capturable=False):
    """Column indices ``(rows, k)`` of the ``k`` largest entries of each row of a 2-D array, best
    first, ties to the lower index (beam search's candidates).

    NumPy partitions once and sorts the ``k``; CuPy's ``argpartition`` sorts whole rows, so on the
    GPU a small ``k`` takes ``k`` rounds of ``argmax`` (first index on ties) over a working copy,
    and a large one a stable sort — unless ``capturable`` (a step a CUDA graph will record, and its
    eager run before: plain kernels are known to record, a sort through Thrust is not). All three
    give the same indices for finite scores (past the last finite one of a row, ``argmax`` may
    repeat an index: beam search stops at -inf).
    """
    if device_of(scores) != "cuda":
        return _top_k_partition(scores, k)
    if k <= 16 or capturable:
        return _top_k_argmax(scores, k)
    return _cupy.argsort(-scores, axis=1)[:, :k]


def _top_k_partition(scores, k):
    n = scores.shape[1]
    if k >= n:
        part = np.tile(np.arange(n), (len(scores), 1))
    else:   # the k largest end up last (partitioning -scores costs a negated copy: 2.7x as long)
        part = np.argpartition(scores, n - k, axis=1)[:, n - k:]
        # it keeps *some* of the entries equal to the k-th largest: keep the lowest indices instead
        kth = np.take_along_axis(scores, part, axis=1).min(axis=1)
        for r in np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k):
            above = np.flatnonzero(scores[r] > kth[r])
            part[r] = np.concatenate([above, np.flatnonzero(scores[r] == kth[r])[:k - len(above)]])
    order = np.lexsort((part, -np.take_along_axis(scores, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _top_k_argmax(scores, k):
    xp = get_array_module(scores)
    work, rows = scores.copy(), xp.arange(len(scores))
    top = xp.empty((k, len(scores)), dtype=np.int64)   # written row by row: stacking k > 8 arrays
    for i in range(k):                                  # uploads their addresses, which a graph cannot
        top[i] = work.argmax(axis=1)
        work[rows, top[i]] = -np.inf
    return top.T


def scatter_add(target, index, values):
    """``target[index] += values`` where repeated indices *accumulate* (embedding backward)."""
    if device_of(target) == "cuda":
        _cupy.add.at(target, index, values)
    else:
        np.add.at(target, index, values)
