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
- the fused kernels, beam search's top-k kernels among them, run through ``tests/kernel_emulator.py``
  (their CUDA C++ compiled for the CPU);
- cuBLAS, which attention calls through CuPy's binding on raw device pointers and our own handle
  (``kernels/capture.py``) through ``ctypes``, is the C stand-in of ``tests/cublas_stand_in.py``:
  column-major loops at the same addresses, with cuBLAS's arguments;
- CUDA graphs: while a stream captures, every operation (kernel, product, element-wise op, copy,
  gather, write) still runs — the Python around it needs the shapes — but is also recorded, and the
  device memory that existed before is put back when the capture ends, so that, as on a GPU, the
  capture changes nothing and each launch does the work, reading its inputs as they are then; what
  the capture allocated lives as long as the graph (its private pool). ``empty`` gives zeros here, not
  garbage: a capture indexes with buffers that only a replay fills.

With it, ``tests/test_kernels.py`` runs too (captured training steps and beam searches replayed
against eager ones included); ``tests/conftest.py`` names the few of its tests that need the real
GPU. Not modelled: TF32, the GPU's summation order (results agree with a GPU's to rounding),
concurrency between streams, the memory pool's reuse of blocks, and CuPy's refusal of
``np.asarray`` on a device array.
"""
import collections
import contextlib
import ctypes
import functools
import itertools
import operator
import sys
import types
import weakref

import numpy as np


class FakeArray(np.ndarray):
    """A "device" array: NumPy underneath, CuPy's type and conventions on top."""

    def __array_finalize__(self, obj):
        root = self
        while isinstance(root.base, np.ndarray):
            root = root.base
        key = id(root)                     # the device memory a capture must leave as it found it
        if key not in _memory:
            _memory[key] = weakref.ref(root, lambda _, key=key: _memory.pop(key, None))
            if _capturing:                 # made while capturing: the graph's pool keeps it
                _pool.append(root)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        outs = kwargs.get("out", ())
        # (ufunc.at's indices may come from the host: CuPy uploads an index array itself)
        _refuse_host_arrays(ufunc.__name__, (*(inputs[:1] + inputs[2:] if method == "at" else inputs), *outs))
        inputs = tuple(_host_view(x) for x in inputs)
        if outs:
            kwargs["out"] = tuple(_host_view(x) for x in outs)
        run = getattr(ufunc, method)
        result = run(*inputs, **kwargs)
        if method == "at":
            _record(lambda: run(*inputs, **kwargs))
            return None
        if outs:
            _record(lambda: run(*inputs, **kwargs))
            return outs[0] if len(outs) == 1 else outs
        result = _device(result)
        if _recording is not None:         # replayed into the same array
            into = tuple(_host_view(r) for r in result) if isinstance(result, tuple) else (_host_view(result),)
            _record(lambda: run(*inputs, **kwargs, out=into))
        return result

    def __getitem__(self, index):
        result = super().__getitem__(index)
        if isinstance(result, np.ndarray):
            if _recording is not None and not np.may_share_memory(result, self):   # a gather: a kernel
                _record_copy(result, lambda: np.ndarray.__getitem__(self, index))
            return result
        # one element: CuPy gives a 0-d view, NumPy a scalar
        parts = index if isinstance(index, tuple) else (index,)
        if any(p is Ellipsis for p in parts):
            return _recorded_copy(np.asarray(result).view(FakeArray), lambda: np.ndarray.__getitem__(self, index))
        return super().__getitem__((*parts, Ellipsis))

    def __setitem__(self, index, value):
        value = _host_view(value) if isinstance(value, FakeArray) else value
        np.ndarray.__setitem__(self, index, value)
        _record(lambda: np.ndarray.__setitem__(self, index, value))

    def fill(self, value):
        np.ndarray.fill(self, value)
        _record(lambda: np.ndarray.fill(self, value))

    def astype(self, dtype, copy=True, **kwargs):
        return _recorded_copy(np.ndarray.astype(self, dtype, copy=copy, **kwargs),
                              lambda: np.ndarray.astype(self, dtype, copy=copy, **kwargs), self)

    def copy(self, order="C"):
        return _recorded_copy(np.ndarray.copy(self, order), lambda: np.ndarray.copy(self, order))

    def take(self, *args, **kwargs):
        return _recorded_copy(np.ndarray.take(self, *args, **kwargs), lambda: np.ndarray.take(self, *args, **kwargs))

    def argmax(self, *args, **kwargs):
        return _recorded_copy(np.ndarray.argmax(self, *args, **kwargs), lambda: np.ndarray.argmax(self, *args, **kwargs))

    def reshape(self, *shape, **kwargs):             # a copy when the layout needs one
        return _recorded_copy(np.ndarray.reshape(self, *shape, **kwargs),
                              lambda: np.ndarray.reshape(self, *shape, **kwargs), self)

    def ravel(self, order="C"):
        return _recorded_copy(np.ndarray.ravel(self, order), lambda: np.ndarray.ravel(self, order), self)

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


