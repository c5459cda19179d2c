"""The fused GPU kernels (minitransformer/kernels) against their array twins, on the GPU.

Every test runs the same op twice on CuPy arrays, with the fused kernels off (the array formulas of
functional/) and on, and compares outputs and gradients: float64 to 1e-12, float32 to float32
rounding. Dropout's mask is compared with the one the kernel says it drew. These tests need a GPU
and CuPy (elsewhere the fused kernels are never used, and the module is skipped as a whole).
"""
import contextlib

import numpy as np
import pytest

import minitransformer as mt
from minitransformer import backend, kernels
from minitransformer import functional as F
from minitransformer.optim import Adam

pytestmark = pytest.mark.skipif(not mt.cuda_is_available(), reason="needs a GPU and CuPy")

TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=2e-5, atol=2e-6)}


@contextlib.contextmanager
def fused(enabled):
    previous = backend.set_fused(enabled)
    try:
        yield
    finally:
        backend.set_fused(previous)


def run_both(fn, arrays, dtype, grad_seed=0):
    """``fn(*tensors)`` with fused kernels off and on: (output, grads) of each, as NumPy arrays."""
    results = []
    for enabled in (False, True):
        with fused(enabled):
            tensors = [mt.tensor(a, dtype=dtype if a.dtype.kind == "f" else None, device="cuda",
                                 requires_grad=a.dtype.kind == "f") for a in arrays]
            out = fn(*tensors)
            if isinstance(out, tuple):
                out = out[0]
            g = np.random.default_rng(grad_seed).standard_normal(out.shape)
            out.backward(mt.tensor(g, dtype=dtype, device="cuda") if out.ndim else None)
            results.append((out.numpy(), [backend.to_numpy(t.grad) if t.grad is not None else None
                                          for t in tensors]))
    return results


def assert_same(results, dtype):
    (out0, grads0), (out1, grads1) = results
    np.testing.assert_allclose(out1, out0, **TOL[dtype])
    for g0, g1 in zip(grads0, grads1):
        if g0 is None:
            assert g1 is None
        else:
            np.testing.assert_allclose(g1, g0, **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape, mask_kind", [((2, 3, 5, 7), "padding"), ((2, 3, 6, 6), "causal"),
                                              ((2, 4, 9), "full"), ((1, 2, 3, 1500), "padding"),
                                              ((3, 2, 4, 4), None), ((2, 1, 5, 8), "one_key")])
def test_masked_softmax_attention_matches_the_array_version(rng, dtype, shape, mask_kind):
    *lead, Lq, Lk = shape
    d_k = 8
    q, k, v = (rng.standard_normal((*lead, L, d_k)) for L in (Lq, Lk, Lk))
    if mask_kind == "padding":      # (B, 1, 1, Lk): the last keys of each sequence are padding
        lengths = rng.integers(1, Lk + 1, size=shape[0])
        mask = (np.arange(Lk)[None, :] < lengths[:, None]).reshape(shape[0], *([1] * (len(shape) - 2)), Lk)
    elif mask_kind == "causal":
        mask = np.tril(np.ones((Lq, Lk), dtype=bool))
    elif mask_kind == "full":
        mask = rng.random(shape) < 0.6
        mask[0, 0, :] = False          # a query that sees nothing: its output and weights are 0
    elif mask_kind == "one_key":
        mask = np.zeros(shape, dtype=bool)
        mask[..., 0] = True            # every query sees exactly one key
    else:
        mask = None
    results = run_both(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, None if mask is None else mt.tensor(mask, device="cuda")), [q, k, v], dtype)
    assert_same(results, dtype)
    with fused(True):
        _, P = F.scaled_dot_product_attention(*(mt.tensor(a, dtype=dtype, device="cuda") for a in (q, k, v)),
                                              None if mask is None else mt.tensor(mask, device="cuda"))
    with fused(False):
        _, P_ref = F.scaled_dot_product_attention(*(mt.tensor(a, dtype=dtype, device="cuda") for a in (q, k, v)),
                                                  None if mask is None else mt.tensor(mask, device="cuda"))
    np.testing.assert_allclose(P.numpy(), P_ref.numpy(), **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 33), (2, 1, 2, 3, 2000)])
def test_softmax_matches_the_array_version(rng, dtype, shape):
    assert_same(run_both(lambda x: F.softmax(x * 3.0), [rng.standard_normal(shape)], dtype), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 33), (2, 1, 2, 3, 2000), (4, 37000)])
