"""Our own cuBLAS calls (``kernels/capture.py``'s ``Blas`` through ``ctypes``: every product of a
captured CUDA graph, and the eager 2-D products with ``kernels.OWN_HANDLE``) against a ``libcublas``
for the CPU with cuBLAS's signatures (``tests/cublas_stand_in.py``) and NumPy's products: operand
order, transposes, leading dimensions, strides and the handle's stream and workspace are ours to get
right, and otherwise only a GPU would tell. (The real library's numbers: ``tests/test_kernels.py``.)"""
import ctypes
import os
import types

import numpy as np
import pytest

import cublas_stand_in
import fake_cupy
from kernel_emulator import _compiler
from minitransformer import backend, kernels
from minitransformer.kernels import capture

TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "float64": dict(rtol=1e-12, atol=1e-12)}


@pytest.fixture
def cp(monkeypatch):
    """The CPU stand-ins for CuPy and libcublas behind the package, for this test only."""
    try:
        _compiler()
    except RuntimeError as e:      # as for the kernel emulator: CI always has one (.ci/run)
        if os.environ.get("CI"):
            pytest.fail(f"the cuBLAS stand-in needs a C++ compiler: {e}")
        pytest.skip(f"no C++ compiler for the cuBLAS stand-in ({e})")
    monkeypatch.setattr(backend, "_cupy", fake_cupy.make())
    # the stand-in itself, not the library capture._libcublas would find (on a GPU machine, the real one)
    bound = capture.bind(cublas_stand_in.load())
    monkeypatch.setattr(capture, "_libcublas", lambda: bound)
    monkeypatch.setattr(kernels, "_own_blas", type(kernels._own_blas)())
    return backend.cupy()


def _device(cp, rng, shape, dtype):
    return cp.asarray(rng.standard_normal(shape).astype(dtype))


def _host(a):
    return np.asarray(a.get(), dtype=np.float64)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_own_handle_products_and_column_sums(cp, monkeypatch, dtype, rng):
    monkeypatch.setattr(kernels, "OWN_HANDLE", True)
    x, w, g = (_device(cp, rng, s, dtype) for s in ((30, 7), (5, 7), (30, 5)))
    cases = [(kernels.matmul(x, w.T), _host(x) @ _host(w).T),        # a linear layer's forward
             (kernels.matmul(g, w), _host(g) @ _host(w)),            # its dx
             (kernels.matmul(g.T, x), _host(g).T @ _host(x)),        # its dW
             (kernels.column_sum(g), _host(g).sum(axis=0))]          # its db (GEMV)
    for ours, ref in cases:
        assert isinstance(ours, cp.ndarray) and ours.dtype == dtype and ours.flags.c_contiguous
        np.testing.assert_allclose(_host(ours), ref, **TOL[dtype])
    # one handle, bound to the current stream, with its 32 MiB workspace
    (blas,) = kernels._own_blas.values()
    stream, workspace, size = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_size_t()
    capture._libcublas().stand_in_handle(blas.handle, ctypes.byref(stream), ctypes.byref(workspace), ctypes.byref(size))
    assert (stream.value or 0) == cp.cuda.get_current_stream().ptr
    assert workspace.value == blas.workspace.data.ptr and size.value == 32 << 20 == blas.workspace.nbytes


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("a_t, b_t", [(False, False), (True, False), (False, True), (True, True)])
def test_captured_products_go_through_the_captures_handle(cp, dtype, a_t, b_t, rng):
    """While a step is captured, every product (strided-batched, 2-D, the bias GEMV) is ours."""
    blas = capture.Blas(cp.cuda.get_current_stream())
    previous = backend.set_capture(types.SimpleNamespace(blas=blas))
    try:
        a = _device(cp, rng, (2, 3, 5, 4) if a_t else (2, 3, 4, 5), dtype)
        b = _device(cp, rng, (2, 3, 6, 5) if b_t else (2, 3, 5, 6), dtype)
        a, b = (a.swapaxes(-1, -2) if a_t else a), (b.swapaxes(-1, -2) if b_t else b)
        whole = cp.full((3, 2, 3, 4, 6), 7.0, dtype=dtype)
        out = kernels.batched_matmul(a, b, out=whole[1])           # into a part of a bigger array
        ref = _host(a) @ _host(b)
        np.testing.assert_allclose(_host(out), ref, **TOL[dtype])
        np.testing.assert_allclose(_host(whole[1]), ref, **TOL[dtype])
        assert (_host(whole[0]) == 7).all() and (_host(whole[2]) == 7).all()
        a2, b2 = a[1, 2], b[0, 1]                                   # 2-D, transposed views included
        np.testing.assert_allclose(_host(kernels.matmul(a2, b2)), _host(a2) @ _host(b2), **TOL[dtype])
        g = _device(cp, rng, (9, 4), dtype)
        np.testing.assert_allclose(_host(kernels.column_sum(g)), _host(g).sum(axis=0), **TOL[dtype])
    finally:
        backend.set_capture(previous)


def test_tf32_products_take_gemm_ex_with_the_tf32_compute_type(cp, monkeypatch, rng):
    """float32 with TF32 on: GemmEx, compute type CUBLAS_COMPUTE_32F_FAST_TF32 (the stand-in refuses
    any other compute type for float32 data than 32F and TF32, and 64F for float64)."""
    monkeypatch.setattr(kernels, "OWN_HANDLE", True)
    monkeypatch.setattr(backend, "tf32_enabled", lambda: True)
    calls = []
    blas = kernels._eager_blas()
    real_gemm_ex = blas.lib.cublasGemmEx
    monkeypatch.setattr(blas, "lib", types.SimpleNamespace(
        cublasGemmEx=lambda *args: calls.append(args[-2]) or real_gemm_ex(*args)))
    x, w = _device(cp, rng, (6, 3), "float32"), _device(cp, rng, (4, 3), "float32")
    np.testing.assert_allclose(_host(kernels.matmul(x, w.T)), _host(x) @ _host(w).T, rtol=1e-5, atol=1e-5)
    assert calls == [77]
