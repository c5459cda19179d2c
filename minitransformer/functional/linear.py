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
    parents = _checked("linear", x, weight, bias)
    x = parents[0]
    out_features = parents[1].shape[0]
    x2, y = _product(x, parents)
    y = y.reshape(*x.shape[:-1], out_features)

    def backward(g):
        return _product_grads(g.reshape(-1, out_features), x, x2, parents)
    return make_op(y, parents, backward, "linear")


def _checked(op, x, weight, bias):
    """``(x, weight[, bias])`` as tensors, checked as ``linear`` needs them."""
    x, weight = as_tensor(x), as_tensor(weight)
    parents = (x, weight) if bias is None else (x, weight, as_tensor(bias))
    check_same_device(op, *parents)
    if x.dtype.kind != "f" or weight.dtype.kind != "f":
        raise TypeError(f"{op}: input and weight must be floating point, got {x.dtype} and {weight.dtype} "
                        "(token ids go through an Embedding first)")
    if weight.ndim != 2:
        raise ValueError(f"{op}: weight must be 2-D (out_features, in_features), got {weight.shape}")
    out_features, in_features = weight.shape
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{op}: input's last axis must be in_features={in_features} "
                         f"(weight {weight.shape}), got input shape {x.shape}")
    if bias is not None and parents[2].shape != (out_features,):
        raise ValueError(f"{op}: bias must have shape ({out_features},), got {parents[2].shape}")
    return parents


def _product(x, parents, add_bias=True):
    """``(x2, y)``: the rows of ``x`` as ``(n, in)`` and ``y = x2 Wᵀ + b`` ``(n, out)`` — leading axes
    flattened to one row axis: one GEMM instead of a GEMM per batch element."""
    weight = parents[1]
    x2 = x.data.reshape(-1, weight.shape[1])                                # (n, in)
    y = kernels.matmul(x2, weight.data.T)                                   # (n, out)
    if len(parents) == 3 and add_bias:
        y += parents[2].data
    return x2, y


def _product_grads(g2, x, x2, parents):
    """``(dx, dW[, db])`` of ``_product`` for its output's gradient ``g2`` ``(n, out)``."""
    weight = parents[1]
    dx = kernels.matmul(g2, weight.data).reshape(x.shape) if x.requires_grad else None
    dw = kernels.matmul(g2.T, x2) if weight.requires_grad else None
    if len(parents) == 2:
        return dx, dw
    if not parents[2].requires_grad:
        return dx, dw, None
    return dx, dw, kernels.column_sum(g2) if backend.fused(g2) else g2.sum(axis=0)


def linear_relu(x, weight, bias=None):
    """``max(0, x Wᵀ + b)`` — the inner term of §3.3's ``FFN(x) = max(0, x W1 + b1) W2 + b2`` — as one
    op: the numbers of ``relu(linear(x, W, b))``, but only the ReLU's output stays alive for the
    backward (its backward needs nothing else), not also the ``(…, d_ff)`` product before it; on the
    GPU the bias and the ReLU are one kernel.

    Backward: ``dy = g * [y > 0]``, then ``linear``'s ``dx = dy W``, ``dW = dyᵀ x``, ``db = Σ_rows dy``.
    """
    parents = _checked("linear_relu", x, weight, bias)
    x = parents[0]
    out_features = parents[1].shape[0]
    # one dtype: the kernel reads the bias as the product's type (float32 W under float64 x is promoted)
    fused = backend.fused(*(p.data for p in parents)) and len({p.dtype for p in parents}) == 1
    x2, y = _product(x, parents, add_bias=not fused)            # y is a fresh array: ReLU in place
    if fused and bias is not None:
        kernels.bias_relu(y, parents[2].data)
    elif fused:
        y = kernels.relu(y)
    else:
        x.xp.maximum(y, 0, out=y)

    def backward(g):
        g2 = g.reshape(-1, out_features)
        dy = kernels.relu_backward(y, g2) if fused else g2 * (y > 0)
        return _product_grads(dy, x, x2, parents)
    return make_op(y.reshape(*x.shape[:-1], out_features), parents, backward, "linear_relu")


def linear_heads(x, weight, bias, n, num_heads):
    """``linear(x, W, b)`` for ``x`` ``(B, L, d)``, its output laid out as heads ``(n, B, h, L, d_k)``
    (``W`` stacks ``n`` projections of ``h · d_k`` rows each: multi-head attention's Q, K and V by
    one product, ``nn/attention.py``). The numbers of ``linear``, ``reshape``, ``transpose`` and a
    contiguous copy in a row, but one op: only the heads stay alive for the backward, not also the
    ``(B, L, n·h·d_k)`` product they were copied from (one more activation of that size per layer).

    Backward: ``g`` laid back out as ``(B·L, n·h·d_k)`` (one copy), then ``linear``'s products.
    """
    op = "linear_heads"
    parents = _checked(op, x, weight, bias)
    x = parents[0]
    out_features = parents[1].shape[0]
    if x.ndim != 3:
        raise ValueError(f"{op}: input must be (B, L, d), got shape {x.shape}")
    if n < 1 or num_heads < 1 or out_features % (n * num_heads):
        raise ValueError(f"{op}: weight's {out_features} rows are not {n} projections of {num_heads} "
                         f"heads each")
    B, L, _ = x.shape
    d_k = out_features // (n * num_heads)
    x2, y = _product(x, parents)
    heads = x.xp.ascontiguousarray(y.reshape(B, L, n, num_heads, d_k).transpose(2, 0, 3, 1, 4))

    def backward(g):
        g2 = x.xp.ascontiguousarray(g.transpose(1, 3, 0, 2, 4)).reshape(B * L, out_features)
        return _product_grads(g2, x, x2, parents)
    return make_op(heads, parents, backward, op)