def test_log_softmax_matches_the_array_version(rng, dtype, shape):
    assert_same(run_both(lambda x: F.log_softmax(x * 3.0), [rng.standard_normal(shape)], dtype), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(4, 1), (3, 7), (2, 5, 64), (9, 512), (3, 1000), (2, 2048)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm_matches_the_array_version(rng, dtype, shape, affine):
    d = shape[-1]
    x = rng.standard_normal(shape) * 3 + 1
    w, b = rng.standard_normal(d), rng.standard_normal(d)
    if affine == "both":
        results = run_both(lambda x, w, b: F.layer_norm(x, w, b), [x, w, b], dtype)
    elif affine == "weight":
        results = run_both(lambda x, w: F.layer_norm(x, w, None), [x, w], dtype)
    else:
        results = run_both(lambda x: F.layer_norm(x, None, None), [x], dtype)
    assert_same(results, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(4, 1), (3, 7), (2, 5, 64), (9, 512), (3, 1000)])
@pytest.mark.parametrize("affine", [True, False])
def test_add_and_norm_matches_the_array_version(rng, dtype, shape, affine):
    x, s = rng.standard_normal(shape) * 3 + 1, rng.standard_normal(shape)
    if affine:
        w, b = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
        results = run_both(lambda x, s, w, b: F.add_and_norm(x, s, w, b), [x, s, w, b], dtype)
    else:
        results = run_both(lambda x, s: F.add_and_norm(x, s, None, None), [x, s], dtype)
    assert_same(results, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_add_and_norm_with_dropout_is_dropout_add_layer_norm_on_the_gpu(rng, dtype):
    """One kernel draws the same mask F.dropout's kernel draws from the same stream position."""
    x, s, g = (rng.standard_normal((6, 33, 80)) for _ in range(3))
    w, b = rng.standard_normal(80), rng.standard_normal(80)
    results = []
    with fused(True):
        state = backend.random_state()
        for one_op in (True, False):
            backend.set_random_state(state)
            ts = [mt.tensor(a, dtype=dtype, device="cuda", requires_grad=True) for a in (x, s, w, b)]
            y = (F.add_and_norm(*ts, dropout_p=0.3, training=True) if one_op
                 else F.layer_norm(ts[0] + F.dropout(ts[1], 0.3), ts[2], ts[3]))
            y.backward(mt.tensor(g, dtype=dtype, device="cuda"))
            results.append((y.numpy(), [backend.to_numpy(t.grad) for t in ts]))
    assert_same(results, dtype)
    assert abs((results[0][1][1] == 0).mean() - 0.3) < 0.02         # ds carries the mask


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("Lk", [9, 1500])
def test_attention_dropout_inside_the_softmax_kernels_is_dropout_apply_on_the_gpu(rng, dtype, Lk):
    """The softmax kernels' own dropout (P·m in the forward, dP·m in the backward) equals, bit for
    bit, dropout_apply's launch with the same (seed, offset); and the op with dropout draws it."""
    cp = backend.cupy()
    scores = cp.asarray(rng.standard_normal((2, 3, 5, Lk)), dtype=dtype)
    mask = cp.asarray(rng.random((2, 1, 1, Lk)) > 0.3)
    dP = cp.asarray(rng.standard_normal(scores.shape), dtype=dtype)
    P, P_tilde = kernels.masked_softmax_dropout(scores, mask, 0.5, 0.3, 11, 1000)
    np.testing.assert_array_equal(cp.asnumpy(P), cp.asnumpy(kernels.masked_softmax(scores, mask, 0.5)))
    np.testing.assert_array_equal(cp.asnumpy(P_tilde), cp.asnumpy(kernels.dropout_apply(P, 0.3, 11, 1000)))
    np.testing.assert_array_equal(
        cp.asnumpy(kernels.softmax_backward(P, dP, 0.5, 0.3, 11, 1000)),
        cp.asnumpy(kernels.softmax_backward(P, kernels.dropout_apply(dP, 0.3, 11, 1000), 0.5)))
    q, k, v = (mt.tensor(rng.standard_normal(sh), dtype=dtype, device="cuda") for sh in [(4, 2, 30, 8)] * 3)
    with fused(True):
        out, weights = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, training=True)
    dropped = cp.asnumpy(out.data) - cp.asnumpy(weights.data) @ cp.asnumpy(v.data)
    assert np.abs(dropped).max() > 1e-3                               # the output saw the dropout


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("N, C", [(5, 3), (64, 37000), (7, 1500), (300, 8000)])
@pytest.mark.parametrize("label_smoothing, ignore", [(0.0, None), (0.1, 0), (0.1, None)])
def test_cross_entropy_matches_the_array_version(rng, dtype, N, C, label_smoothing, ignore):
    logits = rng.standard_normal((N, C)) * 4
    target = rng.integers(0, C, size=N)
    if ignore is not None:
        target[rng.random(N) < 0.3] = ignore
    results = run_both(lambda z: F.cross_entropy(z, target, ignore_index=ignore, label_smoothing=label_smoothing) * 3.0,
                       [logits], dtype)   # * 3: an upstream gradient other than 1
    assert_same(results, dtype)


