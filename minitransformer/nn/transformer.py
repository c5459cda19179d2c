"""The encoder-decoder Transformer of §3.1, layer by layer.

Each sublayer is wrapped as in the paper, ``LayerNorm(x + Dropout(Sublayer(x)))`` (post-LN);
``norm_first=True`` gives the pre-LN variant ``x + Dropout(Sublayer(LayerNorm(x)))`` with a
final LayerNorm after each stack.
"""
import math
from dataclasses import asdict, dataclass

import numpy as np

from .. import backend
from .. import functional as F
from ..tensor import Tensor
from .attention import MultiHeadAttention
from .layers import Dropout, Embedding, LayerNorm, Linear, PositionalEncoding, PositionwiseFeedForward
from .module import Module, ModuleList


def add_and_norm(x, sublayer_out, norm, dropout):
    """Figure 1's "Add & Norm" box with §5.4's residual dropout, ``norm(x + dropout(sublayer_out))``,
    as one op (``F.add_and_norm``: on the GPU one kernel instead of three)."""
    return F.add_and_norm(x, sublayer_out, norm.weight, norm.bias, dropout.p, dropout.training, norm.eps)


class EncoderLayer(Module):
    """Self-attention sublayer, then feed-forward sublayer (§3.1)."""

    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff)
        self.norm1, self.norm2 = LayerNorm(d_model), LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x, src_mask):                          # x: (B, S, d_model)
        if self.norm_first:
            h = self.norm1(x)
            a = self.self_attn(h, h, h, src_mask)
            x1 = x + self.dropout(a)
            f = self.feed_forward(self.norm2(x1))
            out = x1 + self.dropout(f)
        else:
            a = self.self_attn(x, x, x, src_mask)
            x1 = add_and_norm(x, a, self.norm1, self.dropout)
            f = self.feed_forward(x1)
            out = add_and_norm(x1, f, self.norm2, self.dropout)
        self._record(input=x, self_attention=a, after_self_attention=x1, feed_forward=f, output=out)
        return out


class DecoderLayer(Module):
    """Masked self-attention, attention over the encoder output, feed-forward (§3.1)."""

    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.cross_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff)
        self.norm1, self.norm2, self.norm3 = LayerNorm(d_model), LayerNorm(d_model), LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(self, y, memory, tgt_mask, src_mask, cache=None):   # y: (B, T, d_model)
        self_cache = cache["self"] if cache is not None else None
        cross_cache = cache["cross"] if cache is not None else None
        if self.norm_first:
            h = self.norm1(y)
            a = self.self_attn(h, h, h, tgt_mask, cache=self_cache)
            y1 = y + self.dropout(a)
            h = self.norm2(y1)
            c = self.cross_attn(h, memory, memory, src_mask, cache=cross_cache, static_kv=True)
            y2 = y1 + self.dropout(c)
            f = self.feed_forward(self.norm3(y2))
            out = y2 + self.dropout(f)
        else:
            a = self.self_attn(y, y, y, tgt_mask, cache=self_cache)
            y1 = add_and_norm(y, a, self.norm1, self.dropout)
            c = self.cross_attn(y1, memory, memory, src_mask, cache=cross_cache, static_kv=True)
            y2 = add_and_norm(y1, c, self.norm2, self.dropout)
            f = self.feed_forward(y2)
            out = add_and_norm(y2, f, self.norm3, self.dropout)
        self._record(input=y, self_attention=a, after_self_attention=y1, cross_attention=c,
                     after_cross_attention=y2, feed_forward=f, output=out)
        return out


