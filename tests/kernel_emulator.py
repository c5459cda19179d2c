"""Run the fused CUDA kernels on the CPU: their CUDA C++ compiled by the host's C++ compiler, one
thread at a time, so that ``minitransformer.kernels``' Python wrappers (grids, argument lists,
output layouts) and the kernels' arithmetic can be tested against their array twins without a GPU.

How: ``kernels._source`` is compiled with a few macros that make CUDA C++ plain C++
(``blockIdx``/``threadIdx`` are globals), plus a C entry point per emulated kernel. A kernel that synchronises its
block (``block_reduce``, ``__syncthreads``) runs with one thread per block: these kernels stride
their loops by ``blockDim.x``, so one thread does the whole row, and ``block_reduce`` of one value is
that value (beam search's top-k kernels: one thread keeps the whole list, and merging one list is
taking it). Other kernels run every thread of every block in turn. A ``cupy`` stand-in made of NumPy
calls stands behind ``backend.cupy()``. The GPU's warp-level summation order is not reproduced:
results agree with the GPU's to rounding, not bitwise.
"""
import ctypes
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

from minitransformer.kernels import _source

SHIM = r"""
#include <cmath>
#include <cstring>
struct Dim3 { unsigned x = 1, y = 1, z = 1; };
static Dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
inline void __syncthreads() {}
template<typename T> inline T __shfl_xor_sync(unsigned, T v, int) { return v; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
#include <algorithm>
using std::exp; using std::log; using std::sqrt; using std::min; using std::max;
"""

# With one thread per block a block's sum is that thread's value.
ONE_THREAD_REDUCE = r"""
template<typename T, bool IS_MAX> T block_reduce(T v, T*) { return v; }
"""

C_TYPES = {"int": ctypes.c_int, "long long": ctypes.c_longlong, "unsigned long long": ctypes.c_ulonglong,
           "float": ctypes.c_float, "double": ctypes.c_double}
# CuPy passes a NumPy scalar to a RawKernel as the bytes of its own dtype, whatever the parameter's
# C type: an np.int32 where the kernel takes a long long reads garbage on a GPU. So each scalar
# must come as exactly the NumPy type of its C type (a pointer given as an address: np.uint64).
NUMPY_TYPES = {"int": np.int32, "long long": np.int64, "unsigned long long": np.uint64,
               "float": np.float32, "double": np.float64}
POINTEE_TYPES = {**NUMPY_TYPES, "unsigned char": np.uint8, "unsigned int": np.uint32}   # an array's elements


def _kernel_source(name):
    match = re.search(r"template<typename T>\n__global__ void " + name + r"\(.*?\n}\n", _source.KERNELS, re.S)
    if match is None:
        raise KeyError(f"kernel {name} not found in kernels._source")
    return match.group(0)


def _synchronises(source):
    """Whether a kernel synchronises its block, itself or through the device functions it calls
    (``block_reduce``, beam search's ``topk_block_merge``): then it runs with one thread a block."""
    return any(re.search(rf"\b{s}\b", source) for s in _synchronising())


@functools.lru_cache(maxsize=None)
def _synchronising():
    """``__syncthreads`` and every device function that calls it, directly or not."""
    syncing = {"__syncthreads", "block_reduce"}
    functions = dict(re.findall(r"__device__[^(]*?\b(\w+)\((.*?)\n}\n", _source.PRELUDE + _source.KERNELS, re.S))
    grew = True
    while grew:                     # device functions that call a synchronising one synchronise
        grew = False
        for name, body in functions.items():
            if name not in syncing and any(re.search(rf"\b{s}\b", body) for s in syncing):
                syncing.add(name)
                grew = True
    return frozenset(syncing)


def _parameters(source):
    """``[(C type, name)]`` of a kernel's parameter list."""
    params = source[source.index("(") + 1:source.index(")")]
    out = []
    for p in params.split(","):
        p = " ".join(p.replace("__restrict__", "").replace("const", "").split())
        ctype, name = p.rsplit(" ", 1)
        if name.startswith("*"):
            ctype, name = ctype + "*", name[1:]
        out.append((ctype.replace(" *", "*"), name))
    return out


def _prelude():
    """PRELUDE with block_reduce replaced by its one-thread version (warp_reduce kept: unused)."""
    start = _source.PRELUDE.index("// Sum (or max) over the block")
    end = _source.PRELUDE.index("// SplitMix64")
    return _source.PRELUDE[:start] + ONE_THREAD_REDUCE + _source.PRELUDE[end:]


def _compiler():
    """The host's C++ compiler, or Zig's from PyPI (``pip install ziglang``) where there is none."""
    for name in ("g++", "c++", "clang++"):
        if shutil.which(name):
            return [shutil.which(name)]
    if importlib.util.find_spec("ziglang") is not None:
        return [sys.executable, "-m", "ziglang", "c++"]
    raise RuntimeError("no C++ compiler: none of g++, c++, clang++ on PATH, and no ziglang package")


