"""A PyTorch twin of ``minitransformer.nn.Transformer``: the reference for parity tests and speed
comparisons. It imports only torch and NumPy (never ``minitransformer``), so it can sit beside
our model in a test without sharing a line of its numerics.

Same architecture, same parameter *names* (``twin.named_parameters()`` keys equal
``dict(ours.named_parameters())`` keys, in the same order), same masks and the same arithmetic
order where it matters for rounding:

* §3.1 sublayers: post-LN ``LayerNorm(x + Dropout(Sublayer(x)))``, or with ``norm_first`` the pre-LN
  ``x + Dropout(Sublayer(LayerNorm(x)))`` and a final LayerNorm per stack.
* §3.2 attention written out (``softmax(Q Kᵀ · 1/√d_k)`` with masked scores at -∞, dropout on the
  probabilities) rather than ``F.scaled_dot_product_attention``, whose math backend scales Q and K
  by ``d_k^-1/4`` each and so rounds differently from ours. A query row with every key masked
  attends to nothing (output 0), as ours does.
* §3.3 FFN ``linear2(relu(linear1(x)))``, no inner dropout.
* §3.4 one embedding matrix, scaled by √d_model, tied with the pre-softmax projection
  (``share_embeddings``); §3.5 the sinusoid (or a learned table) + dropout.

    twin = TorchTransformer.from_ours(ours)            # same config, dtype and weights
    loss = batch_loss(twin, src, tgt_in, tgt_out, label_smoothing=0.1)
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TORCH_DTYPES = {np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64}


def sinusoid_table(max_len, d_model):
    """§3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(…) (as ours, in NumPy)."""
    position = np.arange(max_len)[:, None]
    div = np.exp(np.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    table = np.zeros((max_len, d_model))
    table[:, 0::2] = np.sin(position * div)
    table[:, 1::2] = np.cos(position * div)[:, : d_model // 2]
    return table


def padding_mask(ids, pad_id):
    """``(B, L)`` -> ``(B, 1, 1, L)``: True where the key is a real token."""
    return (ids != pad_id)[:, None, None, :]


def causal_mask(T, device=None):
    """``(T, T)``: position i may attend to positions ≤ i."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def attention(q, k, v, mask=None, dropout_p=0.0, training=False):
    """``softmax(Q Kᵀ / √d_k) V`` with a boolean mask (True = may attend); returns (out, weights)."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))   # (…, Lq, Lk)
    if mask is not None:
        mask = mask.expand_as(scores)
        scores = scores.masked_fill(~mask, float("-inf"))
        anything = mask.any(dim=-1, keepdim=True)                         # rows with a key to see
        scores = scores.masked_fill(~anything, 0.0)                       # no -inf - -inf = nan
        weights = torch.softmax(scores, dim=-1) * anything                # fully masked rows -> 0
    else:
        weights = torch.softmax(scores, dim=-1)
    return F.dropout(weights, dropout_p, training) @ v, weights


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, num_heads, dropout=0.0):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"MultiHeadAttention: d_model={d_model} is not divisible by "
                             f"num_heads={num_heads}")
        self.d_model, self.num_heads, self.d_k = d_model, num_heads, d_model // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split_heads(self, x):            # (B, L, d_model) -> (B, h, L, d_k)
        B, L, _ = x.shape
        return x.reshape(B, L, self.num_heads, self.d_k).transpose(1, 2)

    def forward(self, query, key, value, mask=None):
        q = self.split_heads(self.q_proj(query))
        k = self.split_heads(self.k_proj(key))
        v = self.split_heads(self.v_proj(value))
        out, _ = attention(q, k, v, mask, self.dropout, self.training)
        B, _, L, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, L, self.d_model))


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.linear2(torch.relu(self.linear1(x)))


class PositionalEncoding(nn.Module):
    def __init__(self, d_model, max_len=512, dropout=0.1, learned=False):
        super().__init__()
        self.learned = learned
        if learned:
            self.weight = nn.Parameter(torch.randn(max_len, d_model) * d_model ** -0.5)
        else:
            self.register_buffer("pe", torch.from_numpy(sinusoid_table(max_len, d_model)), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, offset=0):
        T = x.shape[1]
        table = self.weight if self.learned else self.pe.to(x.dtype)
        return self.dropout(x + table[offset:offset + T])


class EncoderLayer(nn.Module):
    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff)
        self.norm1, self.norm2 = nn.LayerNorm(d_model, eps=1e-5), nn.LayerNorm(d_model, eps=1e-5)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, src_mask):
        if self.norm_first:
            h = self.norm1(x)
            x = x + self.dropout(self.self_attn(h, h, h, src_mask))
            return x + self.dropout(self.feed_forward(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.self_attn(x, x, x, src_mask)))
        return self.norm2(x + self.dropout(self.feed_forward(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.cross_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model, eps=1e-5) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, y, memory, tgt_mask, src_mask):
        if self.norm_first:
            h = self.norm1(y)
            y = y + self.dropout(self.self_attn(h, h, h, tgt_mask))
            h = self.norm2(y)
            y = y + self.dropout(self.cross_attn(h, memory, memory, src_mask))
            return y + self.dropout(self.feed_forward(self.norm3(y)))
        y = self.norm1(y + self.dropout(self.self_attn(y, y, y, tgt_mask)))
        y = self.norm2(y + self.dropout(self.cross_attn(y, memory, memory, src_mask)))
        return self.norm3(y + self.dropout(self.feed_forward(y)))


class Encoder(nn.Module):
    def __init__(self, num_layers, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, num_heads, d_ff, dropout, norm_first)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model, eps=1e-5) if norm_first else None

    def forward(self, x, src_mask):
        for layer in self.layers:
            x = layer(x, src_mask)
        return self.norm(x) if self.norm is not None else x


class Decoder(nn.Module):
    def __init__(self, num_layers, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, num_heads, d_ff, dropout, norm_first)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model, eps=1e-5) if norm_first else None

    def forward(self, y, memory, tgt_mask, src_mask):
        for layer in self.layers:
            y = layer(y, memory, tgt_mask, src_mask)
        return self.norm(y) if self.norm is not None else y


class TorchTransformer(nn.Module):
    """``twin(src_ids (B, S), tgt_in_ids (B, T))`` -> logits ``(B, T, vocab)``, as ours."""

    def __init__(self, vocab_size, d_model=512, num_heads=8, num_layers=6, d_ff=2048, dropout=0.1,
                 pad_id=0, max_len=512, norm_first=False, share_embeddings=True, learned_positions=False):
        super().__init__()
        self.d_model, self.pad_id, self.vocab_size = d_model, pad_id, vocab_size
        self.embedding = nn.Embedding(vocab_size, d_model)
        if share_embeddings:
            self.tgt_embedding, self.generator = None, None
        else:
            self.tgt_embedding = nn.Embedding(vocab_size, d_model)
            self.generator = nn.Linear(d_model, vocab_size, bias=False)
        self.positional_encoding = PositionalEncoding(d_model, max_len, dropout, learned_positions)
        self.encoder = Encoder(num_layers, d_model, num_heads, d_ff, dropout, norm_first)
        self.decoder = Decoder(num_layers, d_model, num_heads, d_ff, dropout, norm_first)

    @classmethod
    def from_ours(cls, ours):
        """A twin of a ``minitransformer`` model: same config, same dtype, weights copied."""
        config = ours.config
        config = config if isinstance(config, dict) else vars(config)
        twin = cls(**config)
        dtype = next(iter(ours.state_dict().values())).dtype
        twin.to(TORCH_DTYPES[np.dtype(dtype)])
        twin.copy_weights_from(ours)
        return twin

    def copy_weights_from(self, ours):
        """Copy every parameter from ``ours.state_dict()`` (host NumPy arrays), checking names and
        shapes; values are cast to this twin's dtype."""
        state = ours.state_dict() if hasattr(ours, "state_dict") else ours
        mine = dict(self.named_parameters())
        missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        if missing or unexpected:
            raise KeyError(f"copy_weights_from: names differ: twin only {missing}, ours only {unexpected}")
        with torch.no_grad():
            for name, p in mine.items():
                value = torch.from_numpy(np.ascontiguousarray(state[name]))
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"copy_weights_from: {name} has shape {tuple(value.shape)} in ours, "
                                     f"{tuple(p.shape)} in the twin")
                p.copy_(value.to(p.dtype))
        return self

    def embed(self, ids, embedding, offset=0):
        return self.positional_encoding(embedding(ids) * math.sqrt(self.d_model), offset)

    def encode(self, src):
        src_mask = padding_mask(src, self.pad_id)
        return self.encoder(self.embed(src, self.embedding), src_mask), src_mask

    def decode(self, tgt, memory, src_mask):
        tgt_mask = causal_mask(tgt.shape[1], tgt.device)[None, None] & padding_mask(tgt, self.pad_id)
        y = self.decoder(self.embed(tgt, self.tgt_embedding or self.embedding), memory, tgt_mask, src_mask)
        if self.generator is not None:
            return self.generator(y)
        return F.linear(y, self.embedding.weight)             # tied pre-softmax projection (§3.4)

    def forward(self, src, tgt_in):
        src, tgt_in = as_ids(src), as_ids(tgt_in)
        memory, src_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_mask)


