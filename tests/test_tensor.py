"""Tensor: its attributes, constructors, operators and the graph walk, checked against PyTorch.

Operators are written once as lambdas that work on both a ``mt.Tensor`` and a ``torch.Tensor``;
each case compares the forward value and the gradient of every input.
"""
import sys

import numpy as np
import pytest
import torch

import minitransformer as mt

TOL = {"float64": dict(rtol=1e-6, atol=1e-6), "float32": dict(rtol=1e-5, atol=1e-6)}
TORCH_DTYPE = {"float64": torch.float64, "float32": torch.float32}


def as_torch(t):
    """A torch leaf with the same values (and requires_grad) as the mt tensor ``t``."""
    return torch.tensor(t.numpy(), requires_grad=t.requires_grad)


def close(ours, theirs, dtype):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    np.testing.assert_allclose(ours, theirs, **TOL[dtype])


def check_against_torch(fn, inputs, dtype, rng):
    """Forward and every input gradient of ``fn`` equal torch's, for a random upstream grad."""
    ours = fn(*inputs)
    ref_inputs = [as_torch(t) for t in inputs]
    theirs = fn(*ref_inputs)
    assert ours.shape == tuple(theirs.shape)
    assert ours.dtype == np.dtype(dtype), "the op changed the dtype"
    close(ours.numpy(), theirs, dtype)
    g = rng.standard_normal(ours.shape)
    ours.backward(g)
    theirs.backward(torch.tensor(g, dtype=TORCH_DTYPE[dtype]))
    for i, (t, ref) in enumerate(zip(inputs, ref_inputs)):
        assert t.grad is not None, f"input {i} got no gradient"
        assert t.grad.shape == t.shape and t.grad.dtype == t.dtype
        assert mt.backend.device_of(t.grad) == t.device
        close(mt.backend.to_numpy(t.grad), ref.grad, dtype)


# ---- attributes and conversions -----------------------------------------------------------

def test_attributes(device, rng):
    array = rng.standard_normal((2, 3))
    t = mt.tensor(array, requires_grad=True, dtype="float64", device=device)
    assert isinstance(t.data, t.xp.ndarray)
    assert t.shape == (2, 3) and t.ndim == 2 and t.size == 6 and len(t) == 2
    assert t.dtype == np.float64
    assert t.device == device
    assert t.requires_grad and t.grad is None and t.is_leaf
    host = t.numpy()
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, array)
    assert t.tolist() == array.tolist()
    assert mt.tensor([1.0], device=device).requires_grad is False


def test_tensor_copies_its_input(device):
    array = np.ones(3)
    t = mt.tensor(array, device=device)
    array[0] = 5.0
    assert t.numpy()[0] == 1.0


def test_item(device):
    assert mt.tensor([[2.5]], device=device).item() == 2.5
    assert isinstance(mt.tensor(3, device=device).item(), int)
    with pytest.raises(ValueError, match=r"item.*\(2, 2\)"):
        mt.tensor(np.ones((2, 2)), device=device).item()


def test_detach_cuts_the_graph(device, randn):
    x = randn(3)
    y = x * 2.0
    d = y.detach()
    assert not d.requires_grad and d.is_leaf and d.op == ""
    np.testing.assert_array_equal(d.numpy(), y.numpy())
    z = (d * x).sum()       # only the x path carries a gradient
    z.backward()
    np.testing.assert_allclose(mt.backend.to_numpy(x.grad), d.numpy())


def test_to_cpu(device, randn):
    x = randn(2, 2)
    host = x.to("cpu")
    assert host.device == "cpu" and isinstance(host.data, np.ndarray)
    np.testing.assert_array_equal(host.numpy(), x.numpy())
    if device == "cpu":
        assert x.to("cpu") is x
    else:
        assert host.requires_grad and host.is_leaf
        back = host.to(device)
        assert back.device == device
        np.testing.assert_array_equal(back.numpy(), x.numpy())


def test_to_unknown_device_raises(randn):
    with pytest.raises(ValueError, match="tpu"):
        randn(2).to("tpu")