class Emulator:
    """The named kernels compiled into one shared library; ``kernel(name, dtype)`` behaves like
    ``kernels._kernel``'s result: ``k(grid, block, args)``."""

    def __init__(self, names):
        compiler = _compiler()
        self.params, wrappers = {}, []
        for name in names:
            src = _kernel_source(name)
            self.params[name] = _parameters(src)
            for t in ("float", "double"):
                decl = ", ".join(f"{c.replace('T', t) if c in ('T', 'T*') else c} {n}"
                                 for c, n in self.params[name])
                call = ", ".join(f"({c.replace('T', t) if c in ('T', 'T*') else c}){n}"
                                 for c, n in self.params[name])
                one_thread = _synchronises(src)
                wrappers.append(f"""
extern "C" void run_{name}_{t}(unsigned grid_x_, unsigned grid_y_, unsigned block_x_, {decl}) {{
    gridDim.x = grid_x_; gridDim.y = grid_y_; blockDim.x = {1 if one_thread else "block_x_"};
    for (unsigned by_ = 0; by_ < grid_y_; ++by_) for (unsigned bx_ = 0; bx_ < grid_x_; ++bx_)
        for (unsigned tx_ = 0; tx_ < blockDim.x; ++tx_) {{
            blockIdx.x = bx_; blockIdx.y = by_; threadIdx.x = tx_;
            {name}<{t}>({call});
        }}
}}""")
        code = SHIM + _prelude() + _source.KERNELS + "\n".join(wrappers)
        digest = hashlib.sha1(code.encode()).hexdigest()[:16]
        build = Path(tempfile.gettempdir()) / f"mt-kernel-emulator-{digest}"
        build.mkdir(exist_ok=True)
        lib = build / "kernels.so"
        if not lib.exists():   # built under names of this process, then moved: pytest -n workers race
            source, built = build / f"kernels.{os.getpid()}.cpp", build / f"kernels.{os.getpid()}.so"
            source.write_text(code)
            # -ffp-contract=off: no fused multiply-add, as the GPU build's --fmad=false
            result = subprocess.run([*compiler, "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-std=c++14",
                                     "-o", str(built), str(source)], capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"compiling the emulated kernels failed:\n{result.stderr[:4000]}")
            os.replace(built, lib)
        self.lib = ctypes.CDLL(str(lib))

    def kernel(self, name, dtype):
        t = "float" if np.dtype(dtype) == np.float32 else "double"
        fn = getattr(self.lib, f"run_{name}_{t}")
        params = self.params[name]
        scalar_t = ctypes.c_float if t == "float" else ctypes.c_double

        def launch(grid, block, args):
            if len(args) != len(params):
                raise TypeError(f"{name}: {len(args)} arguments for {len(params)} parameters")
            grid = tuple(grid) + (1, 1)
            c_args = [ctypes.c_uint(int(grid[0])), ctypes.c_uint(int(grid[1])), ctypes.c_uint(int(block[0]))]
            for (ctype, pname), a in zip(params, args):
                if not isinstance(a, np.ndarray):
                    expected = (np.dtype(dtype).type if ctype == "T" else np.uint64 if ctype.endswith("*")
                                else NUMPY_TYPES[ctype])
                    if type(a) is not expected:
                        raise TypeError(f"{name}: {pname} ({ctype}) is passed as {type(a).__name__}; CuPy "
                                        f"would pass its bytes as they are: give it as {expected.__name__}")
                if ctype.endswith("*"):
                    if isinstance(a, np.ndarray):
                        # T arrays are indexed as dense rows; others (a broadcast mask) come with strides
                        if ctype == "T*" and not a.flags.c_contiguous:
                            raise ValueError(f"{name}: {pname} is not C-contiguous")
                        element = np.dtype(dtype) if ctype == "T*" else np.dtype(POINTEE_TYPES[ctype[:-1]])
                        if a.dtype != element:
                            raise TypeError(f"{name}: {pname} ({ctype}) is an array of {a.dtype}, not {element}")
                        c_args.append(ctypes.c_void_p(a.ctypes.data))
                    else:                        # a raw address (0: null)
                        c_args.append(ctypes.c_void_p(int(a) or None))
                elif ctype == "T":
                    c_args.append(scalar_t(a))
                else:
                    c_args.append(C_TYPES[ctype](int(a) if "int" in ctype or "long" in ctype else float(a)))
            fn(*c_args)
        return launch


def stand_in_cupy():
    """The few CuPy calls ``minitransformer.kernels`` makes, done by NumPy."""
    return types.SimpleNamespace(
        empty=np.empty, empty_like=np.empty_like, zeros=np.zeros, ones=np.ones, asarray=np.asarray,
        ascontiguousarray=np.ascontiguousarray, broadcast_to=np.broadcast_to,
        float32=np.float32, float64=np.float64, int64=np.int64, uint8=np.uint8)
