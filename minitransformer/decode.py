"""Decoding (§6.1): greedy and beam search with length penalty, using a key/value cache.

With the cache the decoder runs on the newest token only: its self-attention keys and values
grow by one position per step and the cross-attention keys and values of the encoder output are
computed once. ``use_cache=False`` re-runs the decoder on the whole prefix every step (the
reference the cache is tested against, and the baseline of ``benchmarks/decode.py``).
"""
import numpy as np

from . import backend
from . import functional as F
from .tensor import Tensor, no_grad


def _source_lengths(src_ids, pad_id):
    return (np.asarray(backend.to_numpy(src_ids)) != pad_id).sum(axis=1)


def _step_logprobs(model, tokens, memory, src_mask, cache):
    """Log-probabilities ``(B, vocab)`` of the next token after ``tokens (B, t)``, on the host."""
    if cache is not None:
        logits = model.decode(tokens[:, -1:], memory, src_mask, cache)
    else:
        logits = model.decode(tokens, memory, src_mask)
    logp = backend.to_numpy(F.log_softmax(logits[:, -1, :]).data).astype(np.float64)
    logp[:, model.pad_id] = -np.inf   # never predict padding: the uncached decoder masks pad keys out
    return logp


def greedy_decode(model, src_ids, bos_id, eos_id, max_len_a=1.0, max_len_b=50, use_cache=True):
    """Pick the most likely token at every step. Returns a list of token-id lists (no bos/eos).

    Each sentence stops at ``eos`` or after ``max_len_a · source length + max_len_b`` tokens.
    """
    src_ids = np.asarray(backend.to_numpy(src_ids.data if isinstance(src_ids, Tensor) else src_ids))
    limits = (max_len_a * _source_lengths(src_ids, model.pad_id) + max_len_b).astype(int)
    B = len(src_ids)
    was_training = model.training
    model.eval()
    with no_grad():
        memory, src_mask = model.encode(src_ids)
        cache = model.new_cache() if use_cache else None
        tokens = np.full((B, 1), bos_id, dtype=np.int64)
        done = np.zeros(B, dtype=bool)
        out = [[] for _ in range(B)]
        for step in range(int(limits.max())):
            next_ids = _step_logprobs(model, tokens, memory, src_mask, cache).argmax(axis=1)
            for b in np.flatnonzero(~done):
                if next_ids[b] == eos_id or step >= limits[b]:
                    done[b] = True
                else:
                    out[b].append(int(next_ids[b]))
            if done.all():
                break
            tokens = np.concatenate([tokens, np.where(done, eos_id, next_ids)[:, None]], axis=1)
    model.train(was_training)
    return out


def length_penalty(length, alpha):
    """Wu et al. (2016): ``lp(Y) = ((5 + |Y|) / 6)^α``; scores are divided by it (§6.1: α = 0.6)."""
    return ((5.0 + length) / 6.0) ** alpha


def _top_k(scores, k):
    """Column indices of the ``k`` largest scores of each row, best first (ties: lower index)."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
        np.tile(np.arange(scores.shape[1]), (len(scores), 1))
    order = np.lexsort((part, -np.take_along_axis(scores, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _reorder_cache(cache, rows):
    """Keep, for every beam slot, the self-attention keys/values of the hypothesis it extends."""
    for layer in cache["layers"]:
        for name in ("k", "v"):
            layer["self"][name] = Tensor(layer["self"][name].data[rows])


def beam_search(model, src_ids, bos_id, eos_id, beam_size=4, alpha=0.6, max_len_a=1.0, max_len_b=50,
                use_cache=True, return_scores=False):
    """Beam search (§6.1: beam 4, α = 0.6, max length = source length + 50).

    Keeps ``beam_size`` live hypotheses per sentence, ranked by total log-probability; a
    hypothesis that emits ``eos`` is set aside with score ``log P / lp(length)``; a sentence is
    finished once it has ``beam_size`` such hypotheses or reaches its length limit (then its
    live hypotheses are scored too). Returns the best hypothesis per sentence (a list of
    token-id lists, no bos/eos); with ``return_scores`` also their normalised scores.
    """
    src_ids = np.asarray(backend.to_numpy(src_ids.data if isinstance(src_ids, Tensor) else src_ids))
    if beam_size < 1:
        raise ValueError(f"beam_search: beam_size must be >= 1, got {beam_size}")
    B, K = len(src_ids), beam_size
    limits = (max_len_a * _source_lengths(src_ids, model.pad_id) + max_len_b).astype(int)
    was_training = model.training
    model.eval()
    with no_grad():
        memory, src_mask = model.encode(np.repeat(src_ids, K, axis=0))     # (B·K, S, d_model)
        cache = model.new_cache() if use_cache else None
        tokens = np.full((B * K, 1), bos_id, dtype=np.int64)
        scores = np.full((B, K), -np.inf)
        scores[:, 0] = 0.0                       # all beams start identical: expand only one
        finished = [[] for _ in range(B)]        # (normalised score, tokens) per sentence
        done = np.zeros(B, dtype=bool)
        for step in range(int(limits.max())):
            logp = _step_logprobs(model, tokens, memory, src_mask, cache)   # (B·K, V)
            V = logp.shape[1]
            candidates = (scores[:, :, None] + logp.reshape(B, K, V)).reshape(B, K * V)
            top = _top_k(candidates, min(2 * K, K * V))   # 2K: enough to keep K that are not eos
            rows = np.arange(B * K).reshape(B, K).copy()  # default: finished sentences keep their rows
            next_tokens = np.full((B, K), eos_id, dtype=np.int64)
            for b in np.flatnonzero(~done):
                alive = 0
                for rank, flat in enumerate(top[b]):
                    score = candidates[b, flat]
                    beam, token = divmod(int(flat), V)
                    if not np.isfinite(score):
                        break
                    prefix = tokens[b * K + beam, 1:].tolist()
                    if token == eos_id:   # only an eos among the K best ends a hypothesis (beam 1 = greedy)
                        if rank < K and len(finished[b]) < K:
                            finished[b].append((score / length_penalty(step + 1, alpha), prefix))
                    elif alive < K:
                        rows[b, alive] = b * K + beam
                        next_tokens[b, alive] = token
                        scores[b, alive] = score
                        alive += 1
                    if alive == K and len(finished[b]) >= K:
                        break
                scores[b, alive:] = -np.inf
                if len(finished[b]) >= K or step + 1 >= limits[b]:
                    done[b] = True
                    if step + 1 >= limits[b] or not finished[b]:
                        for k in range(alive):  # out of length: live hypotheses count too
                            prefix = tokens[rows[b, k], 1:].tolist() + [int(next_tokens[b, k])]
                            finished[b].append((scores[b, k] / length_penalty(step + 1, alpha), prefix))
            if done.all():
                break
            rows = rows.reshape(-1)
            tokens = np.concatenate([tokens[rows], next_tokens.reshape(-1, 1)], axis=1)
            if cache is not None:
                _reorder_cache(cache, rows)
    model.train(was_training)
    best = [max(f, key=lambda h: h[0]) if f else (-np.inf, []) for f in finished]
    hyps = [h for _, h in best]
    return (hyps, [s for s, _ in best]) if return_scores else hyps