# ---- CUDA graphs: a capture records what the GPU would run, and runs nothing ---------------------
# Here every operation runs when it is called (its shapes and the Python around it need that), is
# recorded while a stream captures, and the device memory that existed when the capture began is put
# back when it ends: as on a GPU, where a capture runs nothing, a replay then does the whole work.

_memory = {}                     # id -> weak reference of every root array of device memory
_recording = None                # the operations of the graph being captured, or None
_pool = []                       # the memory allocated while capturing
_capturing = False


def _record(operation):
    if _recording is not None:
        _recording.append(operation)


def _record_copy(result, compute):
    """Record ``result[...] = compute()``: an operation that makes a new array, replayed into it."""
    target = _host_view(result)
    _record(lambda: np.copyto(target, compute(), casting="unsafe"))


def _recorded_copy(result, compute, source=None):
    """``result`` as a device array, recorded unless it is a view (of ``source``: views cost nothing)."""
    result = _device(result)
    if _recording is not None and isinstance(result, np.ndarray) and (
            source is None or not np.may_share_memory(result, source)):
        _record_copy(result, compute)
    return result


class _Graph:
    def __init__(self, operations, memory):
        self.operations = operations
        self.memory = memory       # what the capture allocated: its operations use it at every launch

    def launch(self, stream=None):
        for operation in self.operations:
            operation()


class _Stream:
    """``cupy.cuda.Stream``: a current-stream context and capture; the work itself runs in order."""
    _addresses = itertools.count(1)
    null = None

    def __init__(self, non_blocking=False, ptr=None):
        self.ptr = next(self._addresses) << 8 if ptr is None else ptr

    def __enter__(self):
        _streams.append(self)
        return self

    def __exit__(self, *exc):
        _streams.pop()

    def synchronize(self):
        pass

    def begin_capture(self, mode=None):
        global _recording, _saved, _capturing
        if _recording is not None:
            raise RuntimeError("fake CuPy: a capture is already running")
        roots = [ref() for ref in list(_memory.values())]
        _saved = [(root, np.array(_host_view(root))) for root in roots if root is not None]
        _pool.clear()
        _recording, _capturing = [], True

    def is_capturing(self):
        return _recording is not None

    def end_capture(self):
        global _recording, _saved, _capturing
        operations, _recording, _capturing = _recording, None, False
        for root, contents in _saved:                 # the capture ran nothing on the "GPU"
            np.copyto(_host_view(root), contents)
        _saved = []
        memory = list(_pool)
        _pool.clear()
        return _Graph(operations, memory)


_streams = [_Stream(ptr=0)]
_saved = []


def _memcpy_async(destination, source, nbytes, kind, stream):
    ctypes.memmove(destination, source, nbytes)
    _record(lambda: ctypes.memmove(destination, source, nbytes))


class _MemoryPool:
    """Just enough of ``cupy.cuda.MemoryPool`` for the benchmarks' bookkeeping: the bytes of all live
    device memory (there is one pool here, NumPy's heap)."""

    def malloc(self, size):
        raise NotImplementedError("fake CuPy: allocations do not go through a pool")

    def used_bytes(self):
        return sum(root.nbytes for root in (ref() for ref in list(_memory.values())) if root is not None)

    total_bytes = used_bytes


_default_pool = _MemoryPool()


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _RecordedLibrary:
    """A ``ctypes`` library whose calls a capture records (our cuBLAS handle's, ``kernels.capture``)."""

    def __init__(self, library):
        self._library = library

    def __getattr__(self, name):
        function = getattr(self._library, name)

        def call(*args):
            status = function(*args)
            _record(lambda: function(*args))
            return status
        return call


def _host_view(x):
    return x.view(np.ndarray) if isinstance(x, FakeArray) else x


def _read_on_the_host(name, what):
    """``ndarray.<name>``, which reads the array on the host (waits for the GPU): refused inside
    ``no_host_reads()``."""
    read = getattr(np.ndarray, name)

    def method(self, *args):
        _host_read(what)
        return read(self, *args)
    method.__name__ = name
    return method


for _name, _what in [("__float__", "float()"), ("__int__", "int()"), ("__index__", "an index"),
                     ("__bool__", "bool()"), ("item", "item()"), ("tolist", "tolist()")]:
    setattr(FakeArray, _name, _read_on_the_host(_name, _what))


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


_ALLOCATE_ONLY = {"empty", "empty_like"}     # no work to replay
_IN_PLACE = {"copyto", "put", "place", "putmask", "put_along_axis", "fill_diagonal"}   # they write an argument