@pytest.mark.parametrize("data, dtype", [
    ([1.0, 2.0], np.float32),            # Python floats take the default dtype
    (1.5, np.float32),
    ([[1, 2], [3, 4]], np.int64),        # Python ints are int64, as in torch
    (7, np.int64),
    ([True, False], np.bool_),
    (np.arange(3, dtype=np.int32), np.int32),     # arrays keep their dtype
    (np.ones(2), np.float64),
])
def test_dtype_inference(device, data, dtype):
    t = mt.tensor(data, device=device)
    assert t.dtype == dtype
    assert str(t.dtype) == str(torch.tensor(data).dtype).replace("torch.", "")


def test_explicit_and_default_dtype(device):
    assert mt.tensor([1.0], dtype="float64", device=device).dtype == np.float64
    assert mt.tensor([1, 2], dtype=np.float32, device=device).dtype == np.float32
    mt.set_default_dtype("float64")
    assert mt.tensor([1.0], device=device).dtype == np.float64
    assert mt.tensor([1], device=device).dtype == np.int64


def test_requires_grad_on_integers_raises(device):
    with pytest.raises(TypeError, match="int64"):
        mt.tensor([1, 2, 3], requires_grad=True, device=device)


def test_repr_names_op_and_dtype(randn):
    assert "op=mul" in repr(randn(2) * 2.0)
    assert "float64" in repr(randn(2))


# ---- operators vs PyTorch -----------------------------------------------------------------

# (id, input shapes, fn working on both libraries); "pos(…)" inputs are in [0.5, 2), "nz(…)" ones
# have |x| >= 0.1 (away from a kink or a pole).
OPERATOR_CASES = [
    ("add", [(3, 4), (3, 4)], lambda a, b: a + b),
    ("sub", [(3, 4), (3, 4)], lambda a, b: a - b),
    ("mul", [(3, 4), (3, 4)], lambda a, b: a * b),
    ("div", [(3, 4), "pos(3, 4)"], lambda a, b: a / b),
    ("matmul", [(3, 4), (4, 5)], lambda a, b: a @ b),
    ("matmul-batched", [(2, 3, 4), (4, 5)], lambda a, b: a @ b),
    ("matmul-batch-broadcast", [(2, 1, 3, 4), (5, 4, 2)], lambda a, b: a @ b),
    ("matmul-vec-mat", [(4,), (2, 4, 3)], lambda a, b: a @ b),
    ("matmul-mat-vec", [(2, 3, 4), (4,)], lambda a, b: a @ b),
    ("matmul-dot", [(4,), (4,)], lambda a, b: a @ b),
    ("pow2", [(3, 4)], lambda a: a ** 2),
    ("pow3", [(3, 4)], lambda a: a ** 3),
    ("pow-half", ["pos(3, 4)"], lambda a: a ** 0.5),
    ("pow-neg", ["pos(3, 4)"], lambda a: a ** -1.5),
    ("neg", [(3, 4)], lambda a: -a),
    ("radd", [(3, 4)], lambda a: 2.5 + a),
    ("rsub", [(3, 4)], lambda a: 2.5 - a),
    ("rmul", [(3, 4)], lambda a: 3 * a),
    ("rdiv", ["pos(3, 4)"], lambda a: 2.0 / a),
    ("sub-scalar", [(3, 4)], lambda a: a - 1),
    ("div-scalar", [(3, 4)], lambda a: a / 4.0),
    ("exp", [(3, 4)], lambda a: a.exp()),
    ("log", ["pos(3, 4)"], lambda a: a.log()),
    ("sqrt", ["pos(3, 4)"], lambda a: a.sqrt()),
    ("tanh", [(3, 4)], lambda a: a.tanh()),
    ("relu", ["nz(3, 4)"], lambda a: a.relu()),
    ("sum-all", [(3, 4)], lambda a: a.sum()),
    ("sum-axis", [(2, 3, 4)], lambda a: a.sum(axis=1) if not isinstance(a, torch.Tensor) else a.sum(1)),
    ("sum-neg-keepdims", [(2, 3, 4)], lambda a: a.sum(axis=-1, keepdims=True)
        if not isinstance(a, torch.Tensor) else a.sum(-1, keepdim=True)),
    ("sum-tuple", [(2, 3, 4)], lambda a: a.sum(axis=(0, 2))
        if not isinstance(a, torch.Tensor) else a.sum((0, 2))),
    ("mean-all", [(3, 4)], lambda a: a.mean()),
    ("mean-keepdims", [(2, 3, 4)], lambda a: a.mean(axis=(0, 2), keepdims=True)
        if not isinstance(a, torch.Tensor) else a.mean((0, 2), keepdim=True)),
    ("mean-axis0", [(2, 3, 4)], lambda a: a.mean(axis=0) if not isinstance(a, torch.Tensor) else a.mean(0)),
    ("reshape", [(2, 3, 4)], lambda a: a.reshape(4, 6)),
    ("reshape-tuple-minus1", [(2, 3, 4)], lambda a: a.reshape((3, -1))),
    ("transpose", [(2, 3, 4)], lambda a: a.transpose(1, 0, 2)
        if not isinstance(a, torch.Tensor) else a.permute(1, 0, 2)),
    ("transpose-neg-axes", [(2, 3, 4)], lambda a: a.transpose(-1, 0, 1)
        if not isinstance(a, torch.Tensor) else a.permute(-1, 0, 1)),
    ("T", [(3, 4)], lambda a: a.T),
    ("slice", [(4, 5)], lambda a: a[1:, ::2]),
    ("slice-int", [(4, 5, 2)], lambda a: a[2, 1:4]),
    ("negative-index", [(4, 5)], lambda a: a[-1]),
    ("ellipsis-none", [(2, 3, 4)], lambda a: a[..., None, 1]),
    ("int-array-repeats", [(4, 3)], lambda a: a[[0, 2, 0, 0, 3]]),
    ("int-array-axis1", [(4, 3)], lambda a: a[:, [1, 1, 2, 1]]),
    ("int-array-pairs", [(4, 3)], lambda a: a[[0, 0, 3], [1, 1, 2]]),
    ("chain", [(3, 4), (4,)], lambda a, b: ((a * b - b / 3) @ b).tanh().exp()),
]
BROADCAST_CASES = [
    (op, [sa, sb], fn)
    for op, fn in [("add", lambda a, b: a + b), ("sub", lambda a, b: a - b),
                   ("mul", lambda a, b: a * b), ("div", lambda a, b: a / b)]
    for sa, sb in [((3, 1, 4), (5, 4)), ((5, 4), (3, 1, 4)), ((1,), (2, 3)), ((2, 3), (1,)),
                   ((), (2, 3)), ((4, 1), (1, 5)), ((2, 1, 3), (2, 4, 1))]
]


