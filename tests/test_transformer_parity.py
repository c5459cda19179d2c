"""The whole model against its PyTorch twin (``benchmarks/torch_twin.py``), as llm.c's test_gpt2:
logits, loss, every parameter gradient, then five Adam + Noam steps (losses and parameters).

Weights are copied from ours into the twin; dropout is 0 so both compute the same function.

Error measure (``rel_err``): ``max |ours - torch| / max |torch|`` per tensor — the worst element
error relative to the tensor's own scale. Unlike an element-wise relative error it is not blown up
by entries that are near zero only by cancellation, and unlike a plain max-abs error it means the
same for a gradient of size 1e-4 as for one of size 10. Bounds: 1e-8 in float64, 1e-4 in float32.

One parameter is special: the gradient of every attention's ``k_proj.bias`` is zero in exact
arithmetic. Adding ``b`` to every key adds ``q·b`` to a whole row of scores, which softmax ignores;
so both implementations get pure rounding noise there, which the test checks is tiny against the
scale of the gradients overall, and Adam turns that noise into arbitrary steps of size ≈ lr —
harmless, since the key bias cannot change any output, but not comparable between the two.

The same effect limits how exactly float32 *training* can agree. Adam's ε = 1e-9 lies below the
float32 rounding noise of a gradient element, so an element whose true gradient happens to be ~0
(|g| ≲ 1e-7·max|g|; about one five-step run in ten meets one) moves by ±lr with its sign set by
rounding, and the two runs part by 2·lr there. After the Adam steps the float32 parameters are therefore
compared as one vector, ``‖ours - torch‖₂ / ‖torch‖₂`` over every parameter (typically 1e-7; 3e-5
in the worst of 60 seeds), while every step's loss keeps the per-value bound. float64 has no such
noise (1e-17 ≪ ε) and is held to ``rel_err`` ≤ 1e-8 per parameter tensor.
"""
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import minitransformer as mt
import minitransformer.optim  # noqa: F401  (mt.optim)
import minitransformer.train  # noqa: F401  (mt.train)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import torch_twin  # noqa: E402

CONFIG = dict(vocab_size=50, d_model=32, num_heads=4, num_layers=2, d_ff=64, dropout=0.0, pad_id=0,
              max_len=64)
TOL = {"float64": 1e-8, "float32": 1e-4}
NOAM = dict(warmup_steps=4, factor=0.05)  # lr ≈ 1.1e-3 … 4.4e-3 over the five steps: the weights move
LABEL_SMOOTHING = 0.1


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tensors this small gain nothing from torch's thread pool, and on a busy machine its
    spinning workers cost seconds per call; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(ours, theirs):
    """``max |ours - theirs| / max |theirs|`` (see the module docstring)."""
    ours = mt.backend.to_numpy(ours).astype(np.float64)
    if isinstance(theirs, torch.Tensor):
        theirs = theirs.detach().double().numpy()
    assert ours.shape == theirs.shape
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def is_key_bias(name):
    return name.endswith("k_proj.bias")


def make_batch(rng, B=3, S=9, T=7):
    """Random ids in [4, vocab) with trailing padding (pad 0) in some source and target rows; the
    first target token is never padding, so no query row is fully masked."""
    V, pad = CONFIG["vocab_size"], CONFIG["pad_id"]
    src = rng.integers(4, V, size=(B, S))
    tgt = rng.integers(4, V, size=(B, T + 1))
    for b, (s_len, t_len) in enumerate([(S, T + 1), (S - 3, T - 2), (S - 5, T + 1)][:B]):
        src[b, s_len:] = pad
        tgt[b, t_len:] = pad
    tgt_in, tgt_out = tgt[:, :-1].copy(), tgt[:, 1:].copy()
    tgt_out[tgt_in == pad] = pad
    assert (src == pad).any() and (tgt_in == pad).any() and (tgt_out == pad).any()
    return types.SimpleNamespace(src=src, tgt_in=tgt_in, tgt_out=tgt_out)


def build_pair(dtype, norm_first, device):
    mt.set_default_dtype(dtype)      # the conftest fixture restores the default afterwards
    ours = mt.nn.Transformer(**CONFIG, norm_first=norm_first).to(device)
    twin = torch_twin.TorchTransformer.from_ours(ours)
    assert twin.embedding.weight.dtype == torch_twin.TORCH_DTYPES[np.dtype(dtype)]
    return ours, twin


