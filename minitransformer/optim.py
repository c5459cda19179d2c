"""The training recipe of §5.3: Adam with β1 = 0.9, β2 = 0.98, ε = 1e-9 and the learning-rate
schedule ``lrate = d_model^-0.5 · min(step^-0.5, step · warmup_steps^-1.5)``; plus SGD and
gradient-norm clipping. Updates happen in place on ``Parameter.data`` and build no graph."""
import math
import numbers
from collections.abc import Mapping

from . import backend, kernels
from .nn.module import Module
from .tensor import Tensor, check_int


def _as_list(owner, params):
    """``params`` listed once (a generator is spent after one pass), or a TypeError naming what came
    instead: a single tensor would be iterated row by row, and no step updates its rows."""
    expected = f"{owner}: params must be an iterable of tensors (e.g. model.parameters())"
    if isinstance(params, Tensor):
        raise TypeError(f"{expected}, got a single {type(params).__name__}; pass [p]")
    if isinstance(params, Module):
        raise TypeError(f"{expected}, got the module {type(params).__name__}; pass model.parameters()")
    try:
        return list(params)
    except TypeError:
        raise TypeError(f"{expected}, got {type(params).__name__}") from None


def _scalar(value):
    """A 0-d array (a state dict through ``np.savez`` and ``np.load``) as the Python number it holds."""
    return value.item() if getattr(value, "ndim", None) == 0 else value