def as_ids(ids, device=None):
    """NumPy / list / tensor ids -> an int64 torch tensor."""
    if isinstance(ids, torch.Tensor):
        return ids.to(device=device, dtype=torch.long) if device is not None else ids.long()
    return torch.as_tensor(np.asarray(ids), dtype=torch.long, device=device)


def batch_loss(model, src, tgt_in, tgt_out, label_smoothing=0.0):
    """Label-smoothed cross-entropy, mean over the non-pad target tokens (as ``mt.train.batch_loss``)."""
    device = model.embedding.weight.device
    logits = model(as_ids(src, device), as_ids(tgt_in, device))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), as_ids(tgt_out, device).reshape(-1),
                           ignore_index=model.pad_id, label_smoothing=label_smoothing)


def make_optimizer(model, betas=(0.9, 0.98), eps=1e-9):
    """§5.3: Adam with β1 = 0.9, β2 = 0.98, ε = 1e-9; the lr is set by ``noam_rate`` every step."""
    return torch.optim.Adam(model.parameters(), lr=0.0, betas=betas, eps=eps)


def noam_rate(step, d_model, warmup_steps=4000, factor=1.0):
    """§5.3: ``factor · d_model^-0.5 · min(step^-0.5, step · warmup_steps^-1.5)`` (step ≥ 1)."""
    step = max(step, 1)
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup_steps ** -1.5)


def train_step(model, optimizer, step, src, tgt_in, tgt_out, label_smoothing=0.1, warmup_steps=4000,
               factor=1.0, clip_norm=None):
    """Update number ``step`` (1-based), as ``mt.train.train_step``: loss, backward, optional
    clipping, lr = ``noam_rate(step)``, Adam. Returns the loss (a detached 0-d tensor)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = batch_loss(model, src, tgt_in, tgt_out, label_smoothing)
    loss.backward()
    if clip_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    lr = noam_rate(step, model.d_model, warmup_steps, factor)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss.detach()
