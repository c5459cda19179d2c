"""A stand-in for CuPy on the CPU, so that the suite's ``cuda`` tests run on a machine without a GPU:

    MT_FAKE_CUDA=1 python -m pytest -q -k "cuda or cupy"    (CI runs this after the README's test command)

Why: the GPU code path (the fused kernels' wrappers, device-resident ids and masks, attention's
strided-batched GEMMs, Adam's one launch, the walk over CuPy arrays) otherwise runs only when a GPU
is lent, and a mistake there (a NumPy array mixed into a device op, a NumPy scalar where CuPy gives a
0-d array) would cost that GPU session its time. Here every ``cuda`` tensor holds a ``FakeArray``: NumPy's
memory and arithmetic, but a type of its own, as a CuPy array is, and CuPy's conventions where they
differ from NumPy's:

- an element-wise op or a ``cupy.*`` function given a host (NumPy) array of one or more elements
  raises ``TypeError``, as CuPy does (our ops must upload explicitly, ``backend.to_device``);
- reductions and integer indexing give 0-d arrays, not NumPy scalars;
- ``argsort`` is stable (CuPy's is);
- inside ``no_host_reads()`` reading a device array on the host (``float()``, ``bool()``,
  ``item()``, ``asnumpy``, ``get``…) raises: what makes a GPU step wait for the device;
- the fused kernels run through ``tests/kernel_emulator.py`` (their CUDA C++ compiled for the CPU),
  beam search's top-k kernels excepted (not emulated: the array path picks the candidates);
- cuBLAS's strided-batched GEMM, which attention calls on raw device pointers, is a NumPy product
  reading and writing the same addresses (column-major, transposes and strides as cuBLAS takes them).

Not modelled (``tests/test_kernels.py`` tests them on a real GPU and is not collected here): streams,
events and CUDA-graph capture, the memory pool, our own cuBLAS handle through ``ctypes``, TF32, the
GPU's summation order (results agree with a GPU's to rounding), and CuPy's refusal of ``np.asarray``
on a device array.
"""
import contextlib
import ctypes
import functools
import operator
import sys
import types

import numpy as np


class FakeArray(np.ndarray):
    """A "device" array: NumPy underneath, CuPy's type and conventions on top."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        outs = kwargs.get("out", ())
        # (ufunc.at's indices may come from the host: CuPy uploads an index array itself)
        _refuse_host_arrays(ufunc.__name__, (*(inputs[:1] + inputs[2:] if method == "at" else inputs), *outs))
        inputs = tuple(_host_view(x) for x in inputs)
        if outs:
            kwargs["out"] = tuple(_host_view(x) for x in outs)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if method == "at":
            return None
        if outs:
            return outs[0] if len(outs) == 1 else outs
        return _device(result)

    def __getitem__(self, index):
        result = super().__getitem__(index)
        if isinstance(result, np.ndarray):
            return result
        # one element: CuPy gives a 0-d view, NumPy a scalar
        parts = index if isinstance(index, tuple) else (index,)
        if any(p is Ellipsis for p in parts):
            return np.asarray(result).view(FakeArray)
        return super().__getitem__((*parts, Ellipsis))

    # reading a device array on the host waits for the GPU: refused inside ``no_host_reads()``
    def __float__(self):
        _host_read("float()")
        return super().__float__()

    def __int__(self):
        _host_read("int()")
        return super().__int__()

    def __index__(self):
        _host_read("an index")
        return super().__index__()

    def __bool__(self):
        _host_read("bool()")
        return super().__bool__()

    def item(self, *args):
        _host_read("item()")
        return super().item(*args)

    def tolist(self):
        _host_read("tolist()")
        return super().tolist()

    @property
    def data(self):
        """CuPy's ``MemoryPointer``, as far as we use it: ``.data.ptr``."""
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def get(self):
        """A host copy (``cupy.ndarray.get``)."""
        _host_read("get()")
        return np.array(self.view(np.ndarray))


_reads_allowed = True


def _host_read(what):
    if not _reads_allowed:
        raise RuntimeError(f"fake CuPy: {what} of a device array inside no_host_reads(): on a GPU the "
                           f"host would wait here for every launch before it")


@contextlib.contextmanager
def no_host_reads():
    """Device arrays may not be read on the host inside (as ``cupyx.allow_synchronize(False)``
    refuses synchronising copies on a GPU; here also ``float()``, ``bool()``, ``item()``…)."""
    global _reads_allowed
    previous, _reads_allowed = _reads_allowed, False
    try:
        yield
    finally:
        _reads_allowed = previous


def _host_view(x):
    return x.view(np.ndarray) if isinstance(x, FakeArray) else x


def _device(x):
    """What CuPy would return: arrays as FakeArray, scalars as 0-d arrays."""
    if isinstance(x, FakeArray):
        return x
    if isinstance(x, np.ndarray):
        return x.view(FakeArray)
    if isinstance(x, np.generic):
        return np.asarray(x).view(FakeArray)
    if isinstance(x, tuple):
        return tuple(_device(v) for v in x)
    if isinstance(x, list):
        return [_device(v) for v in x]
    return x


def _refuse_host_arrays(name, arguments):
    for x in arguments:
        if isinstance(x, (list, tuple)):
            _refuse_host_arrays(name, x)
        elif type(x) is np.ndarray and x.ndim:
            raise TypeError(f"fake CuPy: {name} was given a host (NumPy) array of shape {x.shape}; "
                            f"CuPy raises 'Unsupported type <class 'numpy.ndarray'>' (upload it first)")


