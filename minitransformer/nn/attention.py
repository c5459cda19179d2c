"""Multi-head attention (§3.2.2).

    MultiHead(Q, K, V) = Concat(head_1, …, head_h) W^O,  head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

The h heads are computed at once: ``q_proj`` maps d_model to h·d_k, which is reshaped to
``(B, h, L, d_k)``. The fused scaled dot-product attention (``functional/attention.py``) does
the rest, and the weights of the last call are kept at ``.attention_weights`` for plotting.
"""
from .. import functional as F
from ..tensor import Tensor
from .layers import Linear
from .module import Module


class MultiHeadAttention(Module):
    def __init__(self, d_model, num_heads, dropout=0.0):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"MultiHeadAttention: d_model={d_model} is not divisible by num_heads={num_heads}")
        self.d_model, self.num_heads, self.d_k = d_model, num_heads, d_model // num_heads
        self.dropout = dropout
        self.q_proj = Linear(d_model, d_model)
        self.k_proj = Linear(d_model, d_model)
        self.v_proj = Linear(d_model, d_model)
        self.out_proj = Linear(d_model, d_model)
        self.attention_weights = None   # (B, h, Lq, Lk) of the last forward, before dropout

    def split_heads(self, x):            # (B, L, d_model) -> (B, h, L, d_k)
        B, L, _ = x.shape
        return x.reshape(B, L, self.num_heads, self.d_k).transpose(0, 2, 1, 3)

    def merge_heads(self, x):            # (B, h, L, d_k) -> (B, L, d_model)
        B, _, L, _ = x.shape
        return x.transpose(0, 2, 1, 3).reshape(B, L, self.d_model)

    def keys_values(self, key, value):
        """``K = key W^K``, ``V = value W^V`` split into heads: ``(B, h, Lk, d_k)`` each."""
        return self.split_heads(self.k_proj(key)), self.split_heads(self.v_proj(value))

    def forward(self, query, key, value, mask=None, cache=None, static_kv=False):
        """``query (B, Lq, d_model)``, ``key``/``value (B, Lk, d_model)``; ``mask`` boolean,
        True = may attend, broadcastable to ``(B, h, Lq, Lk)``.

        ``cache`` (a dict, decoding only) keeps this layer's keys and values: with
        ``static_kv=True`` (cross-attention) they are computed from the encoder output once and
        reused; otherwise (decoder self-attention) each step's new keys and values are appended,
        or, in a fixed-size cache (``Transformer.new_cache(batch, max_len)``), written in place
        at the step's position (``cache["at"]``, on the device) of preallocated ``(B, h, max_len, d_k)``
        buffers.
        """
        if query.shape[-1] != self.d_model:
            raise ValueError(f"MultiHeadAttention: query's last axis must be d_model={self.d_model}, "
                             f"got shape {query.shape}")
        q = self.split_heads(self.q_proj(query))
        if cache is not None and static_kv and "k" in cache:
            k, v = cache["k"], cache["v"]
        elif cache is not None and "at" in cache:        # fixed size: same buffers every step
            k, v = self.keys_values(key, value)
            cache["k"][:, :, cache["at"]], cache["v"][:, :, cache["at"]] = k.data, v.data
            k, v = Tensor(cache["k"]), Tensor(cache["v"])
        else:
            k, v = self.keys_values(key, value)
            if cache is not None:
                if "k" in cache and not static_kv:
                    k = F.concat([cache["k"], k], axis=2)
                    v = F.concat([cache["v"], v], axis=2)
                cache["k"], cache["v"] = k, v
        out, weights = F.scaled_dot_product_attention(
            q, k, v, mask=mask, dropout_p=self.dropout, training=self.training)
        self.attention_weights = weights
        return self.out_proj(self.merge_heads(out))

    def extra_repr(self):
        return f"d_model={self.d_model}, num_heads={self.num_heads}, dropout={self.dropout}"