def test_cross_entropy_with_every_target_ignored_is_zero_on_the_gpu():
    logits = mt.tensor(np.random.default_rng(0).standard_normal((4, 6)), device="cuda", requires_grad=True)
    with fused(True):
        loss = F.cross_entropy(logits, [0, 0, 0, 0], ignore_index=0)
        loss.backward()
    assert loss.item() == 0.0
    assert not np.any(backend.to_numpy(logits.grad))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dropout_multiplies_by_the_mask_it_drew_and_reuses_it_in_the_backward(rng, dtype):
    x = rng.standard_normal((64, 257))
    g = rng.standard_normal((64, 257))
    p = 0.3
    with fused(True):
        state = backend.random_state()
        t = mt.tensor(x, dtype=dtype, device="cuda", requires_grad=True)
        y = F.dropout(t, p)
        y.backward(mt.tensor(g, dtype=dtype, device="cuda"))
    m = backend.to_numpy(kernels.dropout_mask(x.shape, np.dtype(dtype), p, state["seed"], state["counter"]))
    assert set(np.unique(m)) <= {0.0, np.dtype(dtype).type(1 / (1 - p))}
    assert abs((m == 0).mean() - p) < 0.02                       # 16k draws: 5 standard deviations
    np.testing.assert_array_equal(y.numpy(), (x.astype(dtype) * m))
    np.testing.assert_array_equal(backend.to_numpy(t.grad), g.astype(dtype) * m)


def test_dropout_streams_are_reproducible_and_restored_from_random_state():
    x = mt.tensor(np.ones((1000,)), device="cuda")
    with fused(True):
        mt.manual_seed(3)
        first = [F.dropout(x, 0.5).numpy() for _ in range(2)]
        assert not np.array_equal(first[0], first[1])             # consecutive calls draw new masks
        mt.manual_seed(3)
        again = F.dropout(x, 0.5).numpy()
        state = backend.random_state()                            # as a checkpoint would keep it
        after = F.dropout(x, 0.5).numpy()
        mt.manual_seed(99)
        backend.set_random_state(state)                           # as a resume would restore it
        resumed = F.dropout(x, 0.5).numpy()
    np.testing.assert_array_equal(again, first[0])
    np.testing.assert_array_equal(resumed, after)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_embedding_backward_matches_the_array_version_with_repeated_ids(rng, dtype):
    W = rng.standard_normal((50, 24))
    ids = rng.integers(0, 50, size=(8, 30))
    ids[:, :5] = 7                                     # a row used 40 times
    assert_same(run_both(lambda w: F.embedding(ids, w), [W], dtype), dtype)


def test_embedding_backward_is_deterministic(rng):
    """Sorted runs instead of atomic adds: the same gradient bit for bit, however many repeats."""
    cp = backend.cupy()
    ids = rng.integers(0, 5, size=4096)                    # ~800 uses of each row
    g = cp.asarray(rng.standard_normal((4096, 64)), dtype=cp.float32)
    first = cp.asnumpy(kernels.embedding_backward(ids, g, 5))
    for device_ids in (ids, cp.asarray(ids)):
        np.testing.assert_array_equal(cp.asnumpy(kernels.embedding_backward(device_ids, g, 5)), first)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adam_in_one_launch_equals_the_array_version(rng, dtype):
    shapes = [(300, 257), (65536 + 3,), (5,), (1,), (40, 40)]       # one spans two chunks
    start = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(4)]
    finals = []
    for enabled in (False, True):
        with fused(enabled):
            params = [mt.nn.Parameter(mt.tensor(a, dtype=dtype, device="cuda").data) for a in start]
            opt = Adam(params, lr=1e-2)
            for step_grads in grads:
                for i, (p, g) in enumerate(zip(params, step_grads)):
                    p.grad = None if i == 3 else backend.to_device(g.astype(dtype), "cuda")   # one without grad
                opt.step()
            finals.append([p.numpy() for p in params] + [backend.to_numpy(m) for m in opt.m + opt.v])
    for a, b in zip(*finals):
        np.testing.assert_allclose(b, a, rtol=1e-6 if dtype == "float32" else 1e-14, atol=0)
    np.testing.assert_array_equal(finals[1][3], start[3].astype(dtype))   # no grad: untouched