def _check_number(owner, name, value, ok, expected):
    """A finite real ``value`` with ``ok(value)``, else an error saying what ``name`` must be."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}")
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{owner}: {name} must be {expected}, got {value}")


class Optimizer:
    def __init__(self, params, lr):
        name = type(self).__name__
        self.params = _as_list(name, params)
        if not self.params:
            raise ValueError(f"{name}: got an empty parameter list")
        first = {}                      # id -> first index: a repeated tensor would be updated twice a step
        for i, p in enumerate(self.params):
            if not isinstance(p, Tensor):
                if isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], Tensor):
                    raise TypeError(f"{name}: params must be tensors, got (name, tensor) pairs ({p[0]!r}); "
                                    "pass model.parameters(), not model.named_parameters()")
                raise TypeError(f"{name}: params must be tensors, got a {type(p).__name__} at index {i}")
            j = first.setdefault(id(p), i)
            if j != i:
                raise ValueError(f"{name}: params[{i}] is the same tensor as params[{j}] (shape {p.shape}); "
                                 "each parameter may appear once")
        _check_number(name, "lr", lr, lambda x: x >= 0, "a finite number >= 0")
        self.lr = lr
        self.step_count = 0

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def state_dict(self):
        """Plain arrays and numbers: the ``step_count``, ``lr`` and per-parameter buffers."""
        state = {"step_count": self.step_count, "lr": self.lr}
        for name, buffers in self._buffers().items():
            for i, array in enumerate(buffers):
                state[f"{name}.{i}"] = backend.to_numpy(array).copy()  # a snapshot: step() updates in place
        return state

    def load_state_dict(self, state):
        """``state_dict()``'s values back. Every key, type and shape is checked before anything is
        assigned: a load that fails leaves the optimizer as it was."""
        op = f"{type(self).__name__}.load_state_dict"
        buffers = self._buffers()
        keys = ["step_count", "lr", *(f"{name}.{i}" for name in buffers for i in range(len(self.params)))]
        missing = [key for key in keys if key not in state]
        if missing:    # an optimizer over another model misses hundreds: the first few say enough
            raise KeyError(f"{op}: missing {', '.join(missing[:4])}"
                           + (f", … ({len(missing)} keys)" if len(missing) > 4 else ""))
        step_count, lr = _scalar(state["step_count"]), _scalar(state["lr"])
        check_int(op, "step_count", step_count, 0)
        _check_number(op, "lr", lr, lambda x: x >= 0, "a finite number >= 0")
        for name in buffers:
            for i, p in enumerate(self.params):
                shape = tuple(state[f"{name}.{i}"].shape)
                if shape != p.shape:
                    raise ValueError(f"{op}: {name}.{i} has shape {shape}, expected {p.shape}")
        for name, arrays in buffers.items():
            for i, p in enumerate(self.params):
                arrays[i] = backend.to_device(state[f"{name}.{i}"].astype(p.dtype), p.device)
        self.step_count, self.lr = int(step_count), float(lr)

    def _buffers(self):
        return {}


class SGD(Optimizer):
    """``v = μ v + g``; ``p -= lr · v`` (plain SGD when ``momentum = 0``)."""

    def __init__(self, params, lr, momentum=0.0):
        super().__init__(params, lr)
        _check_number("SGD", "momentum", momentum, lambda m: m >= 0, "a finite number >= 0")
        self.momentum = momentum
        self.velocity = [p.xp.zeros_like(p.data) for p in self.params] if momentum else []

    def _buffers(self):
        return {"velocity": self.velocity} if self.momentum else {}

    def step(self):
        self.step_count += 1
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            update = p.grad
            if self.momentum:
                self.velocity[i] *= self.momentum
                self.velocity[i] += p.grad
                update = self.velocity[i]
            p.data -= p.dtype.type(self.lr) * update


class Adam(Optimizer):
    """Kingma & Ba (2015), with the paper's defaults (§5.3); the same arithmetic as PyTorch's:

    ``m = β1 m + (1-β1) g``, ``v = β2 v + (1-β2) g²``,
    ``p -= lr / (1-β1^t) · m / (√v / √(1-β2^t) + ε)``.

    On the GPU every parameter is updated by one kernel launch (``kernels.adam_step``) doing this
    arithmetic in the same order; elsewhere, array expressions per parameter.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.98), eps=1e-9):
        super().__init__(params, lr)
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise TypeError(f"Adam: betas must be a pair (β1, β2), got {betas!r}") from None
        for name, beta in (("betas[0] (β1)", beta1), ("betas[1] (β2)", beta2)):   # β = 1: 1 - β^t = 0 divides
            _check_number("Adam", name, beta, lambda b: 0 <= b < 1, "in [0, 1)")
        _check_number("Adam", "eps", eps, lambda e: e > 0, "a finite number > 0")
        self.betas, self.eps = (beta1, beta2), eps
        self.m = [p.xp.zeros_like(p.data) for p in self.params]
        self.v = [p.xp.zeros_like(p.data) for p in self.params]
        self._plan = None, None

    def _kernel_plan(self):
        """Per parameter: may the one-launch kernel update it (its array, m and v contiguous float
        arrays on the GPU, fused kernels on)? Worked out again only when one of those arrays is
        replaced (``Module.to``, ``load_state_dict``) or the fused switch flips — checking hundreds
        of arrays every step is host time, and a small model's GPU step is bound by host time."""
        arrays = (backend.fused(), *(p.data for p in self.params), *self.m, *self.v)
        held, plan = self._plan
        if held is None or len(held) != len(arrays) or any(a is not b for a, b in zip(arrays, held)):
            plan = [backend.fused(p.data, m, v) and all(a.flags.c_contiguous for a in (p.data, m, v))
                    for p, m, v in zip(self.params, self.m, self.v)]
            self._plan = arrays, plan
        return plan

    def _buffers(self):
        return {"m": self.m, "v": self.v}

    def corrections(self):
        """``(lr / (1-β1^t), √(1-β2^t))`` for the current ``step_count``: the two numbers of a step that
        change with ``t`` (a captured CUDA graph gets them from the host before every replay)."""
        beta1, beta2 = self.betas
        t = self.step_count
        return self.lr / (1 - beta1 ** t), math.sqrt(1 - beta2 ** t)

    def step(self):
        self.step_count += 1
        beta1, beta2 = self.betas
        step_size, sqrt_correction2 = self.corrections()
        fused = {}   # dtype -> quadruples for the one-launch kernel (GPU)
        for p, m, v, planned in zip(self.params, self.m, self.v, self._kernel_plan()):
            g = p.grad
            if g is None:
                continue
            if planned and type(g) is type(p.data) and g.dtype == p.dtype and g.flags.c_contiguous:
                fused.setdefault(p.dtype, []).append((p.data, g, m, v))
                continue
            xp = p.xp
            m *= beta1
            m += (1 - beta1) * g
            v *= beta2
            v += (1 - beta2) * (g * g)
            denom = xp.sqrt(v) / p.dtype.type(sqrt_correction2)
            denom += p.dtype.type(self.eps)
            p.data -= p.dtype.type(step_size) * (m / denom)
        for quads in fused.values():
            kernels.adam_step(*zip(*quads), beta1, beta2, step_size, sqrt_correction2, self.eps)