def check_grads(ours, twin, tol):
    """Every parameter's gradient; returns the worst ``rel_err``."""
    ours_params, twin_params = dict(ours.named_parameters()), dict(twin.named_parameters())
    assert list(ours_params) == list(twin_params)
    scale = max(float(p.grad.abs().max()) for p in twin_params.values())
    worst = 0.0
    for name, p in ours_params.items():
        ref = twin_params[name].grad
        assert p.grad is not None and ref is not None, f"{name} got no gradient"
        assert p.grad.shape == p.shape and p.grad.dtype == p.dtype
        if is_key_bias(name):   # zero in exact arithmetic: both must be rounding noise
            assert np.abs(mt.backend.to_numpy(p.grad)).max() <= tol * scale, name
            assert float(ref.abs().max()) <= tol * scale, name
            continue
        err = rel_err(p.grad, ref)
        assert err <= tol, f"{name}: gradient rel_err {err:.3g} > {tol}"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_logits_loss_and_every_gradient(dtype, norm_first, device, rng):
    ours, twin = build_pair(dtype, norm_first, device)
    batch = make_batch(rng)

    logits = ours(batch.src, batch.tgt_in)
    ref_logits = twin(torch.from_numpy(batch.src), torch.from_numpy(batch.tgt_in))
    assert logits.shape == tuple(ref_logits.shape) == (3, 7, CONFIG["vocab_size"])
    assert rel_err(logits.data, ref_logits) <= TOL[dtype]

    loss = mt.train.batch_loss(ours, batch, LABEL_SMOOTHING)
    ref_loss = torch_twin.batch_loss(twin, batch.src, batch.tgt_in, batch.tgt_out, LABEL_SMOOTHING)
    assert loss.dtype == np.dtype(dtype)
    assert rel_err(loss.data, ref_loss) <= TOL[dtype]
    assert 2.0 < loss.item() < 6.0          # ≈ ln(50) for a fresh model: a real loss, not 0

    loss.backward()
    ref_loss.backward()
    check_grads(ours, twin, TOL[dtype])


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_five_adam_noam_steps(dtype, norm_first, device, rng):
    ours, twin = build_pair(dtype, norm_first, device)
    optimizer = mt.optim.Adam(ours.parameters(), lr=0.0, betas=(0.9, 0.98), eps=1e-9)
    schedule = mt.optim.NoamSchedule(optimizer, CONFIG["d_model"], **NOAM)
    ref_optimizer = torch_twin.make_optimizer(twin)
    batches = [make_batch(rng) for _ in range(5)]
    before = ours.state_dict()

    losses, ref_losses = [], []
    for step, batch in enumerate(batches, start=1):
        losses.append(float(mt.train.train_step(ours, optimizer, schedule, batch, LABEL_SMOOTHING)))
        ref_losses.append(float(torch_twin.train_step(twin, ref_optimizer, step, batch.src, batch.tgt_in,
                                                      batch.tgt_out, LABEL_SMOOTHING, **NOAM)))
        assert optimizer.lr == ref_optimizer.param_groups[0]["lr"]
        assert abs(losses[-1] - ref_losses[-1]) <= TOL[dtype] * abs(ref_losses[-1]), f"step {step}"
    assert schedule.step_count == 5

    after = ours.state_dict()
    ref_after = {name: p.detach().double().numpy() for name, p in twin.named_parameters()}
    lr_sum = sum(torch_twin.noam_rate(s, CONFIG["d_model"], **NOAM) for s in range(1, 6))
    diff_sq = ref_sq = 0.0
    for name, value in after.items():
        if is_key_bias(name):   # noise-driven (module docstring): only bounded by Adam's step size
            assert np.abs(value).max() <= 3 * lr_sum and np.abs(ref_after[name]).max() <= 3 * lr_sum
            continue
        assert np.abs(value - before[name]).max() > 1e-3, f"{name} did not move"
        if dtype == "float64":
            err = rel_err(value, ref_after[name])
            assert err <= TOL[dtype], f"{name}: parameter rel_err {err:.3g} after 5 steps"
        diff_sq += float(np.sum((value - ref_after[name]) ** 2))
        ref_sq += float(np.sum(ref_after[name] ** 2))
    assert np.sqrt(diff_sq / ref_sq) <= TOL[dtype], "parameters differ after 5 steps (norm-relative)"
    # Training on these batches is visible in the loss: a repeat of the first batch now scores lower.
    with mt.no_grad():
        assert float(mt.train.batch_loss(ours.eval(), batches[0], LABEL_SMOOTHING).item()) < losses[0]