def _on_device(fn, name, host_arguments=False):
    """A NumPy function as CuPy's: device arguments in, device arrays out."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not host_arguments:
            _refuse_host_arrays(name, (*args, *kwargs.values()))
        return _device(fn(*args, **kwargs))
    return call


def _asarray(a, dtype=None):
    """``cupy.asarray``: a device array as it is (or converted), host data uploaded (a copy)."""
    if isinstance(a, FakeArray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    return np.array(a, dtype=dtype, copy=True).view(FakeArray)


def _asnumpy(a):
    if isinstance(a, FakeArray):
        _host_read("asnumpy()")
    return np.array(_host_view(a))


def _array(a, dtype=None, copy=True):
    """``cupy.array``: always a copy."""
    return np.array(_host_view(a), dtype=dtype, copy=True).view(FakeArray)


class _Generator:
    """``cupy.random.default_rng``: NumPy's generator (other numbers than CuPy's), device arrays out."""

    def __init__(self, seed):
        self._rng = np.random.default_rng(seed)

    def __getattr__(self, name):
        return _on_device(getattr(self._rng, name), f"random.{name}")


def _column_major(address, rows, cols, ld, dtype):
    """The ``(rows, cols)`` column-major matrix with leading dimension ``ld`` at a raw address."""
    itemsize = np.dtype(dtype).itemsize
    count = (cols - 1) * ld + rows
    base = np.frombuffer((ctypes.c_char * (count * itemsize)).from_address(address), dtype=dtype, count=count)
    return np.lib.stride_tricks.as_strided(base, shape=(rows, cols), strides=(itemsize, ld * itemsize))


def _gemm_strided_batched_ex(handle, trans_a, trans_b, m, n, k, alpha, A, a_type, lda, stride_a,
                             B, b_type, ldb, stride_b, beta, C, c_type, ldc, stride_c, batch, compute, algo):
    """``cublasGemmStridedBatchedEx`` in host pointer mode: ``C_i = α op(A_i) op(B_i) + β C_i``."""
    dtype = {0: np.float32, 1: np.float64}[a_type]
    if not a_type == b_type == c_type:
        raise TypeError(f"fake cuBLAS: operand types {a_type}, {b_type}, {c_type} differ")
    itemsize = np.dtype(dtype).itemsize
    scalar = lambda address: np.frombuffer((ctypes.c_char * itemsize).from_address(address), dtype=dtype)[0]
    a_scale, c_scale = scalar(alpha), scalar(beta)
    for i in range(batch):
        a = _column_major(A + i * stride_a * itemsize, *((m, k) if trans_a == 0 else (k, m)), lda, dtype)
        b = _column_major(B + i * stride_b * itemsize, *((k, n) if trans_b == 0 else (n, k)), ldb, dtype)
        c = _column_major(C + i * stride_c * itemsize, m, n, ldc, dtype)
        product = (a if trans_a == 0 else a.T) @ (b if trans_b == 0 else b.T)
        c[...] = a_scale * product + (c_scale * c if c_scale else 0)


def make():
    """The fake ``cupy`` module."""
    cupy = types.ModuleType("cupy", __doc__)
    for name in dir(np):
        value = getattr(np, name)
        if isinstance(value, np.ufunc):          # FakeArray.__array_ufunc__ makes these CuPy's
            setattr(cupy, name, value)
        elif callable(value) and not isinstance(value, type) and not name.startswith("_"):
            setattr(cupy, name, _on_device(value, name))
        elif not name.startswith("_"):
            setattr(cupy, name, value)           # dtypes, inf, newaxis, …
    cupy.ndarray = FakeArray
    cupy.asarray, cupy.array = _asarray, _array
    cupy.asnumpy = _asnumpy
    cupy.argsort = _on_device(lambda a, axis=-1: np.argsort(a, axis=axis, kind="stable"), "argsort")
    cupy.random = types.SimpleNamespace(default_rng=lambda seed=None: _Generator(seed))
    stream = types.SimpleNamespace(ptr=0)
    cupy.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
        get_current_stream=lambda: stream,
        device=types.SimpleNamespace(get_cublas_handle=lambda: 0))
    return cupy


def install(patch=setattr, patch_item=operator.setitem):
    """Put the fake behind ``minitransformer.backend`` (``"cuda"`` becomes this CPU stand-in), the
    fused kernels through the emulator, and cuBLAS's strided-batched GEMM through NumPy. (A test
    passes ``monkeypatch.setattr`` and ``monkeypatch.setitem`` to install it for itself only.)"""
    from kernel_emulator import Emulator
    from minitransformer import backend, kernels
    from minitransformer.kernels import _source

    patch(backend, "_cupy", make())
    patch(kernels, "_kernel", Emulator([n for n in _source.NAMES if not n.startswith("beam_")]).kernel)
    patch(kernels, "TOPK_MAX", 0)                 # beam search's top-k kernels are not emulated
    cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")
    cublas.gemmStridedBatchedEx = _gemm_strided_batched_ex
    cublas.setPointerMode = lambda handle, mode: None
    package = None
    for name in ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs"):
        module = types.ModuleType(name)
        patch_item(sys.modules, name, module)
        if package is not None:
            setattr(package, name.rsplit(".", 1)[1], module)
        package = module
    package.cublas = cublas
    patch_item(sys.modules, "cupy_backends.cuda.libs.cublas", cublas)