def test_a_whole_transformer_gives_the_same_logits_and_gradients_with_and_without_fused_kernels(rng):
    src = rng.integers(4, 40, size=(3, 9))
    tgt = rng.integers(4, 40, size=(3, 7))
    src[0, 6:] = 0
    tgt[1, 5:] = 0
    out = []
    for enabled in (False, True):
        with fused(enabled):
            mt.manual_seed(1)
            model = mt.nn.Transformer(vocab_size=40, d_model=32, num_heads=4, num_layers=2, d_ff=64,
                                      dropout=0.0).to("cuda")
            logits = model(src, tgt)
            F.cross_entropy(logits.reshape(-1, 40), tgt.reshape(-1), ignore_index=0, label_smoothing=0.1).backward()
            out.append((logits.numpy(), {n: backend.to_numpy(p.grad) for n, p in model.named_parameters()}))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-4, atol=1e-5)
    for name, g in out[0][1].items():
        np.testing.assert_allclose(out[1][1][name], g, rtol=1e-3, atol=1e-5, err_msg=name)


def test_a_training_step_never_waits_for_the_gpu():
    """No host↔device synchronisation inside ``train_step``: CuPy raises if anything in it syncs."""
    import cupyx
    from minitransformer.data import collate
    from minitransformer.optim import NoamSchedule
    from minitransformer.train import train_step
    mt.manual_seed(0)
    model = mt.nn.Transformer(vocab_size=30, d_model=32, num_heads=4, num_layers=2, d_ff=64, dropout=0.1).to("cuda")
    opt = Adam(model.parameters(), lr=0.0)
    schedule = NoamSchedule(opt, 32, warmup_steps=10)
    batch = collate([[5, 6, 7, 8], [9, 10]], [[8, 7, 6, 5], [10, 9]])
    train_step(model, opt, schedule, batch)          # first step: kernels compile, buffers appear
    with cupyx.allow_synchronize(False):
        for _ in range(3):
            loss = train_step(model, opt, schedule, batch)
    assert np.isfinite(float(loss))


def test_tf32_is_one_switch_and_off_by_default():
    cp = backend.cupy()
    a64 = np.random.default_rng(0).standard_normal((512, 512))
    ref = a64 @ a64
    errors = {}
    for enabled in (False, True):
        backend.set_tf32(enabled)
        try:
            a = cp.asarray(a64, dtype=cp.float32)
            errors[enabled] = np.linalg.norm(cp.asnumpy(a @ a) - ref) / np.linalg.norm(ref)
        finally:
            backend.set_tf32(False)
    assert errors[False] < 1e-5, errors          # fp32 products
    assert errors[True] > 3e-5, errors           # TF32's 10-bit mantissa shows


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("a_t, b_t", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("lead", [(3,), (2, 3)])
def test_batched_matmul_reads_transposed_operands_in_place(rng, dtype, a_t, b_t, lead):
    cp = backend.cupy()
    m, k, n = 5, 7, 3
    a = cp.asarray(rng.standard_normal((*lead, k, m) if a_t else (*lead, m, k)), dtype=dtype)
    b = cp.asarray(rng.standard_normal((*lead, n, k) if b_t else (*lead, k, n)), dtype=dtype)
    a = a.swapaxes(-1, -2) if a_t else a
    b = b.swapaxes(-1, -2) if b_t else b
    expected = cp.asnumpy(a).astype(np.float64) @ cp.asnumpy(b).astype(np.float64)
    np.testing.assert_allclose(cp.asnumpy(kernels.batched_matmul(a, b)), expected, **TOL[dtype])


@pytest.mark.parametrize("a_t", [False, True])
def test_batched_matmul_writes_into_a_part_of_a_bigger_array(rng, a_t):
    """``out=`` (attention's dQ, dK, dV written into one array): the product lands in that part,
    the rest is untouched; a broadcast product (the fallback) too; a wrong shape is refused."""
    cp = backend.cupy()
    a = cp.asarray(rng.standard_normal((2, 3, 5, 4) if a_t else (2, 3, 4, 5)))
    a = a.swapaxes(-1, -2) if a_t else a
    b = cp.asarray(rng.standard_normal((2, 3, 5, 6)))
    whole = cp.full((3, 2, 3, 4, 6), 7.0)
    kernels.batched_matmul(a, b, out=whole[1])
    np.testing.assert_allclose(cp.asnumpy(whole[1]), cp.asnumpy(a) @ cp.asnumpy(b), rtol=1e-12)
    assert (cp.asnumpy(whole[0]) == 7.0).all() and (cp.asnumpy(whole[2]) == 7.0).all()
    kernels.batched_matmul(a, b[:1], out=whole[2])                  # broadcast batch: CuPy's matmul
    np.testing.assert_allclose(cp.asnumpy(whole[2]), cp.asnumpy(a) @ cp.asnumpy(b[:1]), rtol=1e-12)
    with pytest.raises(ValueError, match="out has shape"):
        kernels.batched_matmul(a, b, out=whole[0].reshape(2, 3, 6, 4))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_own_handle_products_and_bias_sums_match_cupys(rng, dtype, monkeypatch):
    """kernels.OWN_HANDLE (2-D products and GEMVs on our own cuBLAS handle, an A/B switch): the same
    products, transposed operands included, the same column sums, and a linear layer's gradients."""
    cp = backend.cupy()
    monkeypatch.setattr(kernels, "OWN_HANDLE", True)
    a, W, G = (cp.asarray(rng.standard_normal(s), dtype=dtype) for s in ((300, 70), (50, 70), (300, 50)))
    x, w, g = (cp.asnumpy(v).astype(np.float64) for v in (a, W, G))   # the inputs as the GPU has them
    # float32 sums of 70 and 300 products of normals: their rounding is ~1e-5 (the error of a wrong
    # operand or transpose is ~1)
    tol = TOL[dtype] if dtype == "float64" else dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cp.asnumpy(kernels.matmul(a, W.T)), x @ w.T, **tol)
    np.testing.assert_allclose(cp.asnumpy(kernels.matmul(G.T, a)), g.T @ x, **tol)
    np.testing.assert_allclose(cp.asnumpy(kernels.column_sum(G)), g.sum(axis=0), **tol)
    b, results = rng.standard_normal(50), []
    for own in (False, True):
        monkeypatch.setattr(kernels, "OWN_HANDLE", own)
        results.append(run_both(lambda x, w, b: F.linear(x, w, b), [x, w, b], dtype)[1])   # the fused run
    (out0, grads0), (out1, grads1) = results
    for ours, cupys in zip([out1, *grads1], [out0, *grads0]):
        np.testing.assert_allclose(ours, cupys, **tol)


