"""optim: Adam and SGD step for step against torch.optim, the Noam schedule against its formula
(§5.3), gradient clipping against torch.nn.utils.clip_grad_norm_, and optimiser state that resumes
exactly."""
import math

import numpy as np
import pytest
import torch

import minitransformer as mt
from minitransformer.nn import Parameter
from minitransformer.optim import SGD, Adam, NoamSchedule, clip_grad_norm

SHAPES = [(4, 3), (5,), (2, 3, 2)]
TOL = {"float64": dict(rtol=1e-12, atol=1e-14), "float32": dict(rtol=2e-6, atol=1e-7)}
TORCH_DTYPE = {"float64": torch.float64, "float32": torch.float32}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: torch's thread pool only costs time (seconds on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_params(rng, device, dtype, shapes=SHAPES):
    """Our parameters on ``device`` and torch twins with the same values."""
    ours = [Parameter(mt.tensor(rng.standard_normal(s), dtype=dtype, device=device).data) for s in shapes]
    theirs = [torch.tensor(p.numpy(), requires_grad=True) for p in ours]
    return ours, theirs


def set_grads(rng, ours, theirs, scale=1.0):
    for p, t in zip(ours, theirs):
        g = rng.standard_normal(p.shape) * scale
        p.grad = mt.tensor(g, dtype=p.dtype, device=p.device).data
        t.grad = torch.tensor(g, dtype=t.dtype)


def assert_same(ours, theirs, dtype, what=""):
    for i, (p, t) in enumerate(zip(ours, theirs)):
        assert mt.backend.device_of(p.data) == p.device and p.dtype == np.dtype(dtype)
        np.testing.assert_allclose(p.numpy(), t.detach().numpy(), **TOL[dtype], err_msg=f"{what} param {i}")


# ---- Adam ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_adam_matches_torch_over_20_steps_with_changing_lr(device, dtype, rng):
    ours, theirs = make_params(rng, device, dtype)
    opt = Adam(ours, lr=0.0, betas=(0.9, 0.98), eps=1e-9)
    ref = torch.optim.Adam(theirs, lr=0.0, betas=(0.9, 0.98), eps=1e-9)
    start = [p.numpy().copy() for p in ours]
    for step in range(1, 21):
        lr = 1e-2 * rng.uniform(0.1, 1.0)          # a new rate every step, as the schedule does
        opt.lr = lr
        for group in ref.param_groups:
            group["lr"] = lr
        set_grads(rng, ours, theirs, scale=10.0 ** rng.uniform(-3, 1))
        opt.step()
        ref.step()
        assert opt.step_count == step
        assert_same(ours, theirs, dtype, f"step {step}")
    assert all(np.abs(p.numpy() - s).max() > 1e-2 for p, s in zip(ours, start)), "Adam did not move"


def test_adam_first_step_is_lr_times_sign(device, rng):
    """With bias correction, step 1 is ``p -= lr · g / (|g| + ε')``, i.e. ≈ lr · sign(g)."""
    ours, _ = make_params(rng, device, "float64", [(50,)])
    p = ours[0]
    before = p.numpy().copy()
    g = rng.standard_normal(50)
    g += np.sign(g) * 0.1                    # away from 0, where ε would matter
    p.grad = mt.tensor(g, dtype="float64", device=device).data
    Adam([p], lr=0.01).step()
    np.testing.assert_allclose(before - p.numpy(), 0.01 * np.sign(g), rtol=1e-6)


def test_adam_skips_parameters_without_gradient(device, rng):
    ours, _ = make_params(rng, device, "float64")
    before = [p.numpy().copy() for p in ours]
    opt = Adam(ours, lr=0.1)
    ours[0].grad = ours[0].xp.ones_like(ours[0].data)
    opt.step()
    assert not np.array_equal(ours[0].numpy(), before[0])
    for p, b in zip(ours[1:], before[1:]):
        np.testing.assert_array_equal(p.numpy(), b)