class NoamSchedule:
    """§5.3: ``lr = factor · d_model^-0.5 · min(step^-0.5, step · warmup_steps^-1.5)``.

    Linear warm-up for ``warmup_steps``, then decay with the inverse square root of the step.
    Call ``step()`` once per optimiser step, *before* ``optimizer.step()``.
    """

    def __init__(self, optimizer, d_model, warmup_steps=4000, factor=1.0):
        if not hasattr(optimizer, "lr"):     # step() writes the rate there
            raise TypeError("NoamSchedule: optimizer must be an optimizer with an `lr` attribute "
                            f"(e.g. optim.Adam(model.parameters())), got {type(optimizer).__name__}")
        check_int("NoamSchedule", "d_model", d_model, 1)       # d_model^-0.5 of a negative is complex
        check_int("NoamSchedule", "warmup_steps", warmup_steps, 1)
        _check_number("NoamSchedule", "factor", factor, lambda f: f >= 0, "a finite number >= 0")
        self.optimizer, self.d_model = optimizer, d_model
        self.warmup_steps, self.factor = warmup_steps, factor
        self.step_count = 0

    def rate(self, step):
        step = max(step, 1)
        return self.factor * self.d_model ** -0.5 * min(step ** -0.5, step * self.warmup_steps ** -1.5)

    def step(self):
        self.step_count += 1
        self.optimizer.lr = self.rate(self.step_count)
        return self.optimizer.lr

    def state_dict(self):
        return {"step_count": self.step_count}

    def check_state_dict(self, state):
        """What ``load_state_dict`` checks, alone: ``load_checkpoint`` asks before it loads anything."""
        op = "NoamSchedule.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{op}: state must be a mapping like state_dict()'s, got {type(state).__name__}")
        if "step_count" not in state:
            raise KeyError(f"{op}: missing step_count")
        check_int(op, "step_count", _scalar(state["step_count"]), 0)

    def load_state_dict(self, state):
        """Checked first: a load that fails leaves the schedule and the optimizer's rate as they were."""
        self.check_state_dict(state)
        self.step_count = int(_scalar(state["step_count"]))
        self.optimizer.lr = self.rate(self.step_count)


def clip_grad_norm(params, max_norm):
    """Scale all gradients so their global L2 norm is at most ``max_norm``; return the norm
    before clipping as a 0-d array on the device (reading it is the only host sync)."""
    params = _as_list("clip_grad_norm", params)   # two passes below: a generator would be spent by the first
    _check_number("clip_grad_norm", "max_norm", max_norm, lambda x: x > 0, "a finite number > 0")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    xp = backend.get_array_module(grads[0])
    total = xp.sqrt(sum((g.astype(xp.float64) ** 2).sum() for g in grads))
    coef = xp.minimum(max_norm / (total + 1e-6), 1.0).astype(grads[0].dtype)
    for p in params:
        if p.grad is not None:
            p.grad = p.grad * coef   # a new array: gradients may be shared, never scale in place
    return total
