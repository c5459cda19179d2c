"""Check an analytic gradient against central finite differences, in float64.

For a random projection ``r`` of the output, ``L(x) = Σ fn(x) * r`` is a scalar whose gradient
``dL/dx`` is exactly what ``backward(r)`` computes; central differences
``(L(x + eps e_i) - L(x - eps e_i)) / 2 eps`` estimate it element by element.
"""
import numpy as np

from . import backend
from .tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    """The analytic and numerical gradients disagree; the message says where and by how much."""


def gradcheck(fn, *inputs, eps=1e-6, atol=1e-5, rtol=1e-3, seed=0):
    """Raise ``GradcheckError`` unless ``fn``'s gradient w.r.t. every input that requires grad
    matches central differences: ``|analytic - numeric| <= atol + rtol * |numeric|``.

    ``fn`` takes the tensors in ``inputs`` and returns a Tensor (or a tuple whose first item is
    one, like ``scaled_dot_product_attention``). Inputs must be float64 — float32 round-off is
    larger than the differences being measured. Returns True when every gradient agrees.
    """
    checked = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True, nothing to check")
    for t in checked:
        if t.dtype != np.float64:
            raise TypeError(f"gradcheck: inputs must be float64 (mt.tensor(..., dtype='float64')), got {t.dtype}")

    def output(*args):
        out = fn(*args)
        return out[0] if isinstance(out, (tuple, list)) else out

    out = output(*inputs)
    op = out.op or getattr(fn, "__name__", "fn")
    r = backend.to_device(np.random.default_rng(seed).standard_normal(out.shape), out.device)
    for t in checked:
        t.grad = None
    out.backward(r)
    analytic = [backend.to_numpy(t.grad) if t.grad is not None else np.zeros(t.shape) for t in checked]

    with no_grad():
        for t, grad in zip(checked, analytic):
            flat = t.data.reshape(-1)   # a view: perturb in place, then restore
            numeric = np.empty(t.size)
            for i in range(t.size):
                original = flat[i].item()
                flat[i] = original + eps
                plus = float((output(*inputs).data * r).sum())
                flat[i] = original - eps
                minus = float((output(*inputs).data * r).sum())
                flat[i] = original
                numeric[i] = (plus - minus) / (2 * eps)
            numeric = numeric.reshape(t.shape)
            error = np.abs(grad - numeric) - (atol + rtol * np.abs(numeric))
            if (error > 0).any():
                worst = np.unravel_index(np.argmax(error), t.shape)
                position = next(i for i, x in enumerate(inputs) if x is t)  # not .index: == is elementwise
                raise GradcheckError(
                    f"gradcheck failed for {op}: input {position} (shape {t.shape}) at index "
                    f"{tuple(int(i) for i in worst)}: analytic {grad[worst]:.8g} vs numeric "
                    f"{numeric[worst]:.8g} (atol={atol}, rtol={rtol}); "
                    f"{int((error > 0).sum())} of {t.size} elements disagree")
    return True