def test_batched_matmul_falls_back_for_broadcast_batches(rng):
    cp = backend.cupy()
    a, b = cp.asarray(rng.standard_normal((2, 3, 4, 5))), cp.asarray(rng.standard_normal((1, 3, 5, 2)))
    np.testing.assert_allclose(cp.asnumpy(kernels.batched_matmul(a, b)), cp.asnumpy(a) @ cp.asnumpy(b), rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_relu_matches_the_array_version(rng, dtype, bias):
    """The bias + ReLU kernel and the ReLU backward kernel inside linear_relu, against its array path."""
    arrays = [rng.standard_normal((4, 9, 33)), rng.standard_normal((70, 33))] + ([rng.standard_normal(70)] if bias else [])
    assert_same(run_both(lambda *t: F.linear_relu(*t), arrays, dtype), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_relu_and_the_linear_bias_gradient_match_the_array_version(rng, dtype):
    x, W, b = rng.standard_normal((4, 6, 9)), rng.standard_normal((5, 9)), rng.standard_normal(5)
    assert_same(run_both(lambda x, W, b: F.relu(F.linear(x, W, b)), [x, W, b], dtype), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_embedding_backward_from_device_ids_adds_in_the_same_order_as_from_host_ids(rng, dtype):
    """Device ids (CUDA graphs) are sorted on the device, host ids on the host: the same bits, with many
    distinct ids and a width that is not a multiple of 128."""
    cp = backend.cupy()
    ids = rng.integers(0, 700, size=(12, 250))
    ids[:, 3] = 5                                                  # one id in every row
    g = cp.asarray(rng.standard_normal((ids.size, 200)), dtype=dtype)
    host = cp.asnumpy(kernels.embedding_backward(ids, g, 700))
    device = cp.asnumpy(kernels.embedding_backward(cp.asarray(ids), g, 700))
    np.testing.assert_array_equal(device, host)
    unused = np.setdiff1d(np.arange(700), ids)
    assert unused.size and not device[unused].any()


# ---- the training step as a CUDA graph (minitransformer/cuda_graph.py) ----------------------------

def _graph_models(dropout, seed=3):
    from minitransformer.optim import NoamSchedule
    out = []
    for _ in range(2):
        mt.manual_seed(seed)
        model = mt.nn.Transformer(vocab_size=60, d_model=32, num_heads=4, num_layers=2, d_ff=64,
                                  dropout=dropout).to("cuda")
        opt = Adam(model.parameters(), lr=0.0)
        out.append((model, opt, NoamSchedule(opt, 32, warmup_steps=4, factor=0.1)))
    return out


def _graph_batches(rng, shapes, steps):
    from minitransformer.data import Batch
    batches = []
    for i in range(steps):
        B, S, T = shapes[i % len(shapes)]
        src, tgt = rng.integers(4, 60, size=(B, S)), rng.integers(4, 60, size=(B, T + 1))
        src[0, S - 2:] = 0
        tgt[-1, T - 3:] = 0
        batches.append(Batch(src, tgt[:, :-1].copy(), tgt[:, 1:].copy(), np.arange(B)))
    return batches


def test_a_captured_training_step_replays_the_eager_losses_and_weights(rng):
    """Ten steps over two batch shapes, dropout on: the graph (first step of a shape eager, then
    replays) gives the eager run's losses and weights to float32 rounding, and leaves the step
    counters and the dropout stream where the eager run leaves them."""
    from minitransformer.cuda_graph import CudaGraphStep
    from minitransformer.train import train_step
    (m0, o0, s0), (m1, o1, s1) = _graph_models(dropout=0.1)
    batches = _graph_batches(rng, [(8, 16, 8), (16, 8, 16)], 10)
    mt.manual_seed(11)
    eager = [float(train_step(m0, o0, s0, b)) for b in batches]
    counter = backend.random_state()["counter"]
    mt.manual_seed(11)
    graphed = CudaGraphStep(m1, o1, s1, 0.1)
    losses = [float(graphed(b)) for b in batches]
    assert (graphed.captures, graphed.replays) == (2, 8)
    np.testing.assert_allclose(losses, eager, rtol=2e-5)
    for (name, p0), p1 in zip(m0.named_parameters(), m1.parameters()):
        if not name.endswith("k_proj.bias"):   # zero gradient in exact arithmetic: Adam steps it by rounding noise
            np.testing.assert_allclose(p1.numpy(), p0.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    assert (o1.step_count, s1.step_count) == (o0.step_count, s0.step_count) == (10, 10)
    assert backend.random_state()["counter"] == counter


def test_a_captured_step_pads_odd_shapes_without_changing_the_loss(rng):
    """Lengths and batch rows padded up to multiples of 8 with pad ids (dropout 0): the same losses."""
    from minitransformer.cuda_graph import CudaGraphStep
    from minitransformer.train import train_step
    (m0, o0, s0), (m1, o1, s1) = _graph_models(dropout=0.0)
    batches = _graph_batches(rng, [(5, 11, 7), (6, 13, 9), (7, 9, 10)], 6)   # two pad to (8, 16, 16)
    eager = [float(train_step(m0, o0, s0, b)) for b in batches]
    graphed = CudaGraphStep(m1, o1, s1, 0.1)
    losses = [float(graphed(b)) for b in batches]
    assert len(graphed.graphs) == 2
    np.testing.assert_allclose(losses, eager, rtol=1e-4)


def test_replaying_a_captured_step_never_waits_for_the_gpu(rng):
    import cupyx
    from minitransformer.cuda_graph import CudaGraphStep
    (model, opt, schedule), _ = _graph_models(dropout=0.1)
    batch = _graph_batches(rng, [(8, 8, 8)], 1)[0]
    graphed = CudaGraphStep(model, opt, schedule, 0.1)
    graphed(batch)                                        # eager step and capture
    with cupyx.allow_synchronize(False):
        losses = [graphed(batch) for _ in range(5)]
    values = [float(x) for x in losses]
    assert all(np.isfinite(values)) and len(set(values)) > 1     # each replay is a new step


def test_a_captured_step_rejects_bad_batches_before_the_gpu_sees_them(rng):
    from minitransformer.cuda_graph import CudaGraphStep
    (model, opt, schedule), _ = _graph_models(dropout=0.0)
    batch = _graph_batches(rng, [(8, 8, 8)], 1)[0]
    graphed = CudaGraphStep(model, opt, schedule, 0.1)
    graphed(batch)
    batch.src[0, 0] = 60
    with pytest.raises(IndexError, match="CudaGraphStep: src id 60 is out of range"):
        graphed(batch)
    assert opt.step_count == 1


def test_replays_keep_their_host_constants_when_later_copies_reuse_cupys_pinned_buffers(rng):
    """What a capture copies from the host (the √d_model scale, Python numbers, masks) comes from
    buffers the capture owns: eager copies between replays (validation, checkpoints) cannot change it."""
    from minitransformer.cuda_graph import CudaGraphStep
    from minitransformer.train import train_step
    cp = backend.cupy()
    (m0, o0, s0), (m1, o1, s1) = _graph_models(dropout=0.0)
    batches = _graph_batches(rng, [(8, 8, 8)], 6)
    eager = [float(train_step(m0, o0, s0, b)) for b in batches]
    graphed = CudaGraphStep(m1, o1, s1, 0.1)
    losses = []
    for b in batches:
        losses.append(float(graphed(b)))
        for shape in [(), (1,), (8, 8), ()] * 5:      # what CuPy's pinned staging hands out next
            cp.asarray(rng.standard_normal(shape) * 1e3)
    np.testing.assert_allclose(losses, eager, rtol=2e-5)


# ---- decoding as a CUDA graph (decode.beam_search(cuda_graph=True)) --------------------------------

def test_a_captured_step_replays_in_place_work_without_waiting_for_the_gpu(rng):
    """``CapturedStep``: the first call eager, the second recorded and launched, later calls
    launched; each call is a new step (a product through our cuBLAS handle and in-place updates)."""
    import cupyx
    from minitransformer.cuda_graph import CapturedStep
    cp = backend.cupy()
    W = rng.standard_normal((16, 16)) / 4
    x, count = cp.asarray(rng.standard_normal((8, 16))), cp.zeros((), dtype=cp.int64)

    W_gpu = cp.asarray(W)

    def step():
        x[...] = cp.tanh(kernels.matmul(x, W_gpu)) + count
        count[...] += 1

    expected, e = [], backend.to_numpy(x).copy()
    for i in range(6):
        e = np.tanh(e @ W) + i
        expected.append(e)
    captured = CapturedStep(step)
    got = []
    for i in range(6):
        if i < 2:
            captured()
        else:
            with cupyx.allow_synchronize(False):
                captured()
        got.append(backend.to_numpy(x).copy())
    assert captured.graph is not None and captured.calls == 6 and int(count) == 6
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("logp_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B, K, V, n", [(3, 4, 60, 8), (2, 4, 5000, 8), (5, 16, 700, 32), (1, 1, 2, 2),
                                        (4, 3, 1, 3), (2, 9, 37, 18), (0, 4, 10, 8)])
def test_beam_candidates_kernel_picks_what_top_k_picks_on_the_formed_sums(rng, logp_dtype, B, K, V, n):
    """``kernels.beam_top_k(scores, logp, n)`` = the host top-k (ties to the lower index) of the
    float64 sums ``scores[b, k] + logp[b·K + k, v]``, indices and values exactly: ties made common
    (small integers), rows with fewer than n finite sums (-inf scores and log-probs), rows long
    enough for several blocks per sentence (2×4×5000: five)."""
    cp = backend.cupy()
    scores = rng.integers(-3, 1, size=(B, K)).astype(np.float64)
    scores[rng.random((B, K)) < 0.3] = -np.inf
    logp = rng.integers(-4, 1, size=(B * K, V)).astype(logp_dtype)
    logp[rng.random((B * K, V)) < 0.3] = -np.inf
    if B:
        scores[0, :] = -np.inf                 # a sentence with no finite candidate at all
        scores[0, 0] = 0.0
        logp[:K, :] = -np.inf
        logp[0, V - 1] = -1.0                  # ... but one
    sums = (scores[:, :, None] + logp.reshape(B, K, V)).reshape(B, K * V)
    want = backend.top_k(sums, n) if B else np.zeros((0, n), dtype=np.int64)
    top, values = kernels.beam_top_k(cp.asarray(scores), cp.asarray(logp), n)
    assert top.shape == values.shape == (B, n) and top.dtype == np.int64 and values.dtype == np.float64
    np.testing.assert_array_equal(backend.to_numpy(top), want)
    np.testing.assert_array_equal(backend.to_numpy(values), np.take_along_axis(sums, want, axis=1))


def test_beam_candidates_kernel_rejects_what_it_cannot_do():
    cp = backend.cupy()
    with pytest.raises(ValueError, match="beam_top_k"):
        kernels.beam_top_k(cp.zeros((2, 20)), cp.zeros((40, 10), dtype=cp.float32), 40)   # n > TOPK_MAX
    with pytest.raises(ValueError, match="beam_top_k"):
        kernels.beam_top_k(cp.zeros((2, 2)), cp.zeros((4, 3), dtype=cp.float32), 7)      # n > K·V
    with pytest.raises(ValueError, match="beam_top_k"):
        kernels.beam_top_k(cp.zeros((2, 2), dtype=cp.float32), cp.zeros((4, 3)), 2)     # float32 scores


# 17 beams: 34 candidates, past the kernel's 32, so that step takes top-k by argmax rounds
@pytest.mark.parametrize("beam_size, max_len_b", [(1, 5), (4, 12), (5, 3), (9, 4), (17, 3)])
def test_beam_search_replayed_as_a_cuda_graph_gives_the_eager_hypotheses(rng, beam_size, max_len_b):
    """The captured step (decoder over a fixed-size cache, top-k, bookkeeping) replayed: the same
    hypotheses and scores as the same step run eagerly, and as the growing cache. The eos logit is
    scaled so that sentences end at different steps."""
    from minitransformer.data import BOS_ID, EOS_ID, collate
    from minitransformer.decode import beam_search
    mt.manual_seed(5)
    model = mt.nn.Transformer(vocab_size=60, d_model=32, num_heads=4, num_layers=2, d_ff=64, dropout=0.0,
                              share_embeddings=False).to("cuda")
    model.generator.weight.data[EOS_ID] *= 1.5
    seqs = [rng.integers(4, 60, size=rng.integers(3, 9)).tolist() for _ in range(10)]
    src = collate(seqs, seqs).src
    results = {name: beam_search(model, src, BOS_ID, EOS_ID, beam_size, max_len_b=max_len_b, return_scores=True,
                                 **kw)
               for name, kw in [("graph", dict(cuda_graph=True)), ("fixed", dict(fixed_cache=True)), ("grow", {})]}
    lengths = {len(h) for h in results["graph"][0]}
    assert len(lengths) > 1, lengths
    for name in ("fixed", "grow"):
        assert results["graph"][0] == results[name][0], name
        np.testing.assert_allclose(results["graph"][1], results[name][1], rtol=2e-5, err_msg=name)


def test_translate_with_replayed_searches_gives_the_eager_translations(tmp_path):
    """``evaluate.translate(cuda_graph=True)``: every batch's beam search recorded anew and replayed
    (batches of different widths and lengths) gives the eager translations, in the caller's order.
    float64, so that the growing and the fixed-size cache cannot round a near-tie apart."""
    from pathlib import Path

    from minitransformer import evaluate
    from minitransformer.data import Tokenizer, read_pairs
    pairs = read_pairs(Path(__file__).parent / "data" / "spa_sample.tsv")[:300]
    tok = Tokenizer.train([s for s, _ in pairs] + [t for _, t in pairs], vocab_size=300, cache=tmp_path)
    mt.set_default_dtype("float64")          # (the conftest fixture puts it back)
    mt.manual_seed(3)
    model = mt.nn.Transformer(tok.vocab_size, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_len=128).to("cuda")
    sentences = [s for s, _ in pairs[:70]]
    kw = dict(beam_size=4, batch_size=32, max_len_b=12)
    eager = evaluate.translate(model, tok, sentences, **kw)
    assert evaluate.translate(model, tok, sentences, cuda_graph=True, **kw) == eager
    assert len(set(eager)) > 1


def test_a_kept_replayed_search_decodes_later_batches_without_recording_again(rng, monkeypatch):
    """Batches of one shape through ``beam_search(cuda_graph=True)``: the first records its two
    graphs, the later ones only replay them (inputs copied in, state reset in place) — and every
    batch gets the growing cache's hypotheses and scores, sentences ending at different steps."""
    from minitransformer import cuda_graph, decode
    from minitransformer.data import BOS_ID, EOS_ID, collate
    from minitransformer.decode import beam_search
    recorded = []
    record = cuda_graph.record
    monkeypatch.setattr(cuda_graph, "record", lambda *a: recorded.append(1) or record(*a))
    mt.manual_seed(6)
    model = mt.nn.Transformer(vocab_size=60, d_model=32, num_heads=4, num_layers=2, d_ff=64, dropout=0.0,
                              share_embeddings=False).to("cuda")
    model.generator.weight.data[EOS_ID] *= 1.5
    decode.release_searches(model)
    for _ in range(3):
        seqs = [rng.integers(4, 60, size=rng.integers(3, 9)).tolist() for _ in range(9)] + [[7] * 9]
        src = collate(seqs, seqs).src                      # 10 × 9 every time
        got = beam_search(model, src, BOS_ID, EOS_ID, 4, max_len_b=6, cuda_graph=True, return_scores=True)
        want = beam_search(model, src, BOS_ID, EOS_ID, 4, max_len_b=6, return_scores=True)
        assert got[0] == want[0]
        np.testing.assert_allclose(got[1], want[1], rtol=2e-5)
    (search,) = decode._KEPT[model].values()
    assert search.searches == 3 and len(recorded) == 2
    decode.release_searches(model)
