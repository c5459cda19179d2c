"""The fused GPU kernels run on the CPU (``tests/kernel_emulator.py``: their CUDA C++ compiled by the
host's C++ compiler), through the same Python wrappers the GPU path calls, against their array twins.
This checks grids, argument lists, output layouts and arithmetic without a GPU; ``test_kernels.py``
checks the real thing (warp reductions, capture) on one.
"""
import os

import numpy as np
import pytest

import minitransformer as mt
from minitransformer import backend, kernels
from minitransformer import functional as F

from kernel_emulator import Emulator, stand_in_cupy

EMULATED = ("dropout_apply", "log_softmax_fwd", "log_softmax_bwd", "layer_norm_fwd", "layer_norm_bwd_dx", "layer_norm_bwd_dwdb",
            "add_norm_fwd", "add_norm_bwd", "masked_softmax_fwd", "softmax_bwd", "relu_fwd", "bias_relu_fwd", "relu_bwd",
            "cross_entropy_fwd", "cross_entropy_bwd", "embedding_bwd", "adam_step")
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


@pytest.fixture(scope="module")
def emulator():
    try:
        return Emulator(EMULATED)
    except RuntimeError as e:
        # CI always has a compiler (.ci/run installs one where there is none): there this fails;
        # elsewhere (e.g. a GPU machine without g++ and without a registry) it is skipped, saying why
        if os.environ.get("CI"):
            pytest.fail(f"the kernel emulator needs a C++ compiler: {e}")
        pytest.skip(f"no C++ compiler for the kernel emulator ({e}); `pip install ziglang` gives one")


@pytest.fixture
def emulated(emulator, monkeypatch):
    """``minitransformer.kernels`` calling the emulated kernels on NumPy arrays."""
    monkeypatch.setattr(backend, "cupy", stand_in_cupy)
    monkeypatch.setattr(kernels, "_kernel", emulator.kernel)
    return kernels


def array_grads(op, arrays, g):
    """Output and input gradients of ``op`` (a function of tensors) by the array path (CPU)."""
    tensors = [mt.tensor(a, requires_grad=True) for a in arrays]
    y = op(*tensors)
    y.backward(g)
    return y.numpy(), [t.grad for t in tensors]


def mask_of(emulated, shape, dtype, p, seed, offset):
    return emulated.dropout_mask(shape, dtype, p, seed, offset)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [1, 7, 64, 300])
def test_layer_norm_kernels_match_the_array_version(emulated, dtype, d, rng):
    x = rng.standard_normal((3, 5, d)).astype(dtype)
    w, b = rng.standard_normal(d).astype(dtype), rng.standard_normal(d).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    y, mean, rstd = emulated.layer_norm(x, w, b, 1e-5)
    dx, dw, db = emulated.layer_norm_backward(x, g, w, mean, rstd)
    y_ref, (dx_ref, dw_ref, db_ref) = array_grads(lambda a, c, e: F.layer_norm(a, c, e), [x, w, b], g)
    for ours, ref in [(y, y_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref)]:
        np.testing.assert_allclose(ours, ref, **TOL[dtype])


def test_the_emulator_refuses_a_scalar_of_another_type_than_its_parameter(emulator):
    """CuPy hands a NumPy scalar to a kernel as the bytes of its own dtype: an np.int32 for a
    ``long long`` would be garbage on a GPU, so the emulator refuses it (and a Python int)."""
    x, y = np.ones(8, np.float32), np.empty(8, np.float32)
    relu = emulator.kernel("relu_fwd", np.float32)
    relu((1,), (32,), (x, y, np.int64(8)))
    np.testing.assert_array_equal(y, x)
    for wrong in (np.int32(8), 8):
        with pytest.raises(TypeError, match="relu_fwd: n \\(long long\\) is passed as"):
            relu((1,), (32,), (x, y, wrong))


def test_dropout_kernel_draws_a_reproducible_mask(emulated):
    ones = np.ones(20000, np.float32)
    a = emulated.dropout_apply(ones, 0.3, seed=7, offset=100)
    assert set(np.unique(a)) <= {0.0, np.float32(1 / 0.7)}
    assert abs((a == 0).mean() - 0.3) < 0.02
    np.testing.assert_array_equal(a, emulated.dropout_apply(ones, 0.3, seed=7, offset=100))
    assert (a != emulated.dropout_apply(ones, 0.3, seed=7, offset=101)).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("affine", [True, False])