def _make_inputs(shapes, dtype, device, rng):
    inputs = []
    for shape in shapes:
        if isinstance(shape, str) and shape.startswith("pos"):
            array = rng.uniform(0.5, 2.0, size=eval(shape[3:]))
        elif isinstance(shape, str) and shape.startswith("nz"):
            array = rng.standard_normal(eval(shape[2:]))
            array = np.sign(array) * (np.abs(array) + 0.1)
        else:
            array = rng.standard_normal(shape)
        inputs.append(mt.tensor(array, dtype=dtype, device=device, requires_grad=True))
    return inputs


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name, shapes, fn", OPERATOR_CASES, ids=[c[0] for c in OPERATOR_CASES])
def test_operator_matches_torch(name, shapes, fn, dtype, device, rng):
    check_against_torch(fn, _make_inputs(shapes, dtype, device, rng), dtype, rng)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name, shapes, fn", BROADCAST_CASES,
                         ids=[f"{c[0]}-{c[1][0]}-{c[1][1]}" for c in BROADCAST_CASES])
def test_broadcast_gradient_is_unbroadcast(name, shapes, fn, dtype, device, rng):
    inputs = _make_inputs(shapes, dtype, device, rng)
    if name == "div":  # keep the divisor away from zero
        b = inputs[1]
        inputs[1] = mt.tensor(np.sign(b.numpy()) * (np.abs(b.numpy()) + 0.5), dtype=dtype,
                              device=device, requires_grad=True)
    check_against_torch(fn, inputs, dtype, rng)


def test_float32_stays_float32_with_python_scalars(device, randn):
    x = randn(3, dtype="float32", low=0.5, high=2.0)
    for y in [x + 1.5, 1.5 + x, x - 2, 2 - x, x * 3.0, 3 * x, x / 7.0, 7.0 / x, x ** 2, x ** 0.5, -x,
              x + np.float64(1.0)]:
        assert y.dtype == np.float32, y
        y.sum().backward()
        assert x.grad.dtype == np.float32