def _on_device(fn, name, host_arguments=False):
    """A NumPy function as CuPy's: device arguments in, device arrays out; while a stream captures,
    recorded as one operation (what it computes, written again into the array it returned)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        global _recording
        if not host_arguments:
            _refuse_host_arrays(name, (*args, *kwargs.values()))
        recording, _recording = _recording, None     # its inner ufuncs are not operations of their own
        try:
            result = _device(fn(*args, **kwargs))
        finally:
            _recording = recording
        if recording is not None and name not in _ALLOCATE_ONLY:
            if "out" in kwargs or name in _IN_PLACE:
                _record(lambda: fn(*args, **kwargs))
            elif isinstance(result, np.ndarray) and not any(
                    isinstance(a, np.ndarray) and np.may_share_memory(result, a) for a in _arrays(args, kwargs)):
                _record_copy(result, lambda: fn(*args, **kwargs))
        return result
    return call


def _arrays(args, kwargs):
    for x in (*args, *kwargs.values()):
        if isinstance(x, (list, tuple)):
            yield from x
        else:
            yield x


def _asarray(a, dtype=None):
    """``cupy.asarray``: a device array as it is (or converted), host data uploaded (a copy)."""
    if isinstance(a, FakeArray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    return _recorded_copy(np.array(a, dtype=dtype, copy=True), lambda: np.array(a, dtype=dtype))


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
    # zeroed, not garbage: a capture here runs its operations, and some index with what a replay
    # will have copied into an empty buffer first
    cupy.empty, cupy.empty_like = _on_device(np.zeros, "empty"), _on_device(np.zeros_like, "empty_like")
    cupy.asarray, cupy.array = _asarray, _array
    cupy.asnumpy = _asnumpy
    cupy.argsort = _on_device(lambda a, axis=-1: np.argsort(a, axis=axis, kind="stable"), "argsort")
    cupy.random = types.SimpleNamespace(default_rng=lambda seed=None: _Generator(seed))
    cupy.get_default_memory_pool = lambda: _default_pool
    cupy.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, memcpyAsync=_memcpy_async,
                                      memcpyHostToDevice=1, memcpyDeviceToHost=2),
        get_current_stream=lambda: _streams[-1],
        device=types.SimpleNamespace(get_cublas_handle=lambda: 0),
        Device=lambda *args: types.SimpleNamespace(synchronize=lambda: None),
        Stream=_Stream, Event=_Event, Graph=_Graph,
        MemoryPool=_MemoryPool, set_allocator=lambda allocator=None: None,
        using_allocator=lambda allocator=None: contextlib.nullcontext(),
        alloc_pinned_memory=lambda nbytes: bytearray(nbytes))
    return cupy


def install(patch=setattr, patch_item=operator.setitem):
    """Put the fake behind ``minitransformer.backend`` (``"cuda"`` becomes this CPU stand-in), the
    fused kernels through the emulator, and cuBLAS through the C stand-in. (A test
    passes ``monkeypatch.setattr`` and ``monkeypatch.setitem`` to install it for itself only.)"""
    import cublas_stand_in
    from kernel_emulator import Emulator
    from minitransformer import backend, kernels
    from minitransformer.kernels import _source, capture

    patch(backend, "_cupy", make())
    emulated = Emulator(list(_source.NAMES)).kernel

    @functools.lru_cache(maxsize=None)
    def kernel(name, dtype):
        launch = emulated(name, dtype)

        def recorded(grid, block, args):
            launch(grid, block, args)
            _record(lambda: launch(grid, block, args))
        return recorded
    patch(kernels, "_kernel", kernel)

    # our own cuBLAS handle (captured products, OWN_HANDLE): the CPU stand-in, its calls recorded
    library = _RecordedLibrary(capture.bind(cublas_stand_in.load()))
    patch(capture, "_libcublas", lambda: library)
    # handles made before the install belong to real CuPy streams (a GPU test in the same process,
    # OWN_HANDLE on): their addresses can equal the stand-in's (the null stream's 0), so a fresh table
    patch(kernels, "_own_blas", collections.OrderedDict())
    # CuPy's binding of cuBLAS (attention's eager strided-batched GEMMs on CuPy's handle): the same
    # C stand-in, whose functions take the arguments in cuBLAS's order, as CuPy's binding does
    cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")

    def gemm_strided_batched_ex(*args):
        status = library.cublasGemmStridedBatchedEx(*args)
        if status:
            raise RuntimeError(f"fake cuBLAS: cublasGemmStridedBatchedEx failed with status {status}")
    cublas.gemmStridedBatchedEx = gemm_strided_batched_ex
    cublas.setPointerMode = lambda handle, mode: None
    cupyx = types.ModuleType("cupyx")
    cupyx.allow_synchronize = lambda allow: contextlib.nullcontext() if allow else no_host_reads()
    patch_item(sys.modules, "cupyx", cupyx)
    package = None
    for name in ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs"):
        module = types.ModuleType(name)
        patch_item(sys.modules, name, module)
        if package is not None:
            setattr(package, name.rsplit(".", 1)[1], module)
        package = module
    package.cublas = cublas
    patch_item(sys.modules, "cupy_backends.cuda.libs.cublas", cublas)