# ---- SGD ----------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sgd_matches_torch(device, dtype, momentum, rng):
    ours, theirs = make_params(rng, device, dtype)
    opt = SGD(ours, lr=0.05, momentum=momentum)
    ref = torch.optim.SGD(theirs, lr=0.05, momentum=momentum)
    for step in range(10):
        if step == 5:                               # a changed lr takes effect at the next step
            opt.lr = 0.02
            ref.param_groups[0]["lr"] = 0.02
        set_grads(rng, ours, theirs)
        opt.step()
        ref.step()
        assert_same(ours, theirs, dtype, f"step {step}")


def test_plain_sgd_is_p_minus_lr_g(device, rng):
    ours, _ = make_params(rng, device, "float64", [(3, 4)])
    p = ours[0]
    before = p.numpy().copy()
    g = rng.standard_normal((3, 4))
    p.grad = mt.tensor(g, dtype="float64", device=device).data
    SGD([p], lr=0.5).step()
    np.testing.assert_allclose(p.numpy(), before - 0.5 * g, rtol=1e-15)


# ---- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Adam, SGD])
def test_empty_parameter_list_raises(cls):
    with pytest.raises(ValueError, match=f"{cls.__name__}.*empty"):
        cls([], lr=0.1)
    with pytest.raises(ValueError, match=f"{cls.__name__}.*empty"):
        cls(iter([]), lr=0.1)


@pytest.mark.parametrize("cls", [Adam, SGD])
def test_negative_lr_raises(cls, rng):
    ours, _ = make_params(rng, "cpu", "float64")
    with pytest.raises(ValueError, match="lr"):
        cls(ours, lr=-1.0)


@pytest.mark.parametrize("cls", [Adam, SGD])
def test_a_single_parameter_raises(cls, rng):
    """Iterating one tensor yields its rows: nothing would be updated."""
    p = make_params(rng, "cpu", "float64")[0][0]
    with pytest.raises(TypeError, match=rf"{cls.__name__}: params must be an iterable of tensors.*single Parameter"):
        cls(p, lr=0.1)


@pytest.mark.parametrize("cls", [Adam, SGD])
def test_a_module_or_named_parameters_raises(cls):
    model = mt.nn.Linear(3, 4)
    with pytest.raises(TypeError, match=rf"{cls.__name__}: params must be an iterable of tensors.*module Linear"):
        cls(model, lr=0.1)
    with pytest.raises(TypeError, match=rf"{cls.__name__}: .*\(name, tensor\) pairs.*named_parameters"):
        cls(model.named_parameters(), lr=0.1)
    with pytest.raises(TypeError, match=rf"{cls.__name__}: params must be an iterable of tensors.*got float"):
        cls(0.1, lr=0.1)
    with pytest.raises(TypeError, match=rf"{cls.__name__}: params must be tensors, got a ndarray at index 1"):
        cls([model.weight, np.zeros(3)], lr=0.1)


@pytest.mark.parametrize("make", [lambda ps: Adam(ps, lr=0.01), lambda ps: SGD(ps, lr=0.05, momentum=0.9)],
                         ids=["adam", "sgd"])
def test_a_generator_of_parameters_works_like_a_list(device, make, rng):
    ours, _ = make_params(rng, device, "float64")
    twins = [Parameter(mt.tensor(p.numpy(), device=device).data) for p in ours]
    opt, ref = make(p for p in ours), make(twins)
    assert len(opt.params) == len(ours)
    for _ in range(3):
        for p, q in zip(ours, twins):
            p.grad = q.grad = mt.tensor(rng.standard_normal(p.shape), device=device).data
        opt.step()
        ref.step()
    for p, q in zip(ours, twins):
        np.testing.assert_array_equal(p.numpy(), q.numpy())


@pytest.mark.parametrize("cls", [Adam, SGD])
def test_a_repeated_parameter_raises(cls, rng):
    ours, _ = make_params(rng, "cpu", "float64")
    with pytest.raises(ValueError, match=rf"{cls.__name__}: params\[3\] is the same tensor as params\[1\]"):
        cls(ours + [ours[1]], lr=1.0)


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -1e-3])
@pytest.mark.parametrize("cls", [Adam, SGD])
def test_non_finite_or_negative_lr_raises(cls, lr, rng):
    ours, _ = make_params(rng, "cpu", "float64")
    with pytest.raises(ValueError, match=rf"{cls.__name__}: lr must be a finite number >= 0, got {lr}"):
        cls(ours, lr=lr)
    with pytest.raises(TypeError, match=rf"{cls.__name__}: lr must be a real number, got str"):
        cls(ours, lr="0.1")