def test_ndarray_on_the_left_calls_tensor_reflected_ops(device, randn):
    x = randn(3)
    a = mt.backend.xp_for(device).asarray([1.0, 2.0, 3.0])    # an array of the tensor's own device
    host = mt.backend.to_numpy(a)
    for y, expected in [(a + x, host + x.numpy()), (a - x, host - x.numpy()), (a * x, host * x.numpy()),
                        (a / x, host / x.numpy())]:
        assert isinstance(y, mt.Tensor)
        np.testing.assert_allclose(y.numpy(), expected)


def test_reflected_matmul_and_astype_match_torch(device, rng):
    """``array @ tensor`` (``__rmatmul__``) and ``Tensor.astype``, forward and gradients."""
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((3, 4))
    x = mt.tensor(b, device=device, requires_grad=True)
    y = (mt.backend.xp_for(device).asarray(a) @ x).astype(np.float32)
    assert isinstance(y, mt.Tensor) and y.dtype == np.float32
    t = torch.tensor(b, requires_grad=True)
    expected = (torch.tensor(a) @ t).to(torch.float32)
    np.testing.assert_allclose(y.numpy(), expected.detach().numpy(), rtol=1e-6)
    g = rng.standard_normal((2, 4)).astype(np.float32)
    y.backward(g)
    expected.backward(torch.tensor(g))
    assert x.grad.dtype == np.float64
    np.testing.assert_allclose(mt.backend.to_numpy(x.grad), t.grad.numpy(), rtol=1e-6)


def test_comparisons_give_boolean_tensors(device):
    x = mt.tensor([1.0, 2.0, 3.0], device=device)
    assert (x > 1.5).tolist() == [False, True, True]
    assert (x == 2.0).tolist() == [False, True, False]
    assert (~(x <= 2.0)).tolist() == [False, False, True]
    assert (x > 1.5).dtype == np.bool_ and not (x > 1.5).requires_grad


def test_boolean_mask_index(device, randn, rng):
    x = randn(4, 5)
    keep = rng.standard_normal((4, 5)) > 0
    y = x[keep]
    np.testing.assert_array_equal(y.numpy(), x.numpy()[keep])
    y.backward(np.arange(y.size, dtype=np.float64))
    expected = np.zeros((4, 5))
    expected[keep] = np.arange(keep.sum())
    np.testing.assert_array_equal(mt.backend.to_numpy(x.grad), expected)


def test_repeated_integer_index_accumulates(device, randn):
    x = randn(3)
    x[[0, 0, 0, 2]].sum().backward()
    np.testing.assert_array_equal(mt.backend.to_numpy(x.grad), [3.0, 0.0, 1.0])


def test_bad_reshape_and_transpose_name_the_op(randn):
    x = randn(2, 3)
    with pytest.raises(ValueError, match=r"reshape.*\(2, 3\).*\(4, 2\)"):
        x.reshape(4, 2)
    with pytest.raises(ValueError, match=r"transpose.*\(0, 0\)"):
        x.transpose(0, 0)
    with pytest.raises(ValueError, match=r"sum: axis 2 .*\(2, 3\)"):
        x.sum(axis=2)
    with pytest.raises(IndexError, match=r"getitem.*\(2, 3\)"):
        x[5]


# ---- the graph walk -----------------------------------------------------------------------

def test_gradients_accumulate_across_backward_calls(device, randn, rng):
    x = randn(3, 4)
    w = randn(4, 2)
    tx, tw = as_torch(x), as_torch(w)
    for _ in range(2):
        ((x @ w).tanh() * x.sum()).sum().backward()
        ((tx @ tw).tanh() * tx.sum()).sum().backward()
    close(mt.backend.to_numpy(x.grad), tx.grad, "float64")
    close(mt.backend.to_numpy(w.grad), tw.grad, "float64")
    first = mt.backend.to_numpy(x.grad).copy()
    x.zero_grad()
    assert x.grad is None
    ((x @ w).tanh() * x.sum()).sum().backward()
    close(2 * mt.backend.to_numpy(x.grad), first, "float64")


def test_node_used_many_times(device, randn):
    x = randn(5)
    tx = as_torch(x)
    for t in (x, tx):
        y = t * t + t * t * t + (t * t) / (t * t + 1.0) - t
        (y * y).sum().backward()
    close(mt.backend.to_numpy(x.grad), tx.grad, "float64")


