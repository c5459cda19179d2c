"""Matrix products: ``matmul`` (the ``@`` operator) and ``linear`` (every projection in §3).

For ``y = a @ b``: ``da = g @ bᵀ`` and ``db = aᵀ @ g`` (summed over broadcast batch axes).
docs/backward.md#matmul.
"""
from .. import backend, kernels
from ..tensor import as_tensor, check_same_device, make_op, unbroadcast


def _t(array):
    return array.swapaxes(-1, -2)


def matmul(a, b):
    """``a @ b`` over the last two axes, batch axes broadcast; 1-D operands as in NumPy."""
    a, b = as_tensor(a), as_tensor(b)
    check_same_device("matmul", a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: scalars cannot be multiplied with @, got shapes {a.shape} and {b.shape}")
    inner = b.shape[-2] if b.ndim > 1 else b.shape[0]  # checked before 1-D operands are reshaped
    if a.shape[-1] != inner:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not match: "
                         f"a's last axis ({a.shape[-1]}) must equal b's {'second-to-last' if b.ndim > 1 else 'only'} axis ({inner})")
    if a.ndim == 1 and b.ndim == 1:  # a dot product: (n,) @ (n,) -> ()
        return matmul(a.reshape(1, -1), b.reshape(-1, 1)).reshape(())
    if a.ndim == 1:  # a row vector: (n,) @ (..., n, m) -> (..., m)
        return matmul(a.reshape(1, -1), b).reshape(*b.shape[:-2], b.shape[-1])
    if b.ndim == 1:  # a column vector: (..., n) @ (n,) -> (...,)
        return matmul(a, b.reshape(-1, 1)).reshape(*a.shape[:-1])
    try:
        a.xp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: batch axes of {a.shape} and {b.shape} cannot be broadcast") from None

    def backward(g):
        return (unbroadcast(g @ _t(b.data), a.shape) if a.requires_grad else None,
                unbroadcast(_t(a.data) @ g, b.shape) if b.requires_grad else None)
    return make_op(a.data @ b.data, (a, b), backward, "matmul")


def linear(x, weight, bias=None):
    """``y = x Wᵀ + b`` with ``W`` of shape ``(out_features, in_features)`` as in PyTorch.

    Backward (rows of ``x`` flattened to ``(n, in)``): ``dx = g W``, ``dW = gᵀ x``,
    ``db = Σ_rows g`` — one GEMM each, however many leading axes ``x`` has (``kernels.matmul`` is
    ``@``, or our own cuBLAS call while a CUDA graph is captured).
    """
    x, weight = as_tensor(x), as_tensor(weight)
    parents = (x, weight) if bias is None else (x, weight, as_tensor(bias))
    check_same_device("linear", *parents)
    if weight.ndim != 2:
        raise ValueError(f"linear: weight must be 2-D (out_features, in_features), got {weight.shape}")
    out_features, in_features = weight.shape
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ValueError(f"linear: input's last axis must be in_features={in_features} "
                         f"(weight {weight.shape}), got input shape {x.shape}")
    if bias is not None and parents[2].shape != (out_features,):
        raise ValueError(f"linear: bias must have shape ({out_features},), got {parents[2].shape}")

    # Leading axes flattened to one row axis: one GEMM instead of a GEMM per batch element.
    x2 = x.data.reshape(-1, in_features)                                    # (n, in)
    y = kernels.matmul(x2, weight.data.T)                                   # (n, out)
    if bias is not None:
        y += parents[2].data
    y = y.reshape(*x.shape[:-1], out_features)

    def backward(g):
        g2 = g.reshape(-1, out_features)                                    # (n, out)
        dx = kernels.matmul(g2, weight.data).reshape(x.shape) if x.requires_grad else None
        dw = kernels.matmul(g2.T, x2) if weight.requires_grad else None
        if bias is None:
            return dx, dw
        if not parents[2].requires_grad:
            return dx, dw, None
        return dx, dw, kernels.column_sum(g2) if backend.fused(g2) else g2.sum(axis=0)
    return make_op(y, parents, backward, "linear")