@pytest.mark.parametrize("betas, which", [((1.0, 0.98), 0), ((0.9, 1.0), 1), ((-0.1, 0.98), 0),
                                          ((0.9, float("nan")), 1)])
def test_adam_betas_outside_0_1_raise(betas, which, rng):
    """β = 1 makes the bias correction 1 - β^t zero: step() would divide by it."""
    ours, _ = make_params(rng, "cpu", "float64")
    with pytest.raises(ValueError, match=rf"Adam: betas\[{which}\].*must be in \[0, 1\)"):
        Adam(ours, betas=betas)
    with pytest.raises(TypeError, match=r"Adam: betas must be a pair"):
        Adam(ours, betas=0.9)


@pytest.mark.parametrize("eps", [0.0, -1e-9, float("nan"), float("inf")])
def test_adam_eps_must_be_positive(eps, rng):
    ours, _ = make_params(rng, "cpu", "float64")
    with pytest.raises(ValueError, match=r"Adam: eps must be a finite number > 0"):
        Adam(ours, eps=eps)


@pytest.mark.parametrize("momentum", [-0.5, float("nan")])
def test_sgd_momentum_must_be_non_negative(momentum, rng):
    ours, _ = make_params(rng, "cpu", "float64")
    with pytest.raises(ValueError, match=r"SGD: momentum must be a finite number >= 0"):
        SGD(ours, lr=0.1, momentum=momentum)


def test_zero_grad_clears_gradients(device, rng):
    ours, theirs = make_params(rng, device, "float64")
    set_grads(rng, ours, theirs)
    opt = Adam(ours)
    opt.zero_grad()
    assert all(p.grad is None for p in ours)


# ---- the schedule of §5.3 -------------------------------------------------------------------

@pytest.mark.parametrize("d_model, warmup_steps, factor", [(512, 4000, 1.0), (32, 10, 2.0), (256, 1, 0.5)])
def test_noam_schedule_matches_formula(d_model, warmup_steps, factor, rng):
    opt = SGD(make_params(rng, "cpu", "float64")[0], lr=123.0)
    schedule = NoamSchedule(opt, d_model, warmup_steps, factor)
    steps = 3 * warmup_steps + 20
    rates = []
    for step in range(1, steps + 1):
        lr = schedule.step()
        expected = factor * d_model ** -0.5 * min(step ** -0.5, step * warmup_steps ** -1.5)
        assert lr == pytest.approx(expected, rel=1e-12)
        assert opt.lr == lr and schedule.step_count == step
        assert schedule.rate(step) == lr
        rates.append(lr)
    rates = np.array(rates)
    assert int(np.argmax(rates)) + 1 == warmup_steps                       # peak at warmup_steps
    peak = factor * (d_model * warmup_steps) ** -0.5
    assert rates.max() == pytest.approx(peak, rel=1e-12)
    s = np.arange(1, steps + 1)
    warm = s <= warmup_steps
    np.testing.assert_allclose(rates[warm], rates[0] * s[warm], rtol=1e-12)                 # linear
    np.testing.assert_allclose(rates[~warm], peak * np.sqrt(warmup_steps / s[~warm]), rtol=1e-12)  # 1/√step
    assert schedule.rate(0) == rates[0]                                     # step 0 reads as step 1