class Encoder(Module):
    """A stack of ``N`` identical encoder layers."""

    def __init__(self, num_layers, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.layers = ModuleList(EncoderLayer(d_model, num_heads, d_ff, dropout, norm_first)
                                 for _ in range(num_layers))
        self.norm = LayerNorm(d_model) if norm_first else None

    def forward(self, x, src_mask):
        for layer in self.layers:
            x = layer(x, src_mask)
        return self.norm(x) if self.norm is not None else x


class Decoder(Module):
    """A stack of ``N`` identical decoder layers."""

    def __init__(self, num_layers, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.layers = ModuleList(DecoderLayer(d_model, num_heads, d_ff, dropout, norm_first)
                                 for _ in range(num_layers))
        self.norm = LayerNorm(d_model) if norm_first else None

    def forward(self, y, memory, tgt_mask, src_mask, cache=None):
        for i, layer in enumerate(self.layers):
            y = layer(y, memory, tgt_mask, src_mask, cache[i] if cache is not None else None)
        return self.norm(y) if self.norm is not None else y


@dataclass
class TransformerConfig:
    """Everything needed to rebuild a model (saved beside every checkpoint)."""
    vocab_size: int
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    pad_id: int = 0
    max_len: int = 512
    norm_first: bool = False
    share_embeddings: bool = True
    learned_positions: bool = False


def batch_of_ids(op, ids, what):
    """``ids`` as a ``(batch, length)`` array (a host or device array, a tensor or lists of one
    length), with at least one token per sentence, or a clear error naming ``op``."""
    ids = ids.data if isinstance(ids, Tensor) else ids
    if not backend.is_array(ids):
        try:
            ids = np.asarray(ids)
        except ValueError:          # ragged lists
            raise ValueError(f"{op}: {what} must be (batch, length) token ids, got sentences of "
                             "different lengths; pad them to one length (data.collate)") from None
    if ids.ndim != 2:
        hint = " (one sentence [i, j, …] is [[i, j, …]])" if ids.ndim == 1 else ""
        raise ValueError(f"{op}: {what} must be (batch, length) token ids, got shape {ids.shape}{hint}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{op}: {what} of shape {ids.shape} holds no tokens; every batch needs at least "
                         "one sentence of at least one token")
    return ids


def padding_mask(ids, pad_id):
    """``(B, L)`` ids -> ``(B, 1, 1, L)``: True where the key is a real token."""
    if ids.ndim != 2:
        raise ValueError(f"padding_mask: ids must be (batch, length), got shape {ids.shape}")
    return (ids != pad_id)[:, None, None, :]


def causal_mask(T, xp=np):
    """``(T, T)``: position i may attend to positions ≤ i (§3.2.3, "masking out … illegal connections")."""
    return xp.tril(xp.ones((T, T), dtype=bool))


class Transformer(Module):
    """The full model of §3: ``model(src_ids (B, S), tgt_in_ids (B, T))`` -> logits ``(B, T, vocab)``.

    With ``share_embeddings`` one embedding matrix serves source, target and the pre-softmax
    projection, and the embeddings are multiplied by √d_model (§3.4). Masks are built from
    ``pad_id``: padded keys are never attended to, and the decoder cannot look ahead.
    """

    def __init__(self, vocab_size, d_model=512, num_heads=8, num_layers=6, d_ff=2048, dropout=0.1,
                 pad_id=0, max_len=512, norm_first=False, share_embeddings=True, learned_positions=False):
        super().__init__()
        self.config = TransformerConfig(vocab_size, d_model, num_heads, num_layers, d_ff, dropout,
                                        pad_id, max_len, norm_first, share_embeddings, learned_positions)
        self.d_model, self.pad_id, self.vocab_size = d_model, pad_id, vocab_size
        self.embedding = Embedding(vocab_size, d_model)          # source (and target, and output)
        if share_embeddings:
            self.tgt_embedding, self.generator = None, None
        else:
            self.tgt_embedding = Embedding(vocab_size, d_model)
            self.generator = Linear(d_model, vocab_size, bias=False)
        self.positional_encoding = PositionalEncoding(d_model, max_len, dropout, learned_positions)
        self.encoder = Encoder(num_layers, d_model, num_heads, d_ff, dropout, norm_first)
        self.decoder = Decoder(num_layers, d_model, num_heads, d_ff, dropout, norm_first)

    @classmethod
    def from_config(cls, config):
        config = config if isinstance(config, dict) else asdict(config)
        return cls(**config)

    def _ids(self, ids, what):
        return batch_of_ids("Transformer", ids, what)

    def _mask(self, mask):
        return backend.to_device(mask, self.device)

    def embed(self, ids, embedding, offset=0):
        """Token embedding · √d_model + positional encoding, then dropout (§3.4, §3.5)."""
        return self.positional_encoding(embedding(ids) * math.sqrt(self.d_model), offset)

    def encode(self, src_ids):
        """``src_ids (B, S)`` -> ``(memory (B, S, d_model), src_mask (B, 1, 1, S))``."""
        src_ids = self._ids(src_ids, "src_ids")
        src_mask = self._mask(padding_mask(src_ids, self.pad_id))
        x = self.embed(src_ids, self.embedding)
        memory = self.encoder(x, src_mask)
        self._record(src_embedding=x, memory=memory)
        return memory, src_mask

    def decode(self, tgt_ids, memory, src_mask, cache=None, last_only=False):
        """``tgt_ids (B, T)`` -> logits ``(B, T, vocab)``; with ``last_only`` those of the last
        position, ``(B, 1, vocab)`` (all that decoding without a cache needs of the output projection).

        With a ``cache`` (from ``new_cache()``) pass only the newest tokens: earlier keys and
        values are reused instead of recomputed (decoding, §6.1).
        """
        tgt_ids = self._ids(tgt_ids, "tgt_ids")
        if tgt_ids.shape[0] != memory.shape[0] and (cache is None or "position" not in cache):  # (a fixed cache says it)
            raise ValueError(f"Transformer: tgt_ids has {tgt_ids.shape[0]} sentences but the source "
                             f"(memory {tuple(memory.shape)}) has {memory.shape[0]}")
        T = tgt_ids.shape[1]
        offset = cache["length"] if cache is not None else 0
        if cache is not None and "position" in cache:
            offset, tgt_mask = self._fixed_cache_step(cache, tgt_ids.shape), cache["valid"]
        elif cache is None:
            xp = backend.get_array_module(tgt_ids)      # ids on the GPU: the mask is made there too
            tgt_mask = self._mask(causal_mask(T, xp)[None, None] & padding_mask(tgt_ids, self.pad_id))
        else:   # the new tokens see every cached one, and each other causally
            tgt_mask = self._mask(np.tril(np.ones((T, offset + T), dtype=bool), k=offset)) if T > 1 else None
            cache["length"] += T
        y_in = self.embed(tgt_ids, self.tgt_embedding or self.embedding, offset)
        y = self.decoder(y_in, memory, tgt_mask, src_mask, cache["layers"] if cache is not None else None)
        if cache is not None and "position" in cache:
            cache["position"] += 1                              # in place: the next step reads it there
        if last_only and y.shape[1] > 1:
            y = y[:, -1:]
        # the pre-softmax projection, tied to the embeddings (§3.4) unless there is a generator
        logits = self.generator(y) if self.generator is not None else F.linear(y, self.embedding.weight)
        self._record(tgt_embedding=y_in, decoder_output=y, logits=logits)
        return logits

    def new_cache(self, batch=None, max_len=None):
        """An empty key/value cache for step-by-step decoding.

        By default it grows by one position per step. With ``batch`` and ``max_len`` it is
        fixed-size: each decoder layer's self-attention keys and values are preallocated
        ``(batch, h, max_len, d_k)`` buffers, a step writes one position of them in place and
        attends to the positions written so far (the rest are masked out), and the position is a
        number on the model's device. Every step then runs the same kernels on the same memory,
        which is what a CUDA graph replays (``decode.beam_search(cuda_graph=True)``).
        """
        layers = [{"self": {}, "cross": {}} for _ in self.decoder.layers]
        if batch is None and max_len is None:
            return {"length": 0, "layers": layers}
        if batch is None or max_len is None or batch < 1 or max_len < 1:
            raise ValueError(f"new_cache: a fixed-size cache needs batch >= 1 and max_len >= 1, "
                             f"got batch={batch}, max_len={max_len}")
        if max_len > self.config.max_len:
            raise ValueError(f"new_cache: max_len={max_len} passes the model's max_len={self.config.max_len} "
                             "(the positional encoding's length)")
        xp, weight = backend.xp_for(self.device), self.embedding.weight
        h = self.config.num_heads
        slots = xp.arange(max_len)
        position = xp.zeros((), dtype=np.int64)
        for layer in layers:
            # "at": the position as a one-element index (a view: it follows the counter), where a
            # step writes its keys and values (one position, not a masked pass over the buffer)
            layer["self"] = {"k": xp.zeros((batch, h, max_len, self.d_model // h), dtype=weight.dtype),
                             "at": position.reshape(1)}
            layer["self"]["v"] = xp.zeros_like(layer["self"]["k"])
        return {"length": 0, "layers": layers, "position": position, "slots": slots,
                "valid": xp.zeros((1, 1, 1, max_len), dtype=bool), "batch": batch}

    def reset_cache(self, cache, memory):
        """Make a fixed-size cache ready for a new batch of its shape, in place: back to position
        0, and the cross-attention keys and values (if a first step made them) recomputed from
        ``memory`` into their buffers, where a captured decoding step reads them."""
        if "position" not in cache:
            raise ValueError("reset_cache: only a fixed-size cache (new_cache(batch, max_len)) is reset in place")
        cache["position"][...] = 0
        cache["valid"][...] = False
        cache["length"] = 0
        for layer, entry in zip(self.decoder.layers, cache["layers"]):
            kept = entry["cross"]
            if "k" in kept:
                k, v = layer.cross_attn.keys_values(memory, memory)
                kept["k"].data[...] = k.data
                kept["v"].data[...] = v.data

    @staticmethod
    def _fixed_cache_step(cache, shape):
        """Mark the positions this step may attend to (those written so far and its own) and return
        the position: in place and on the device only, so that a captured step does it at every replay."""
        if shape != (cache["batch"], 1):
            raise ValueError(f"Transformer.decode: a fixed-size cache takes one token per step for each of its "
                             f"{cache['batch']} rows, i.e. tgt_ids of shape ({cache['batch']}, 1), got {shape}")
        xp = backend.get_array_module(cache["slots"])
        position = cache["position"]
        # counted on the host as well, for eager steps (a replayed graph cannot raise; its caller
        # never replays more steps than the cache holds)
        if cache["length"] >= len(cache["slots"]):
            raise ValueError(f"Transformer.decode: the fixed-size cache holds {len(cache['slots'])} "
                             "positions and all are used")
        xp.less_equal(cache["slots"], position, out=cache["valid"].reshape(-1))
        cache["length"] += 1
        return position

    def forward(self, src_ids, tgt_in_ids):
        memory, src_mask = self.encode(src_ids)
        return self.decode(tgt_in_ids, memory, src_mask)

    def extra_repr(self):
        c = self.config
        return (f"vocab_size={c.vocab_size}, d_model={c.d_model}, num_heads={c.num_heads}, "
                f"num_layers={c.num_layers}, d_ff={c.d_ff}, dropout={c.dropout}")