def test_add_and_norm_kernels_match_dropout_add_layer_norm(emulated, dtype, p, affine, rng):
    """z = x + s * m, y = LayerNorm(z); dz from LayerNorm's backward, ds = dz * m, and the column
    sums — with m the mask ``dropout_apply`` draws for the same (seed, offset)."""
    d, seed, offset = 48, 3, 1234
    x, s = (rng.standard_normal((4, 6, d)).astype(dtype) for _ in range(2))
    w, b = (rng.standard_normal(d).astype(dtype) for _ in range(2)) if affine else (None, None)
    g = rng.standard_normal(x.shape).astype(dtype)
    m = mask_of(emulated, s.shape, dtype, p, seed, offset) if p > 0 else np.ones_like(s)
    y, z, mean, rstd = emulated.add_and_norm(x, s, w, b, 1e-5, p, seed, offset)
    dz, ds, dw, db = emulated.add_and_norm_backward(z, g, w, mean, rstd, p, seed, offset,
                                                    need_weight_grads=affine)
    params = [w, b] if affine else []
    y_ref, grads = array_grads(lambda a, c, *wb: F.layer_norm(a + c * m, *(wb or (None, None))),
                               [x, s, *params], g)
    np.testing.assert_allclose(z, x + s * m, **TOL[dtype])
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    np.testing.assert_allclose(dz, grads[0], **TOL[dtype])
    np.testing.assert_allclose(ds, grads[1], **TOL[dtype])
    if affine:
        np.testing.assert_allclose(dw, grads[2], **TOL[dtype])
        np.testing.assert_allclose(db, grads[3], **TOL[dtype])
    else:
        assert dw is None and db is None
    if p == 0:
        assert ds is dz      # no mask: the sublayer's gradient is the residual's


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mask_shape", [None, (2, 1, 1, 9), (1, 1, 5, 9), (2, 3, 5, 9)])
def test_masked_softmax_kernels_match_the_array_version(emulated, dtype, mask_shape, rng):
    scores = rng.standard_normal((2, 3, 5, 9)).astype(dtype)
    mask = rng.random(mask_shape) > 0.3 if mask_shape else None
    if mask is not None:
        mask[..., 0, :] = False        # a row with no key left: all zeros
    P = emulated.masked_softmax(scores, mask, 0.5)
    dP = rng.standard_normal(P.shape).astype(dtype)
    dS = emulated.softmax_backward(P, dP, 0.5)
    s = scores * dtype(0.5)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    top = s.max(-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(top), top, 0))
    total = e.sum(-1, keepdims=True)
    P_ref = e / np.where(total > 0, total, 1)
    np.testing.assert_allclose(P, P_ref, **TOL[dtype])
    np.testing.assert_allclose(dS, P_ref * (dP - (dP * P_ref).sum(-1, keepdims=True)) * 0.5, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("Lk", [9, 300])
def test_attention_dropout_inside_the_softmax_kernels_is_dropout_apply(emulated, dtype, Lk, rng):
    """Dropout on the attention weights done by the softmax kernels (forward: P and P·m in one
    launch; backward: dP·m inside the softmax backward) gives bit for bit what dropout_apply's
    launch of its own gives, with the same (seed, offset)."""
    scores = rng.standard_normal((2, 3, 5, Lk)).astype(dtype)
    mask = rng.random((2, 1, 1, Lk)) > 0.3
    dP = rng.standard_normal(scores.shape).astype(dtype)
    P, P_tilde = emulated.masked_softmax_dropout(scores, mask, 0.5, 0.3, 11, 1000)
    np.testing.assert_array_equal(P, emulated.masked_softmax(scores, mask, 0.5))
    np.testing.assert_array_equal(P_tilde, emulated.dropout_apply(P, 0.3, 11, 1000))
    assert 0.1 < (P_tilde[P > 0] == 0).mean() < 0.5          # some dropped, most kept
    np.testing.assert_array_equal(emulated.softmax_backward(P, dP, 0.5, 0.3, 11, 1000),
                                  emulated.softmax_backward(P, emulated.dropout_apply(dP, 0.3, 11, 1000), 0.5))
    assert not np.array_equal(emulated.softmax_backward(P, dP, 0.5, 0.3, 12, 1000),
                              emulated.softmax_backward(P, dP, 0.5, 0.3, 11, 1000))


def test_attention_with_dropout_on_the_fused_path_passes_gradcheck(emulated, monkeypatch, rng):
    """The fused attention op with dropout (its mask drawn again in the backward) in float64:
    finite differences agree with its gradients, with the same mask at every evaluation."""
    gpu_code_path(monkeypatch)
    q, k, v = (mt.tensor(rng.standard_normal(s), requires_grad=True) for s in [(2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 3)])
    mask = mt.tensor(rng.random((2, 1, 1, 5)) > 0.2)
    mask.data[:, ..., 0] = True

    def attend(q, k, v):
        mt.manual_seed(5)
        out, _ = F.scaled_dot_product_attention(q, k, v, mask=mask, dropout_p=0.3, training=True)
        return out
    launched = []
    monkeypatch.setattr(kernels, "dropout_apply", lambda *a: launched.append(a))
    assert mt.gradcheck(attend, q, k, v)
    assert not launched                        # dropout took no launch of its own
    plain, _ = F.scaled_dot_product_attention(q, k, v, mask=mask)
    assert not np.allclose(attend(q, k, v).numpy(), plain.numpy())     # and it did drop weights


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 300)])
def test_log_softmax_kernels_match_the_array_version(emulated, dtype, shape, rng):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    y = emulated.log_softmax(x)
    dx = emulated.log_softmax_backward(y, g)
    y_ref, (dx_ref,) = array_grads(F.log_softmax, [x], g)
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    np.testing.assert_allclose(dx, dx_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_relu_on_the_fused_path_matches_relu_of_linear(emulated, monkeypatch, dtype, bias, rng):
    """linear_relu's GPU path (bias and ReLU in one kernel, the ReLU backward kernel) against
    relu(linear(·)) on the array path: output and every gradient."""
    arrays = [rng.standard_normal((3, 5, 7)), rng.standard_normal((11, 7))] + ([rng.standard_normal(11)] if bias else [])
    arrays = [a.astype(dtype) for a in arrays]
    g = rng.standard_normal((3, 5, 11)).astype(dtype)
    out, grads = array_grads(lambda *t: F.relu(F.linear(*t)), arrays, g)
    gpu_code_path(monkeypatch)
    tensors = [mt.tensor(a, requires_grad=True) for a in arrays]
    y = F.linear_relu(*tensors)
    y.backward(g)
    np.testing.assert_allclose(y.numpy(), out, **TOL[dtype])
    for t, ref in zip(tensors, grads):
        np.testing.assert_allclose(t.grad, ref, **TOL[dtype])


def test_linear_relu_of_mixed_dtypes_takes_the_array_path(emulated, monkeypatch, rng):
    """float64 input, float32 weight and bias: the product is float64, and the bias kernel would read
    the float32 bias as doubles; the op promotes as the array path does instead."""
    x, w, b = rng.standard_normal((3, 7)), rng.standard_normal((11, 7)), rng.standard_normal(11)
    ref = np.maximum(x @ w.astype(np.float32).T.astype(np.float64) + b.astype(np.float32), 0)
    gpu_code_path(monkeypatch)
    y = F.linear_relu(mt.tensor(x, dtype="float64"), mt.tensor(w, dtype="float32"), mt.tensor(b, dtype="float32"))
    assert y.dtype == np.float64
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-6)