def test_noam_schedule_rejects_bad_warmup(rng):
    opt = SGD(make_params(rng, "cpu", "float64")[0], lr=0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        NoamSchedule(opt, 512, warmup_steps=0)


@pytest.mark.parametrize("d_model, warmup_steps, bad", [(-8, 4, "d_model"), (0, 4, "d_model"), (8.5, 4, "d_model"),
                                                      (True, 4, "d_model"), (8, -4, "warmup_steps"),
                                                      (8, 2.5, "warmup_steps")])
def test_noam_schedule_rejects_non_positive_int_sizes(d_model, warmup_steps, bad, rng):
    """A negative d_model would make d_model^-0.5, and so the rate, complex."""
    opt = SGD(make_params(rng, "cpu", "float64")[0], lr=0.1)
    value = d_model if bad == "d_model" else warmup_steps
    with pytest.raises(ValueError, match=rf"NoamSchedule: {bad} must be an int >= 1, got {value}"):
        NoamSchedule(opt, d_model, warmup_steps)
    NoamSchedule(opt, np.int64(8), np.int64(4))        # NumPy ints are ints


@pytest.mark.parametrize("factor", [-1.0, float("nan"), float("inf")])
def test_noam_schedule_rejects_bad_factor(factor, rng):
    opt = SGD(make_params(rng, "cpu", "float64")[0], lr=0.1)
    with pytest.raises(ValueError, match=r"NoamSchedule: factor must be a finite number >= 0"):
        NoamSchedule(opt, 8, 4, factor)


def test_noam_schedule_needs_something_with_an_lr():
    with pytest.raises(TypeError, match=r"NoamSchedule: optimizer must be an optimizer with an `lr` attribute.*Linear"):
        NoamSchedule(mt.nn.Linear(3, 4), 8, 4)


@pytest.mark.parametrize("change, error, match", [
    ({"v.2": np.zeros((7,))}, ValueError, r"Adam\.load_state_dict: v\.2 has shape \(7,\), expected \(2, 3, 2\)"),
    ({"step_count": 2.5}, ValueError, r"Adam\.load_state_dict: step_count must be an int >= 0, got 2\.5"),
    ({"step_count": True}, ValueError, r"step_count must be an int >= 0, got True"),
    ({"lr": -1.0}, ValueError, r"Adam\.load_state_dict: lr must be a finite number >= 0, got -1\.0"),
    ({"m.1": None}, KeyError, r"Adam\.load_state_dict: missing m\.1"),
])
def test_failed_load_state_dict_leaves_the_optimizer_unchanged(rng, change, error, match):
    """Every check runs before anything is assigned: lr, step_count and every buffer stay as they were."""
    source, target = Adam(make_params(rng, "cpu", "float64")[0], lr=0.5), Adam(make_params(rng, "cpu", "float64")[0])
    for opt in (source, target):
        for _ in range(2 if opt is source else 3):
            for p in opt.params:
                p.grad = rng.standard_normal(p.shape)
            opt.step()
    state = {k: v for k, v in {**source.state_dict(), **change}.items() if v is not None}
    before = target.state_dict()
    with pytest.raises(error, match=match):
        target.load_state_dict(state)
    after = target.state_dict()
    assert (after["lr"], after["step_count"]) == (before["lr"], before["step_count"]) == (1e-3, 3)
    for key in before.keys() - {"lr", "step_count"}:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert not np.array_equal(before["m.0"], source.state_dict()["m.0"])   # a load would have shown


@pytest.mark.parametrize("step_count", [-1, 2.5, "7", None])
def test_failed_schedule_load_leaves_schedule_and_rate_unchanged(rng, step_count):
    opt = Adam(make_params(rng, "cpu", "float64")[0])
    schedule = NoamSchedule(opt, 64, warmup_steps=5)
    for _ in range(3):
        schedule.step()
    lr = opt.lr
    state = {} if step_count is None else {"step_count": step_count}
    error, match = (KeyError, "missing step_count") if step_count is None else \
        (ValueError, rf"NoamSchedule\.load_state_dict: step_count must be an int >= 0, got {step_count!r}")
    with pytest.raises(error, match=match):
        schedule.load_state_dict(state)
    assert schedule.step_count == 3 and opt.lr == lr


def test_noam_schedule_state_round_trip(rng):
    opt = Adam(make_params(rng, "cpu", "float64")[0])
    schedule = NoamSchedule(opt, 64, warmup_steps=5)
    for _ in range(7):
        schedule.step()
    opt2 = Adam(make_params(rng, "cpu", "float64")[0])
    schedule2 = NoamSchedule(opt2, 64, warmup_steps=5)
    schedule2.load_state_dict(schedule.state_dict())
    assert schedule2.step_count == 7 and opt2.lr == opt.lr
    assert schedule2.step() == schedule.step()


# ---- gradient clipping ----------------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [0.5, 1e6])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_clip_grad_norm_matches_torch(device, dtype, max_norm, rng):
    ours, theirs = make_params(rng, device, dtype)
    set_grads(rng, ours, theirs)
    original = [p.grad for p in ours]
    copies = [mt.backend.to_numpy(g).copy() for g in original]
    total = clip_grad_norm(ours, max_norm)
    ref_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert mt.backend.device_of(total) == device
    assert float(total) == pytest.approx(float(ref_total), rel=1e-6 if dtype == "float32" else 1e-12)
    expected_norm = math.sqrt(sum(float(np.sum(c.astype(np.float64) ** 2)) for c in copies))
    assert float(total) == pytest.approx(expected_norm, rel=1e-6)           # the norm before clipping
    for p, t in zip(ours, theirs):
        assert p.grad.dtype == p.dtype and mt.backend.device_of(p.grad) == device
        np.testing.assert_allclose(mt.backend.to_numpy(p.grad), t.grad.numpy(), **TOL[dtype])
    clipped = math.sqrt(sum(float(np.sum(mt.backend.to_numpy(p.grad).astype(np.float64) ** 2)) for p in ours))
    if max_norm < expected_norm:
        assert clipped == pytest.approx(max_norm, rel=1e-5)
    else:
        assert clipped == pytest.approx(expected_norm, rel=1e-6)
    for g, c in zip(original, copies):        # the old gradient arrays were not scaled in place
        np.testing.assert_array_equal(mt.backend.to_numpy(g), c)


def test_clip_grad_norm_ignores_missing_gradients(device, rng):
    ours, theirs = make_params(rng, device, "float64")
    set_grads(rng, ours, theirs)
    ours[1].grad, theirs[1].grad = None, None
    total = clip_grad_norm(ours, 0.1)
    ref_total = torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    assert float(total) == pytest.approx(float(ref_total), rel=1e-12)
    assert ours[1].grad is None
    assert float(clip_grad_norm(ours[1:2], 1.0)) == 0.0        # nothing to clip


def test_clip_grad_norm_clips_a_generator(device, rng):
    """The norm and the scaling are two passes: a generator must be listed first, not spent by the norm."""
    ours, theirs = make_params(rng, device, "float64")
    set_grads(rng, ours, theirs, scale=10.0)
    total = clip_grad_norm((p for p in ours), 0.5)
    ref_total = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    assert float(total) == pytest.approx(float(ref_total), rel=1e-12)
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(mt.backend.to_numpy(p.grad), t.grad.numpy(), **TOL["float64"])


@pytest.mark.parametrize("max_norm", [-1.0, 0.0, float("nan"), float("inf")])
def test_clip_grad_norm_rejects_bad_max_norm(max_norm, rng):
    """A negative max_norm would flip the sign of every gradient."""
    ours, theirs = make_params(rng, "cpu", "float64")
    set_grads(rng, ours, theirs)
    before = [p.grad for p in ours]
    with pytest.raises(ValueError, match=r"clip_grad_norm: max_norm must be a finite number > 0"):
        clip_grad_norm(ours, max_norm)
    assert all(p.grad is g for p, g in zip(ours, before))


def test_clip_grad_norm_rejects_a_single_parameter_or_a_module(rng):
    p = make_params(rng, "cpu", "float64")[0][0]
    p.grad = p.xp.ones_like(p.data)
    with pytest.raises(TypeError, match=r"clip_grad_norm: params must be an iterable of tensors.*single Parameter"):
        clip_grad_norm(p, 1.0)
    with pytest.raises(TypeError, match=r"clip_grad_norm: params must be an iterable of tensors.*module Linear"):
        clip_grad_norm(mt.nn.Linear(3, 4), 1.0)


# ---- optimiser state: an exact resume -------------------------------------------------------

@pytest.mark.parametrize("make", [lambda ps: Adam(ps, lr=0.01), lambda ps: SGD(ps, lr=0.05, momentum=0.9),
                                  lambda ps: SGD(ps, lr=0.05)], ids=["adam", "sgd_momentum", "sgd"])
def test_state_dict_round_trip_continues_identically(device, make, rng):
    """Take the state after 5 steps, keep training the original, then load that state into a
    fresh optimiser over copies of the parameters taken at the same moment: the next 5 steps
    must be identical (the state dict is a snapshot, not a view of live buffers)."""
    ours, _ = make_params(rng, device, "float64")
    opt = make(ours)
    grads = [[rng.standard_normal(p.shape) for p in ours] for _ in range(10)]

    def step(params, optimizer, gs):
        for p, g in zip(params, gs):
            p.grad = mt.tensor(g, dtype=p.dtype, device=p.device).data
        optimizer.step()

    for t in range(5):
        step(ours, opt, grads[t])
    state = opt.state_dict()
    assert state["step_count"] == 5 and state["lr"] == opt.lr
    assert all(isinstance(v, np.ndarray) for k, v in state.items() if k not in ("step_count", "lr"))
    copies = [Parameter(mt.tensor(p.numpy(), device=device).data) for p in ours]

    for t in range(5, 10):
        step(ours, opt, grads[t])

    resumed = make(copies)
    resumed.load_state_dict(state)
    assert resumed.step_count == 5
    for t in range(5, 10):
        step(copies, resumed, grads[t])
    for p, q in zip(ours, copies):
        np.testing.assert_array_equal(p.numpy(), q.numpy())
    assert resumed.step_count == opt.step_count == 10


def test_load_state_dict_checks_keys_and_shapes(rng):
    ours, _ = make_params(rng, "cpu", "float64")
    state = Adam(ours).state_dict()
    missing = {k: v for k, v in state.items() if k != "v.1"}
    with pytest.raises(KeyError, match="v.1"):
        Adam(ours).load_state_dict(missing)
    wrong = dict(state, **{"m.0": np.zeros((7,))})
    with pytest.raises(ValueError, match=r"m\.0.*\(7,\).*\(4, 3\)"):
        Adam(ours).load_state_dict(wrong)


def test_state_dicts_through_np_savez_load_back(rng, tmp_path):
    """np.savez and np.load turn step_count and lr into 0-d arrays: they are the numbers they hold."""
    opt = Adam(make_params(rng, "cpu", "float64")[0], lr=0.25)
    schedule = NoamSchedule(opt, 64, warmup_steps=5)
    for _ in range(3):
        for p in opt.params:
            p.grad = rng.standard_normal(p.shape)
        opt.step()
        schedule.step()
    np.savez(tmp_path / "opt.npz", **opt.state_dict())
    np.savez(tmp_path / "schedule.npz", **schedule.state_dict())
    opt2 = Adam(make_params(rng, "cpu", "float64")[0])
    schedule2 = NoamSchedule(opt2, 64, warmup_steps=5)
    opt2.load_state_dict(dict(np.load(tmp_path / "opt.npz")))
    schedule2.load_state_dict(dict(np.load(tmp_path / "schedule.npz")))
    assert type(opt2.step_count) is int and type(opt2.lr) is float
    assert (opt2.step_count, schedule2.step_count, opt2.lr) == (3, 3, opt.lr)
    for a, b in zip(opt.m + opt.v, opt2.m + opt2.v):
        np.testing.assert_array_equal(a, b)


def test_a_load_missing_many_buffers_names_a_few_and_counts_them(rng):
    ours, _ = make_params(rng, "cpu", "float64")
    state = {k: v for k, v in Adam(ours).state_dict().items() if not k.startswith(("m.", "v."))}
    with pytest.raises(KeyError, match=rf"Adam\.load_state_dict: missing m\.0, m\.1, m\.2, v\.0, … "
                                       rf"\({2 * len(ours)} keys\)"):
        Adam(ours).load_state_dict(state)


def test_schedule_state_must_be_a_mapping(rng):
    schedule = NoamSchedule(Adam(make_params(rng, "cpu", "float64")[0]), 64, warmup_steps=5)
    with pytest.raises(TypeError, match="NoamSchedule.load_state_dict: state must be a mapping.*got int"):
        schedule.load_state_dict(5)
