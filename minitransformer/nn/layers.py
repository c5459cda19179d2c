"""The building blocks of §3.3–3.5: Linear, Embedding, LayerNorm, Dropout, the position-wise
feed-forward network and the positional encodings. Each one is a thin owner of parameters
around an op in ``functional``; the gradients live there."""
import math

import numpy as np

from .. import backend
from .. import functional as F
from ..functional.dropout import check_p
from .module import Module, Parameter


def xavier_uniform(fan_out, fan_in, dtype=None):
    """Glorot & Bengio (2010): U(-a, a) with a = √(6 / (fan_in + fan_out)), drawn on the host so
    that a model starts from the same numbers on every device."""
    a = math.sqrt(6.0 / (fan_in + fan_out))
    w = backend.generator("cpu").uniform(-a, a, size=(fan_out, fan_in))
    return w.astype(dtype or backend.get_default_dtype())


def normal(shape, std, dtype=None):
    return (backend.generator("cpu").standard_normal(shape) * std).astype(dtype or backend.get_default_dtype())


class Linear(Module):
    """``y = x Wᵀ + b``, ``W`` of shape ``(out_features, in_features)``, Xavier-uniform, ``b = 0``."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(xavier_uniform(out_features, in_features))
        self.bias = Parameter(np.zeros(out_features, backend.get_default_dtype())) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table of ``num_embeddings`` vectors of size ``d``, initialised N(0, d^-1/2) so
    that after the √d_model scaling of §3.4 the embeddings have unit variance."""

    def __init__(self, num_embeddings, embedding_dim):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(normal((num_embeddings, embedding_dim), embedding_dim ** -0.5))

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Layer normalisation over the last axis with gain ``weight = 1`` and ``bias = 0``."""

    def __init__(self, d_model, eps=1e-5):
        super().__init__()
        self.d_model, self.eps = d_model, eps
        dtype = backend.get_default_dtype()
        self.weight = Parameter(np.ones(d_model, dtype))
        self.bias = Parameter(np.zeros(d_model, dtype))

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.d_model}, eps={self.eps}"


class Dropout(Module):
    """Inverted dropout with rate ``p`` (P_drop), active only in training mode."""

    def __init__(self, p=0.1):
        super().__init__()
        check_p("Dropout", p)
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class PositionwiseFeedForward(Module):
    """§3.3: ``FFN(x) = max(0, x W1 + b1) W2 + b2``, from d_model to d_ff and back."""

    def __init__(self, d_model, d_ff):
        super().__init__()
        self.linear1 = Linear(d_model, d_ff)
        self.linear2 = Linear(d_ff, d_model)

    def forward(self, x):                                    # (B, T, d_model)
        # max(0, x W1 + b1) as one op (only its output stays alive for the backward), then W2, b2
        hidden = F.linear_relu(x, self.linear1.weight, self.linear1.bias)    # (B, T, d_ff)
        return self.linear2(hidden)                                           # (B, T, d_model)


def sinusoid_table(max_len, d_model):
    """§3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(…)."""
    position = np.arange(max_len)[:, None]
    div = np.exp(np.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    table = np.zeros((max_len, d_model))
    table[:, 0::2] = np.sin(position * div)
    table[:, 1::2] = np.cos(position * div)[:, : d_model // 2]
    return table


class PositionalEncoding(Module):
    """Adds position information to the (scaled) embeddings, then dropout (§3.5, §5.4).

    ``learned=False`` is the paper's sinusoid; ``learned=True`` is the learned-embedding
    variant of Table 3 row (E). ``offset`` is the first position (decoding step by step): an int,
    or a 0-d integer array on the model's device.
    """

    def __init__(self, d_model, max_len=512, dropout=0.1, learned=False):
        super().__init__()
        self.d_model, self.max_len, self.learned = d_model, max_len, learned
        dtype = backend.get_default_dtype()
        if learned:
            self.weight = Parameter(normal((max_len, d_model), d_model ** -0.5))
        else:
            self.register_buffer("pe", sinusoid_table(max_len, d_model).astype(dtype))
        self.dropout = Dropout(dropout)

    def forward(self, x, offset=0):                          # (B, T, d_model)
        T = x.shape[1]
        if backend.is_array(offset):
            # a position held on the device (a fixed-size decoding cache, which checks its length
            # against max_len once): looked up by index, so a captured step reads it at every replay
            positions = F.embedding(offset.reshape(1) + backend.get_array_module(offset).arange(T),
                                    self.weight if self.learned else self.pe)
            return self.dropout(x + positions)
        if offset + T > self.max_len:
            raise ValueError(f"PositionalEncoding: positions up to {offset + T} requested but "
                             f"max_len is {self.max_len}; build the model with a larger max_len")
        if self.learned:
            positions = F.embedding(np.arange(offset, offset + T), self.weight)
        else:
            positions = self.pe[offset:offset + T]
        return self.dropout(x + positions)

    def extra_repr(self):
        return f"{self.d_model}, max_len={self.max_len}, learned={self.learned}"