def test_one_node_used_a_hundred_times(device, randn):
    x = randn(4)
    total = x
    for _ in range(99):
        total = total + x
    total.sum().backward()
    np.testing.assert_array_equal(mt.backend.to_numpy(x.grad), np.full(4, 100.0))
    x2 = randn(4)
    tx2 = as_torch(x2)
    for t in (x2, tx2):
        acc = t * 0.0
        for k in range(100):
            acc = acc + t * float(k % 7)
        (acc * t).sum().backward()
    close(mt.backend.to_numpy(x2.grad), tx2.grad, "float64")


def test_ten_thousand_op_chain_has_no_recursion_limit(device, randn):
    assert sys.getrecursionlimit() < 20_000   # the walk must not lean on the recursion limit
    x = randn(3)
    y = x
    for _ in range(5_000):
        y = y * 1.0001
        y = y + 0.0
    y.sum().backward()
    np.testing.assert_allclose(mt.backend.to_numpy(x.grad), np.full(3, 1.0001 ** 5_000), rtol=1e-9)
    np.testing.assert_allclose(y.numpy(), x.numpy() * 1.0001 ** 5_000, rtol=1e-9)


def test_deep_alternating_chain_matches_torch(device, randn):
    x = randn(2)
    tx = as_torch(x)
    for t in (x, tx):
        y = t
        for i in range(10_000):
            y = (y * 0.9999 if i % 2 else y + 0.001)
        y.sum().backward()
    close(mt.backend.to_numpy(x.grad), tx.grad, "float64")


def test_no_grad_builds_no_graph(device, randn):
    x = randn(3)
    assert mt.is_grad_enabled()
    with mt.no_grad():
        assert not mt.is_grad_enabled()
        y = (x * 2.0).exp().sum()
    assert mt.is_grad_enabled()
    assert not y.requires_grad and y.parents == () and y.op == "" and y.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()
    with pytest.raises(ZeroDivisionError):       # the flag comes back after an exception too
        with mt.no_grad():
            1 / 0
    assert mt.is_grad_enabled()


def test_retain_grad_keeps_an_intermediate_gradient(device, randn):
    x = randn(3, 4)
    tx = as_torch(x)
    h = (x * 3.0).tanh().retain_grad()
    th = (tx * 3.0).tanh()
    th.retain_grad()
    other = x.exp()                               # an intermediate without retain_grad
    (h * h + other).sum().backward()
    (th * th + tx.exp()).sum().backward()
    close(mt.backend.to_numpy(h.grad), th.grad, "float64")
    close(mt.backend.to_numpy(x.grad), tx.grad, "float64")
    assert other.grad is None


