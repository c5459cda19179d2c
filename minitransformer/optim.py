"""The training recipe of §5.3: Adam with β1 = 0.9, β2 = 0.98, ε = 1e-9 and the learning-rate
schedule ``lrate = d_model^-0.5 · min(step^-0.5, step · warmup_steps^-1.5)``; plus SGD and
gradient-norm clipping. Updates happen in place on ``Parameter.data`` and build no graph."""
import math

from . import backend, kernels


class Optimizer:
    def __init__(self, params, lr):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        if lr < 0:
            raise ValueError(f"{type(self).__name__}: lr must be >= 0, got {lr}")
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
        self.step_count, self.lr = int(state["step_count"]), float(state["lr"])
        for name, buffers in self._buffers().items():
            for i, p in enumerate(self.params):
                key = f"{name}.{i}"
                if key not in state:
                    raise KeyError(f"{type(self).__name__}.load_state_dict: missing {key}")
                if tuple(state[key].shape) != p.shape:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {key} has shape "
                                     f"{tuple(state[key].shape)}, expected {p.shape}")
                buffers[i] = backend.to_device(state[key].astype(p.dtype), p.device)

    def _buffers(self):
        return {}


class SGD(Optimizer):
    """``v = μ v + g``; ``p -= lr · v`` (plain SGD when ``momentum = 0``)."""

    def __init__(self, params, lr, momentum=0.0):
        super().__init__(params, lr)
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
        self.betas, self.eps = betas, eps
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
        if warmup_steps <= 0:
            raise ValueError(f"NoamSchedule: warmup_steps must be positive, got {warmup_steps}")
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

    def load_state_dict(self, state):
        self.step_count = int(state["step_count"])
        self.optimizer.lr = self.rate(self.step_count)


def clip_grad_norm(params, max_norm):
    """Scale all gradients so their global L2 norm is at most ``max_norm``; return the norm
    before clipping as a 0-d array on the device (reading it is the only host sync)."""
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
