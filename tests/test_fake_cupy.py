"""The CPU stand-in for CuPy (``tests/fake_cupy.py``, behind ``MT_FAKE_CUDA=1``) keeps the CuPy
conventions the "cuda" tests rely on it for: were it laxer, those tests would pass where a GPU fails."""
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_strided_batched_gemm_reads_and_writes_as_cublas(dtype, trans_a, trans_b, rng):
    """Column-major C_i = op(A_i) op(B_i) at raw addresses, with leading dimensions and strides."""
    batch, m, n, k = 3, 4, 5, 6
    A = rng.standard_normal((batch, *((k, m) if trans_a == 0 else (m, k)))).astype(dtype)   # row-major storage
    B = rng.standard_normal((batch, *((n, k) if trans_b == 0 else (k, n)))).astype(dtype)
    C = np.full((batch, n, m), 7.0, dtype=dtype)   # beta = 0: the 7s must go
    one, zero = np.ones(1, dtype), np.zeros(1, dtype)
    type_id = 0 if dtype == np.float32 else 1
    fake_cupy._gemm_strided_batched_ex(
        0, trans_a, trans_b, m, n, k, one.ctypes.data, A.ctypes.data, type_id, A.shape[2], A[0].size,
        B.ctypes.data, type_id, B.shape[2], B[0].size, zero.ctypes.data, C.ctypes.data, type_id, m, m * n,
        batch, 68, -1)
    # a column-major (r, c) matrix is the transpose of the row-major (c, r) array that holds it
    op_a = A.swapaxes(1, 2) if trans_a == 0 else A
    op_b = B.swapaxes(1, 2) if trans_b == 0 else B
    np.testing.assert_allclose(C.swapaxes(1, 2), op_a @ op_b, rtol=1e-5)
