"""Multi-head attention (§3.2.2).

    MultiHead(Q, K, V) = Concat(head_1, …, head_h) W^O,  head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

The h heads are computed at once: ``q_proj`` maps d_model to h·d_k, which is reshaped to
``(B, h, L, d_k)``. The fused scaled dot-product attention (``functional/attention.py``) does
the rest, and the weights of the last call are kept at ``.attention_weights`` for plotting.

W^Q, W^K and W^V are three parameters (``q_proj``, ``k_proj``, ``v_proj``, each with its own
``.grad``), but they live side by side in one buffer (``module.pack``): in self-attention, where
Q, K and V are projections of the same input, one product ``x [W^Q; W^K; W^V]ᵀ`` computes all
three (in cross-attention one product gives K and V of the encoder output). Fewer, larger
products: on a GPU a small model's step is bound by the number of launches.
"""
from .. import functional as F
from ..tensor import Tensor
from .layers import Linear
from .module import Module, pack


class MultiHeadAttention(Module):
    one_product = True   # False: Q, K, V by three products always (to compare; same numbers to rounding)

    def __init__(self, d_model, num_heads, dropout=0.0):
        super().__init__()
        if num_heads < 1 or d_model < 1:
            raise ValueError(f"MultiHeadAttention: d_model and num_heads must be >= 1, got {d_model} and {num_heads}")
        if d_model % num_heads:
            raise ValueError(f"MultiHeadAttention: d_model={d_model} is not divisible by num_heads={num_heads}")
        self.d_model, self.num_heads, self.d_k = d_model, num_heads, d_model // num_heads
        self.dropout = dropout
        self.q_proj = Linear(d_model, d_model)
        self.k_proj = Linear(d_model, d_model)
        self.v_proj = Linear(d_model, d_model)
        self.out_proj = Linear(d_model, d_model)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        pack([p.weight for p in projections])
        pack([p.bias for p in projections])
        self.attention_weights = None   # (B, h, Lq, Lk) of the last forward, before dropout

    def split_heads(self, x):            # (B, L, d_model) -> (B, h, L, d_k)
        B, L, _ = x.shape
        return x.reshape(B, L, self.num_heads, self.d_k).transpose(0, 2, 1, 3)

    def project(self, x, projections):
        """``x W_iᵀ + b_i`` for each of ``projections`` by one product, split into heads: a tuple of
        ``(B, h, L, d_k)`` tensors. The weights are read in place where they are packed."""
        n = len(projections)
        if n == 1:
            weight, bias = projections[0].weight, projections[0].bias
        else:
            weight = F.concat([p.weight for p in projections])            # (n·d_model, d_model)
            bias = F.concat([p.bias for p in projections])
        # the product, then one copy that puts every head of Q, K and V in place for the attention
        # products (only that copy stays alive for the backward, not also the product)
        heads = F.linear_heads(x, weight, bias, n, self.num_heads)         # (n, B, h, L, d_k)
        return tuple(heads[i] for i in range(n))                          # n views (B, h, L, d_k)

    def keys_values(self, key, value):
        """``K = key W^K``, ``V = value W^V`` split into heads: ``(B, h, Lk, d_k)`` each (one product
        when ``key is value``, as in cross-attention over the encoder output)."""
        if key is value and self.one_product:
            return self.project(key, (self.k_proj, self.v_proj))
        return self.split_heads(self.k_proj(key)), self.split_heads(self.v_proj(value))

    def queries_keys_values(self, query, key, value):
        """Q, K and V split into heads; one product for all three in self-attention. (In
        cross-attention Q too is laid out by ``project``'s one copy: a strided view of the heads
        would be copied by both attention products that read it, forward and backward.)"""
        if not self.one_product:
            return (self.split_heads(self.q_proj(query)), *self.keys_values(key, value))
        if query is key and key is value:
            return self.project(query, (self.q_proj, self.k_proj, self.v_proj))
        return (self.project(query, (self.q_proj,))[0], *self.keys_values(key, value))

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
        if cache is not None and static_kv and "k" in cache:
            q, k, v = self.split_heads(self.q_proj(query)), cache["k"], cache["v"]
        elif cache is not None and "at" in cache:        # fixed size: same buffers every step
            q, k, v = self.queries_keys_values(query, key, value)
            cache["k"][:, :, cache["at"]], cache["v"][:, :, cache["at"]] = k.data, v.data
            k, v = Tensor(cache["k"]), Tensor(cache["v"])
        else:
            q, k, v = self.queries_keys_values(query, key, value)
            if cache is not None:
                if "k" in cache and not static_kv:
                    k = F.concat([cache["k"], k], axis=2)
                    v = F.concat([cache["v"], v], axis=2)
                cache["k"], cache["v"] = k, v
        # Concat(head_1, …, head_h): (B, Lq, d_model), laid out by the attention op itself
        concat, weights = F.scaled_dot_product_attention(
            q, k, v, mask=mask, dropout_p=self.dropout, training=self.training, concat_heads=True)
        self.attention_weights = weights
        return self.out_proj(concat)

    def extra_repr(self):
        return f"d_model={self.d_model}, num_heads={self.num_heads}, dropout={self.dropout}"
