"""Layer normalisation (§3.1: ``LayerNorm(x + Sublayer(x))``), over the last axis.

Same semantics as ``torch.nn.functional.layer_norm``: biased variance, ``eps`` inside the root.
docs/backward.md#layernorm.
"""
from .. import backend, kernels
from ..tensor import as_tensor, check_same_device, make_op


def layer_norm(x, weight, bias, eps=1e-5):
    """``y = x̂ * γ + β`` with ``x̂ = (x - μ) * rstd``, ``rstd = 1 / √(σ² + eps)``.

    Backward, with ``dx̂ = g * γ`` and means over the last axis:
    ``dx = rstd * (dx̂ - mean(dx̂) - x̂ * mean(dx̂ * x̂))``, ``dγ = Σ g * x̂``, ``dβ = Σ g``.
    """
    d = x.shape[-1]
    parents = [x]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            p = as_tensor(p)
            if p.shape != (d,):
                raise ValueError(f"layer_norm: {name} must have shape ({d},) for input {x.shape}, got {p.shape}")
            parents.append(p)
    check_same_device("layer_norm", *parents)
    weight = as_tensor(weight) if weight is not None else None
    bias = as_tensor(bias) if bias is not None else None
    xp = x.xp
    if backend.fused(*(p.data for p in parents)) and len({p.dtype for p in parents}) == 1:
        return _fused(x, weight, bias, eps, parents)

    mean = x.data.mean(axis=-1, keepdims=True)
    centered = x.data - mean
    rstd = 1.0 / xp.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)
    x_hat = centered * rstd
    y = x_hat * weight.data if weight is not None else x_hat.copy()
    if bias is not None:
        y += bias.data

    def backward(g):
        dx_hat = g * weight.data if weight is not None else g
        dx = rstd * (dx_hat - dx_hat.mean(axis=-1, keepdims=True)
                     - x_hat * (dx_hat * x_hat).mean(axis=-1, keepdims=True))
        grads = [dx]
        if weight is not None:
            grads.append((g * x_hat).reshape(-1, d).sum(axis=0) if weight.requires_grad else None)
        if bias is not None:
            grads.append(g.reshape(-1, d).sum(axis=0) if bias.requires_grad else None)
        return tuple(grads)
    return make_op(y, tuple(parents), backward, "layer_norm")


def _fused(x, weight, bias, eps, parents):
    """The same op on the GPU: one kernel forward (keeps only mean and rstd per row), one for dx
    and one for the column sums of dγ, dβ."""
    w = weight.data if weight is not None else None
    y, mean, rstd = kernels.layer_norm(x.data, w, bias.data if bias is not None else None, eps)

    def backward(g):
        need = (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
        dx, dw, db = kernels.layer_norm_backward(x.data, g, w, mean, rstd, need_weight_grads=need)
        grads = [dx]
        if weight is not None:
            grads.append(dw if weight.requires_grad else None)
        if bias is not None:
            grads.append(db if bias.requires_grad else None)
        return tuple(grads)
    return make_op(y, tuple(parents), backward, "layer_norm")