def test_relu_kernels_match_the_array_version(emulated, rng):
    x = rng.standard_normal((7, 33)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    y = emulated.relu(x)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    np.testing.assert_array_equal(emulated.relu_backward(y, g), g * (x > 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_kernels_match_the_formula(emulated, dtype, label_smoothing, rng):
    N, C = 9, 1500
    x = (rng.standard_normal((N, C)) * 4).astype(dtype)
    t = rng.integers(0, C, size=N)
    row_scale = rng.uniform(0.5, 2.0, size=N).astype(dtype)
    loss_row, lse = emulated.cross_entropy(x, t, label_smoothing)
    dx = emulated.cross_entropy_backward(x, t, lse, row_scale, label_smoothing)
    x64 = x.astype(np.float64)
    lse_ref = np.log(np.exp(x64 - x64.max(1, keepdims=True)).sum(1)) + x64.max(1)
    x_t = x64[np.arange(N), t]
    eps = label_smoothing
    np.testing.assert_allclose(lse, lse_ref, **TOL[dtype])
    np.testing.assert_allclose(loss_row, (1 - eps) * (lse_ref - x_t) + eps * (lse_ref - x64.mean(1)), **TOL[dtype])
    onehot = np.eye(C)[t]
    dx_ref = (np.exp(x64 - lse_ref[:, None]) - eps / C - (1 - eps) * onehot) * row_scale[:, None]
    np.testing.assert_allclose(dx, dx_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_embedding_backward_kernel_adds_repeated_ids(emulated, dtype, rng):
    ids = rng.integers(0, 12, size=(4, 9))
    ids[0, :4] = 3                                    # one id many times
    g = rng.standard_normal((4, 9, 130)).astype(dtype)  # d over one block of 128 threads
    dW = emulated.embedding_backward(ids, g, 15)
    ref = np.zeros((15, 130))
    np.add.at(ref, ids.reshape(-1), g.reshape(-1, 130).astype(np.float64))
    np.testing.assert_allclose(dW, ref, **TOL[dtype])


def gpu_code_path(monkeypatch):
    """From here on, ops on NumPy float arrays take their fused (GPU) branch, with the emulated
    kernels; matrix products stay NumPy's (cuBLAS is not emulated)."""
    monkeypatch.setattr(backend, "fused", lambda *arrays: all(a.dtype in (np.float32, np.float64) for a in arrays))
    monkeypatch.setattr(kernels, "batched_matmul", lambda a, b, out=None: np.matmul(a, b, out=out))
    monkeypatch.setattr(kernels, "column_sum", lambda g: g.sum(axis=0))


def shifted_model(**overrides):
    """A small Transformer whose parameters are all moved off their initial values (LayerNorm's
    γ ≠ 1, β ≠ 0, biases ≠ 0), the same for the same arguments."""
    mt.manual_seed(1)
    model = mt.nn.Transformer(**dict(dict(vocab_size=40, d_model=32, num_heads=4, num_layers=2, d_ff=64,
                                          dropout=0.0), **overrides))
    shift = np.random.default_rng(2)
    for p in model.parameters():
        p.data[...] += (0.2 * shift.standard_normal(p.shape)).astype(p.dtype)
    return model


@pytest.mark.parametrize("fixed_cache", [False, True])
def test_beam_search_takes_the_fused_path_to_the_same_hypotheses(emulated, monkeypatch, fixed_cache, rng):
    """Decoding through the GPU code path (log-softmax kernel, fused attention over the growing or
    fixed-size cache, one product for Q, K, V) finds the array path's hypotheses and scores. The
    candidates are picked by the host top-k: the GPU's top-k kernels are not emulated."""
    from minitransformer.decode import beam_search
    src = rng.integers(4, 40, size=(5, 7))
    src[1, 4:] = 0
    model = shifted_model()
    model.eval()
    expected = beam_search(model, src, 1, 2, 4, max_len_b=10, fixed_cache=fixed_cache, return_scores=True)
    gpu_code_path(monkeypatch)
    monkeypatch.setattr(kernels, "TOPK_MAX", 0)
    launched = set()
    emulated_kernel = kernels._kernel
    monkeypatch.setattr(kernels, "_kernel", lambda name, dtype: launched.add(name) or emulated_kernel(name, dtype))
    got = beam_search(model, src, 1, 2, 4, max_len_b=10, fixed_cache=fixed_cache, return_scores=True)
    assert {"log_softmax_fwd", "masked_softmax_fwd", "add_norm_fwd"} <= launched
    assert got[0] == expected[0]
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_a_whole_transformer_takes_the_fused_path_to_the_same_logits_and_gradients(
        emulated, monkeypatch, dtype, norm_first, rng):
    """The model's GPU code path — fused attention, Add & Norm, LayerNorm, ReLU, cross-entropy, the
    embedding backward, Q, K, V by one product — run on the CPU with the emulated kernels (the
    matrix products by NumPy), against the array path: the same loss, logits and gradients."""
    src = rng.integers(4, 40, size=(3, 9))
    tgt = rng.integers(4, 40, size=(3, 7))
    src[0, 6:] = 0
    tgt[1, 5:] = 0
    out, launched = [], set()
    emulated_kernel = kernels._kernel

    def recording(name, dtype):
        launched.add(name)
        return emulated_kernel(name, dtype)
    for path in ("array", "fused"):
        with monkeypatch.context() as m:
            if path == "fused":
                m.setattr(kernels, "_kernel", recording)
                gpu_code_path(m)
            previous = mt.get_default_dtype()
            mt.set_default_dtype(dtype)
            try:
                model = shifted_model(norm_first=norm_first)
                logits = model(src, tgt)
                loss = F.cross_entropy(logits.reshape(-1, 40), tgt.reshape(-1), ignore_index=0,
                                       label_smoothing=0.1)
                loss.backward()
            finally:
                mt.set_default_dtype(previous)
            out.append((loss.item(), logits.numpy(), {n: p.grad for n, p in model.named_parameters()}))
    expected = {"masked_softmax_fwd", "softmax_bwd", "bias_relu_fwd", "relu_bwd", "cross_entropy_fwd",
                "cross_entropy_bwd", "embedding_bwd", "layer_norm_bwd_dwdb"}
    expected |= {"layer_norm_fwd", "layer_norm_bwd_dx"} if norm_first else {"add_norm_fwd", "add_norm_bwd"}
    assert expected <= launched, expected - launched
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(out[1][0], out[0][0], **tol)
    np.testing.assert_allclose(out[1][1], out[0][1], **tol)
    for name, g in out[0][2].items():
        np.testing.assert_allclose(out[1][2][name], g, err_msg=name, **tol)


def test_a_whole_transformer_with_dropout_draws_the_same_masks_with_attention_dropout_in_the_softmax(
        emulated, monkeypatch, rng):
    """Dropout 0.3 everywhere, two training steps through the GPU code path: with the attention
    weights' dropout inside the softmax kernels (as now) and as its own dropout_apply launches (as
    before) the counter-based masks are the same, so the losses and every gradient agree."""
    from minitransformer.optim import Adam
    src = rng.integers(4, 40, size=(3, 9))
    tgt = rng.integers(4, 40, size=(3, 7))
    src[0, 6:] = 0

    def separate_softmax_dropout(scores, mask, scale, p, seed, offset):
        P = emulated.masked_softmax(scores, mask, scale)
        return P, emulated.dropout_apply(P, p, seed, offset)
    softmax_backward = emulated.softmax_backward

    def separate_softmax_backward(P, dP, scale=1.0, p=0.0, seed=0, offset=0):
        return softmax_backward(P, emulated.dropout_apply(dP, p, seed, offset) if p > 0 else dP, scale)
    runs = []
    for separate in (False, True):
        with monkeypatch.context() as m:
            gpu_code_path(m)
            if separate:
                m.setattr(kernels, "masked_softmax_dropout", separate_softmax_dropout)
                m.setattr(kernels, "softmax_backward", separate_softmax_backward)
            model = shifted_model(dropout=0.3)
            model.train()
            opt = Adam(model.parameters(), lr=1e-3)
            mt.manual_seed(9)
            losses = []
            for _ in range(2):
                opt.zero_grad()
                logits = model(src, tgt)
                loss = F.cross_entropy(logits.reshape(-1, 40), tgt.reshape(-1), ignore_index=0)
                loss.backward()
                grads = {n: p.grad.copy() for n, p in model.named_parameters()}
                opt.step()
                losses.append(loss.item())
            runs.append((losses, grads))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-6)
    for name, g in runs[1][1].items():
        np.testing.assert_allclose(runs[0][1][name], g, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_kernel_updates_every_parameter_as_the_array_version(emulated, dtype, rng):
    """One launch over tensors of several sizes (one over a 65,536-element chunk) after a few
    steps: parameters and both moments equal the array version's."""
    from minitransformer.nn.module import Parameter
    from minitransformer.optim import Adam
    shapes = [(7,), (300, 250), (30, 40)]
    start = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ref = [Parameter(a.copy()) for a in start]
    opt = Adam(ref, lr=0.01)
    params = [a.copy() for a in start]
    ms, vs = [np.zeros_like(a) for a in start], [np.zeros_like(a) for a in start]
    emulated._chunk_table.cache_clear()      # its tables are NumPy arrays here: keep them from GPU runs
    try:
        for _ in range(3):
            grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
            for p, g in zip(ref, grads):
                p.grad = g
            opt.step()                                          # the array version (NumPy arrays)
            step_size, sqrt_correction2 = opt.corrections()
            emulated.adam_step(params, grads, ms, vs, *opt.betas, step_size, sqrt_correction2, opt.eps)
    finally:
        emulated._chunk_table.cache_clear()
    for i in range(len(shapes)):
        np.testing.assert_allclose(params[i], ref[i].data, **TOL[dtype])
        np.testing.assert_allclose(ms[i], opt.m[i], **TOL[dtype])
        np.testing.assert_allclose(vs[i], opt.v[i], **TOL[dtype])


def test_adam_keeps_its_plan_of_which_parameters_the_kernel_updates_until_an_array_changes(
        emulated, monkeypatch, rng):
    """Adam works out once which parameters the one-launch kernel may update and checks only the
    gradients each step; a parameter array replaced by a Fortran-ordered one (which the kernel
    would misread) sends that parameter back to the array version. Against a plain array Adam."""
    from minitransformer.nn.module import Parameter
    from minitransformer.optim import Adam
    calls = []

    def counting_fused(*arrays):
        calls.append(len(arrays))
        return all(a.dtype in (np.float32, np.float64) for a in arrays)
    shapes = [(5, 3), (4,), (6, 2)]
    start = [rng.standard_normal(s) for s in shapes]
    mine, ref = [Parameter(a.copy()) for a in start], [Parameter(a.copy()) for a in start]
    opt, ref_opt = Adam(mine, lr=0.01), Adam(ref, lr=0.01)
    launched, adam_step = [], kernels.adam_step      # parameters per kernel launch
    emulated._chunk_table.cache_clear()
    try:
        for step in range(4):
            grads = [rng.standard_normal(s) for s in shapes]
            grads[0] = np.asfortranarray(grads[0]) if step == 1 else grads[0]   # this step: array version
            for p, q, g in zip(mine, ref, grads):
                p.grad, q.grad = g, np.ascontiguousarray(g).copy()
            if step == 2:
                mine[2].grad = ref[2].grad = None                                 # skipped
            if step == 3:
                mine[2].data = np.asfortranarray(mine[2].data)                   # replaced
            calls.clear()
            with monkeypatch.context() as m:
                m.setattr(backend, "fused", counting_fused)
                m.setattr(kernels, "adam_step", lambda params, *rest: (launched.append(len(params)),
                                                                       adam_step(params, *rest)))
                opt.step()
            ref_opt.step()
            assert len(calls) == (1 + len(shapes) if step in (0, 3) else 1), (step, calls)
            assert launched[-1] == (3 if step == 0 else 2), (step, launched)
            for p, q in zip(mine, ref):
                np.testing.assert_allclose(p.data, q.data, rtol=1e-12, atol=1e-15)
    finally:
        emulated._chunk_table.cache_clear()


def test_one_product_for_q_k_v_makes_fewer_launches(emulator):
    """benchmarks/launch_count.py counts a training step's GPU launches on the CPU (emulated kernels,
    every array op counted as CuPy would launch it); Q, K, V by one product must make fewer."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "launch_count.py"
    totals = {}
    for variant in ([], ["--three-products"]):
        run = subprocess.run([sys.executable, str(script), "--config", "micro", *variant],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        totals[bool(variant)] = int(re.search(r"(\d+) launches a training step", run.stdout).group(1))
    assert totals[False] < totals[True], totals
