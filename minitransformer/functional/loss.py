"""Cross-entropy with label smoothing (§5.4, ``eps_ls``), fused with its log-softmax.

Same definition as ``torch.nn.functional.cross_entropy``: the target distribution is
``q = (1 - eps_ls) * onehot(t) + eps_ls / C`` and the loss is ``-Σ_c q_c log p_c``, averaged over
the targets that are not ``ignore_index``. docs/backward.md#cross-entropy.
"""

from .. import backend, kernels
from ..tensor import as_tensor, make_op
from .embedding import check_ids, id_array


def cross_entropy(logits, target, ignore_index=None, label_smoothing=0.0):
    """Mean label-smoothed cross-entropy of ``logits (N, C)`` against class ids ``target (N,)``.

    Backward (fused): ``dlogits = g * (softmax(logits) - q) / n`` on counted rows, 0 on ignored
    ones, with ``n`` the number of counted rows. A batch whose every target is ignored gives a
    loss of 0 (PyTorch gives nan) so that it cannot poison training.
    """
    logits = as_tensor(logits)
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (N, C), got shape {logits.shape}")
    if logits.dtype.kind != "f":
        raise TypeError(f"cross_entropy: logits must be floating point, got {logits.dtype}")
    N, C = logits.shape
    target = id_array("cross_entropy", target, logits, what="target")
    if target.shape != (N,):
        raise ValueError(f"cross_entropy: target must have shape ({N},) to match logits {logits.shape}, "
                         f"got {target.shape}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    xp_t = backend.get_array_module(target)
    counted = target != ignore_index if ignore_index is not None else xp_t.ones(N, dtype=bool)
    if not backend.capturing():        # boolean indexing waits for the GPU; a capture checks on the host
        check_ids("cross_entropy", target[counted], C, what="target")
    target = backend.to_device(xp_t.where(counted, target, 0), logits.device)
    counted = backend.to_device(counted, logits.device)

    xp, dtype = logits.xp, logits.dtype
    weight = counted.astype(dtype)
    n = xp.maximum(weight.sum(), 1)                                            # stays on the device
    if backend.fused(logits.data):
        return _fused(logits, target, weight, n, label_smoothing)

    # log p_c = shifted_c - log Σ exp(shifted): the two sums the loss needs are read off ``shifted``
    # before it becomes the softmax in place, so no (N, C) log p array is made
    shifted = logits.data - logits.data.max(axis=1, keepdims=True)            # (N, C)
    rows = xp.arange(N)
    picked, mean = shifted[rows, target], shifted.mean(axis=1)
    p = xp.exp(shifted, out=shifted)
    total = p.sum(axis=1, keepdims=True)
    p /= total                                                                 # softmax, kept for backward
    log_total = xp.log(total[:, 0])
    nll = log_total - picked                                                   # -log p_t
    smooth = log_total - mean                                                  # -Σ_c log p_c / C
    per_row = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    loss = (per_row * weight).sum() / n

    def backward(g):
        dlogits = p - dtype.type(label_smoothing / C)
        dlogits[rows, target] -= 1.0 - label_smoothing
        dlogits *= (weight * (g / n))[:, None]
        return (dlogits,)
    return make_op(loss.astype(dtype), (logits,), backward, "cross_entropy")


def _fused(logits, target, weight, n, label_smoothing):
    """The same op on the GPU: the forward reads the logits once per pass and keeps only
    ``lse = log Σ exp`` per row; the backward recomputes the softmax from it (no (N, C) array is
    kept between forward and backward)."""
    per_row, lse = kernels.cross_entropy(logits.data, target, label_smoothing)
    loss = (per_row * weight).sum() / n

    def backward(g):
        return (kernels.cross_entropy_backward(logits.data, target, lse, weight * (g / n), label_smoothing),)
    return make_op(loss.astype(logits.dtype), (logits,), backward, "cross_entropy")
