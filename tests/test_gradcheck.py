"""gradcheck itself: it passes correct ops, catches a wrong backward and says where, and refuses
inputs it cannot check."""
import re

import numpy as np
import pytest

import minitransformer as mt
from minitransformer import functional as F
from minitransformer.tensor import make_op

REPORT = re.compile(r"gradcheck failed for (?P<op>\w+): input (?P<input>\d+) \(shape (?P<shape>[^)]*\))\) "
                    r"at index (?P<index>\([^)]*\)): analytic (?P<analytic>\S+) vs numeric (?P<numeric>\S+) "
                    r".*; (?P<bad>\d+) of (?P<size>\d+) elements disagree")


def mul_wrong_at(a, b, where, factor):
    """``a * b`` whose backward for ``b`` is off by ``factor`` at one element."""
    def backward(g):
        db = g * a.data
        db[where] *= factor
        return g * b.data, db
    return make_op(a.data * b.data, (a, b), backward, "mul_wrong_at")


def test_passes_correct_ops(device, randn):
    x, w, b = randn(3, 4), randn(5, 4), randn(5)
    assert mt.gradcheck(lambda x, w, b: F.tanh(F.linear(x, w, b)) * x.sum(), x, w, b) is True
    assert mt.gradcheck(lambda x: F.log_softmax(x * x, axis=0), x) is True


def test_tuple_output_checks_the_first_item(device, randn):
    q, k, v = randn(2, 3, 4), randn(2, 3, 4), randn(2, 3, 2)
    assert mt.gradcheck(F.scaled_dot_product_attention, q, k, v)


def test_constant_inputs_are_left_alone(device, randn):
    a, c = randn(3), randn(3, requires_grad=False)
    assert mt.gradcheck(lambda a, c: a * c + c, a, c)
    assert c.grad is None


def test_inputs_are_restored(device, randn):
    x = randn(4, 3)
    before = x.numpy().copy()
    mt.gradcheck(lambda x: x.exp().sum(axis=1), x)
    np.testing.assert_array_equal(x.numpy(), before)


@pytest.mark.parametrize("where, factor", [((1, 2), 3.0), ((0, 0), -1.0), ((2, 3), 1.5)])
def test_wrong_backward_is_caught_and_located(where, factor, device, randn):
    a, const, b = randn(3, 4), randn(3, 4, requires_grad=False), randn(3, 4)

    def fn(a, const, b):
        return mul_wrong_at(a, b, where, factor) + const
    # a's gradient is right, b's (input 2: the constant in between still counts) is wrong at `where`
    with pytest.raises(mt.GradcheckError) as info:
        mt.gradcheck(fn, a, const, b)
    message = str(info.value)
    found = REPORT.search(message)
    assert found, message
    assert found["op"] == "add"                       # the op that made fn's output
    assert found["input"] == "2" and found["shape"] == "(3, 4)"
    assert found["index"] == str(where)
    assert (found["bad"], found["size"]) == ("1", "12")
    analytic, numeric = float(found["analytic"]), float(found["numeric"])
    assert analytic == pytest.approx(factor * numeric, rel=1e-6)
    assert numeric != 0


def test_wrong_backward_of_a_single_op_names_it(device, randn):
    x = randn(5)

    def cube_wrong(x):   # y = x³ with the derivative of x² instead of 3x²
        return make_op(x.data ** 3, (x,), lambda g: (g * 2 * x.data,), "cube_wrong")
    with pytest.raises(mt.GradcheckError, match=r"cube_wrong: input 0 \(shape \(5,\)\)") as info:
        mt.gradcheck(cube_wrong, x)
    found = REPORT.search(str(info.value))
    i = int(found["index"].strip("(),"))
    xi = x.numpy()[i]
    # both numbers are the same projection r_i of their derivative: their ratio is 2x / 3x²
    assert float(found["analytic"]) / float(found["numeric"]) == pytest.approx(2 / (3 * xi), rel=1e-5)


def test_gradcheck_error_is_an_assertion_error():
    assert issubclass(mt.GradcheckError, AssertionError)


def test_rejects_float32(device, randn):
    with pytest.raises(TypeError, match="float64.*float32"):
        mt.gradcheck(F.tanh, randn(3, dtype="float32"))


def test_rejects_inputs_without_grad(device, randn):
    with pytest.raises(ValueError, match="requires_grad"):
        mt.gradcheck(F.tanh, randn(3, requires_grad=False))
    with pytest.raises(ValueError, match="requires_grad"):
        mt.gradcheck(lambda x: x * 2.0, np.ones(3))