def test_backward_on_non_scalar_needs_grad(device, randn):
    y = randn(2, 3) * 2.0
    with pytest.raises(ValueError, match=r"backward.*\(2, 3\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"backward.*\(3, 2\).*\(2, 3\)"):
        y.backward(np.ones((3, 2)))


def test_backward_with_explicit_grad(device, randn, rng):
    x = randn(2, 3)
    g = rng.standard_normal((2, 3))
    (x * 2.0).backward(g)
    np.testing.assert_allclose(mt.backend.to_numpy(x.grad), 2 * g)


def test_backward_twice_needs_retain_graph(device, randn):
    x = randn(3)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.backward()
    # a second output sharing the freed part of the graph fails the same way
    z = x.exp()
    a, b = (z * 2.0).sum(), (z * 3.0).sum()
    a.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        b.backward()


def test_retain_graph_allows_a_second_backward(device, randn):
    x = randn(3)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(mt.backend.to_numpy(x.grad), 4 * x.numpy())


def test_leaf_grad_is_never_a_broadcast_view(device, randn):
    x = randn(3, 4)
    x.sum().backward()                         # sum's backward is a broadcast view
    grad = x.grad
    assert grad.flags.c_contiguous and grad.base is None
    np.testing.assert_array_equal(mt.backend.to_numpy(grad), np.ones((3, 4)))


def test_parts_of_a_tensor_fill_one_gradient(device, randn, rng):
    """Gradients of x[0], x[1:3], x[3] (basic indexing: parts) and of x itself (whole) add up,
    whichever comes first in the walk, and a second backward adds the same again."""
    x = randn(4, 3)
    w = [rng.standard_normal(s) for s in [(3,), (2, 3), (3,), (4, 3)]]
    t = [mt.tensor(a, dtype=x.dtype, device=device) for a in w]
    y = ((x[0] * t[0]).sum() + (x[1:3] * t[1]).sum() + (x * t[3]).sum() + (x[3] * t[2]).sum()
         + (x[1:3] * t[1]).sum())
    y.backward(retain_graph=True)
    expected = w[3].copy()
    expected[0] += w[0]
    expected[1:3] += 2 * w[1]
    expected[3] += w[2]
    np.testing.assert_allclose(mt.backend.to_numpy(x.grad), expected, rtol=1e-12)
    y.backward()
    np.testing.assert_allclose(mt.backend.to_numpy(x.grad), 2 * expected, rtol=1e-12)


def test_parts_that_are_single_elements_add_up(device, randn):
    """x[1] of a 1-D array is one element (a NumPy scalar, not a view): its gradient still lands."""
    x = randn(4)
    (x[1] * 3.0 + x[2] + x[1] + x[-1] * x[-1]).backward()
    expected = np.array([0.0, 4.0, 1.0, 2 * x.numpy()[-1]])
    np.testing.assert_allclose(mt.backend.to_numpy(x.grad), expected, rtol=1e-12)


def test_parts_reach_an_intermediate_tensor_that_retains_its_grad(device, randn):
    x = randn(2, 3)
    h = (x * 3.0).retain_grad()
    (h[0] * 2.0 + h[1]).sum().backward()
    np.testing.assert_array_equal(mt.backend.to_numpy(h.grad), [[2.0] * 3, [1.0] * 3])
    np.testing.assert_array_equal(mt.backend.to_numpy(x.grad), [[6.0] * 3, [3.0] * 3])


def test_integer_tensors_mix_with_floats_as_in_pytorch(device):
    """ids * 0.5 is float32 (the default dtype), not NumPy's float64; int / int is float too."""
    ids = mt.tensor([1, 2, 3], device=device)
    x = mt.tensor([0.5, 1.0, 2.0], dtype="float64", device=device)
    assert (ids * 0.5).dtype == np.float32 and (0.5 * ids).dtype == np.float32
    assert (ids + x).dtype == np.float64                       # the float operand's dtype
    assert (ids / 2).dtype == np.float32
    np.testing.assert_allclose((ids / 2).numpy(), [0.5, 1.0, 1.5])
    assert (ids + 1).dtype == np.int64                         # integers stay integers


@pytest.mark.parametrize("op", ["mul", "matmul", "linear", "add_broadcast"])
def test_mixed_float_dtypes_keep_each_gradient_in_its_tensors_dtype(op, device, rng):
    """float32 with float64 computes in float64 (NumPy's promotion, PyTorch's for elementwise ops),
    but each gradient has its own tensor's dtype, as PyTorch's do: a float32 weight never gets a
    float64 gradient that the optimizer would then carry around."""
    from minitransformer import functional as F
    n, d, m = (int(k) for k in rng.integers(1, 7, size=3))
    a64 = rng.standard_normal((n, d))
    b64 = rng.standard_normal({"linear": (m, d), "matmul": (d, m)}.get(op, (d,)))
    fn = {"mul": lambda a, b: a * b, "matmul": lambda a, b: a @ b, "linear": F.linear,
          "add_broadcast": lambda a, b: a + b}[op]
    a = mt.tensor(a64, dtype="float64", requires_grad=True, device=device)
    b = mt.tensor(b64, dtype="float32", requires_grad=True, device=device)
    out = fn(a, b)
    assert out.dtype == np.float64
    g = rng.standard_normal(out.shape)
    out.backward(g)
    assert a.grad.dtype == np.float64 and b.grad.dtype == np.float32
    ta = torch.tensor(a64, requires_grad=True)
    tb = torch.tensor(b.numpy().astype(np.float64), requires_grad=True)   # the float32 values, in float64
    tfn = {"mul": lambda a, b: a * b, "matmul": lambda a, b: a @ b,
           "linear": torch.nn.functional.linear, "add_broadcast": lambda a, b: a + b}[op]
    tfn(ta, tb).backward(torch.tensor(g))
    np.testing.assert_allclose(mt.backend.to_numpy(a.grad), ta.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mt.backend.to_numpy(b.grad), tb.grad.numpy().astype(np.float32), rtol=1e-6)
