"""Decoding (§6.1): greedy and beam search with length penalty, using a key/value cache.

With the cache the decoder runs on the newest token only: its self-attention keys and values
grow by one position per step and the cross-attention keys and values of the encoder output are
computed once. ``use_cache=False`` re-runs the decoder on the whole prefix every step (the
reference the cache is tested against, and the baseline of ``benchmarks/decode.py``).

All per-step bookkeeping is whole-array work on the model's device (no loop over sentences, no
copy of the log-probabilities to the host): on a GPU a step is a fixed set of launches, so the
cache's saving is not hidden behind host work. The host reads one flag per step (all done?) and
the chosen hypotheses once at the end.

Beam search keeps its state in buffers of fixed size, updated in place. With a fixed-size cache
too (``fixed_cache``: preallocated for the longest output) a step is then the same kernels on the
same memory every time, and ``cuda_graph=True`` records it once and replays it: on a GPU, where
a step of a small model is well over a hundred launches of tiny kernels (counted from the code),
that removes their host cost. The replayed search reads its "all done?" flag one step late, so the
next step is queued before the host waits (H200 figures: docs/results.md).
"""
import math
import numbers
import weakref
from collections import OrderedDict

import numpy as np

from . import backend, kernels
from . import functional as F
from .nn.transformer import batch_of_ids
from .tensor import Tensor, check_int, no_grad


def positions_of(model):
    """How many positions the model's positional table holds (``config.max_len``): what any output
    must fit in. None for a model without one (the tests' table-driven language model)."""
    return getattr(getattr(model, "config", None), "max_len", None)


def check_length_limits(op, max_len_a, max_len_b):
    """``max_len_a · source length + max_len_b``'s numbers: a finite ``a >= 0`` and an int ``b`` (which
    may be negative: ``benchmarks/decode.py`` asks for exactly 50 tokens after 20-token sources)."""
    if isinstance(max_len_a, bool) or not isinstance(max_len_a, numbers.Real) or not 0 <= max_len_a < math.inf:
        raise ValueError(f"{op}: max_len_a must be a finite number >= 0, got {max_len_a!r}")
    if isinstance(max_len_b, bool) or not isinstance(max_len_b, (int, np.integer)):
        raise ValueError(f"{op}: max_len_b must be an int, got {max_len_b!r}")


def _length_limits(op, model, src_ids, bos_id, eos_id, max_len_a, max_len_b):
    """Host ``src_ids`` and each sentence's output limit ``max_len_a · source length + max_len_b``,
    at most the model's positions (``max_len``: bos and the tokens before the last take them all);
    the arguments every search takes, checked."""
    check_int(op, "bos_id", bos_id, 0, getattr(model, "vocab_size", None))
    # eos may lie outside the vocabulary (it is then never emitted: every output runs to its limit)
    check_int(op, "eos_id", eos_id, 0)
    check_length_limits(op, max_len_a, max_len_b)
    src_ids = batch_of_ids(op, src_ids, "src_ids")
    src_ids = np.asarray(backend.to_numpy(src_ids))
    limits = (max_len_a * (src_ids != model.pad_id).sum(axis=1) + max_len_b).astype(int)
    positions = positions_of(model)
    return src_ids, limits if positions is None else np.minimum(limits, positions)


def _step_logprobs(model, tokens, memory, src_mask, cache):
    """Log-probabilities ``(B, vocab)`` (the model's dtype, on its device) of the next token after
    ``tokens (B, t)``. Beam search adds them to float64 running scores (exact: no float64 copy of
    them is needed first)."""
    if cache is not None:
        logits = model.decode(tokens[:, -1:], memory, src_mask, cache)
    else:
        logits = model.decode(tokens, memory, src_mask, last_only=True)
    logp = F.log_softmax(logits[:, -1, :]).data
    logp[:, model.pad_id] = -np.inf   # never predict padding: the uncached decoder masks pad keys out
    return logp


def _best_candidates(scores, logp, n, capturable=False):
    """Of every extension of every live hypothesis, ``c[b, k·V + v] = scores[b, k] + logp[b·K + k, v]``
    (float64), the ``n`` best per sentence: ``(indices (B, n), values (B, n))``, best first, ties to
    the lower index. On the GPU two fused kernels read ``logp`` once (``kernels.beam_top_k``) instead
    of forming ``c`` and taking ``n`` rounds of argmax over it (base at 64 sentences: 1.2 MB a row)."""
    B, K = scores.shape
    if backend.fused(logp) and n <= kernels.TOPK_MAX:
        return kernels.beam_top_k(scores, logp, n)
    xp = backend.get_array_module(logp)
    candidates = (scores[:, :, None] + logp.reshape(B, K, -1)).reshape(B, -1)
    top = backend.top_k(candidates, n, capturable)
    return top, xp.take_along_axis(candidates, top, axis=1)


def greedy_decode(model, src_ids, bos_id, eos_id, max_len_a=1.0, max_len_b=50, use_cache=True):
    """Pick the most likely token at every step. Returns a list of token-id lists (no bos/eos).

    Each sentence stops at ``eos`` or after ``max_len_a · source length + max_len_b`` tokens.
    """
    src_ids, limits = _length_limits("greedy_decode", model, src_ids, bos_id, eos_id, max_len_a, max_len_b)
    B, steps = len(src_ids), max(0, int(limits.max()))
    was_training = model.training
    model.eval()
    with no_grad():
        memory, src_mask = model.encode(src_ids)
        xp = backend.get_array_module(memory.data)
        limits = backend.to_device(limits, backend.device_of(memory.data))
        cache = model.new_cache() if use_cache else None
        tokens = xp.full((B, 1), bos_id, dtype=np.int64)
        done = xp.zeros(B, dtype=bool)
        out = xp.zeros((B, steps), dtype=np.int64)    # a sentence's tokens are out[b, :lengths[b]]
        lengths = xp.zeros(B, dtype=np.int64)
        for step in range(steps):
            next_ids = _step_logprobs(model, tokens, memory, src_mask, cache).argmax(axis=1)
            done |= (next_ids == eos_id) | (step >= limits)
            out[:, step] = next_ids
            lengths += ~done       # done only grows, so kept tokens are the first lengths[b]
            if bool(done.all()):
                break
            # a finished row's next input is never read: its own pick keeps every id in the
            # vocabulary (an eos the model cannot emit, as the benchmarks use, is not)
            tokens = xp.concatenate([tokens, next_ids[:, None]], axis=1)
        out, lengths = backend.to_numpy(out), backend.to_numpy(lengths)
    model.train(was_training)
    return [out[b, :lengths[b]].tolist() for b in range(B)]


def length_penalty(length, alpha):
    """Wu et al. (2016): ``lp(Y) = ((5 + |Y|) / 6)^α``; scores are divided by it (§6.1: α = 0.6)."""
    return ((5.0 + length) / 6.0) ** alpha


def _reorder_cache(cache, rows):
    """Keep, for every beam slot, the self-attention keys/values of the hypothesis it extends.

    A fixed-size cache is gathered into a second set of buffers (made at the first call), which
    then become the cache: one pass over the keys and values instead of a gather and a copy back.
    Its buffers alternate, so a captured step is two graphs, one per phase (``CapturedStep(period=2)``)."""
    for layer in cache["layers"]:
        kept = layer["self"]
        for name in ("k", "v"):
            if isinstance(kept[name], Tensor):
                kept[name] = Tensor(kept[name].data[rows])
                continue
            xp = backend.get_array_module(kept[name])
            spare = kept.get("spare_" + name)
            if spare is None:
                spare = kept["spare_" + name] = xp.empty_like(kept[name])
            xp.take(kept[name], rows, axis=0, out=spare)
            kept[name], kept["spare_" + name] = spare, kept[name]


class _EndedHypotheses:
    """Per sentence, the hypotheses that have ended, in the order they ended: at most K by eos,
    then at most K live ones at the length limit. Every write is whole-array; the writes that are
    not meant to land go to one more slot (the last) that nothing reads."""

    def __init__(self, xp, B, K, max_len):
        self.xp, self.batch = xp, xp.arange(B)[:, None]
        self.scores = xp.empty((B, 2 * K + 1))                # log P / lp(length)
        self.lengths = xp.empty((B, 2 * K + 1), dtype=np.int64)
        self.tokens = xp.empty((B, 2 * K + 1, max_len), dtype=np.int64)
        self.count = xp.empty(B, dtype=np.int64)
        self.reset()

    def reset(self):
        """None ended yet (in place: a kept search reuses the buffers)."""
        self.scores.fill(-np.inf)
        self.lengths.fill(0)
        self.tokens.fill(0)
        self.count.fill(0)

    def add(self, keep, slot, scores, tokens, length):
        """Where ``keep (B, n)``, hypothesis ``j`` of sentence ``b`` (``scores (B, n)``, its first
        ``length`` of ``tokens (B, n, max_len)``) goes to slot ``slot[b, j]``."""
        at = self.xp.where(keep, slot, -1)
        self.scores[self.batch, at] = scores
        self.lengths[self.batch, at] = length
        self.tokens[self.batch, at] = tokens
        self.count += keep.sum(axis=1)

    def best(self):
        """Host ``(token lists, scores)``: per sentence the best, the earliest ended among equals."""
        B = len(self.count)
        best = self.scores[:, :-1].argmax(axis=1)
        pick = (self.xp.arange(B), best)
        scores, lengths, tokens = (backend.to_numpy(a[pick]) for a in (self.scores, self.lengths, self.tokens))
        return [tokens[b, :lengths[b]].tolist() for b in range(B)], scores.tolist()


class _Beams:
    """Beam search's state, on the model's device, in buffers of fixed size that every step updates
    in place (the step number too): a step is the same work on the same memory each time, so
    on a GPU it can be captured once as a CUDA graph and replayed."""

    def __init__(self, xp, B, K, steps, bos_id, eos_id, alpha, limits, capturable=False):
        self.xp, self.K, self.bos_id, self.eos_id, self.alpha, self.limits = xp, K, bos_id, eos_id, alpha, limits
        self.capturable = capturable                 # only kernels a CUDA graph can record
        self.history = xp.empty((B * K, steps + 1), dtype=np.int64)  # bos, then one token a step
        self.step_number = xp.empty((), dtype=np.int64)
        self.scores = xp.empty((B, K))               # log P of each live hypothesis
        self.ended = _EndedHypotheses(xp, B, K, steps)
        self.done = xp.empty(B, dtype=bool)
        self.rows = xp.empty(B * K, dtype=np.int64)  # the row each slot continues (caches follow it)
        # made once: step() is the hot path
        self.batch, self.own_rows = xp.arange(B)[:, None], xp.arange(B * K).reshape(B, K)
        self.rank_of, self.k = xp.arange(2 * K), xp.arange(K)
        self.columns = xp.arange(steps + 1)
        self.reset(limits)

    def reset(self, limits):
        """The start of a search over sentences with these output limits, in place (a kept
        search reuses the buffers, which a captured step reads)."""
        self.history.fill(self.bos_id)
        self.step_number[...] = 0
        self.scores.fill(-np.inf)
        self.scores[:, 0] = 0.0                      # all beams start identical: expand only one
        self.ended.reset()
        self.done.fill(False)
        self.rows[...] = self.own_rows.reshape(-1)
        self.limits[...] = limits

    def newest(self):
        """``(B·K, 1)``: each hypothesis' newest token (what the cached decoder is fed), picked by
        the step number on the device."""
        return self.xp.take(self.history, self.step_number.reshape(1), axis=1)

    def step(self, logp):
        """Extend every live hypothesis by the next-token log-probabilities ``logp (B·K, V)``.

        Per sentence, go down the 2K best candidates (2K always holds K that are not eos) in
        order: an eos among the first K ends a hypothesis while fewer than K have ended, and the
        first K others continue. Done for all sentences at once with running counts (``cumsum``)
        instead of a loop; ``tests/test_decode.py`` checks it against that loop.
        """
        xp, K, eos_id, ended = self.xp, self.K, self.eos_id, self.ended
        B, batch, own_rows = len(self.done), self.batch, self.own_rows
        V = logp.shape[1]
        top, top_scores = _best_candidates(self.scores, logp, min(2 * K, K * V), self.capturable)  # (B, n)
        n = top.shape[1]
        beam, token = top // V, top % V
        active = ~self.done[:, None]
        finite = xp.isfinite(top_scores)     # sorted: past the first -inf all are -inf
        length = self.step_number + 1        # of a hypothesis chosen now (an eos counts)
        lp = length_penalty(length, self.alpha)

        # an eos among the K best ends its hypothesis, while fewer than K have ended
        ends = finite & (token == eos_id) & (self.rank_of[:n] < K)
        count = ended.count[:, None] + xp.cumsum(ends, axis=1, dtype=np.int64)  # ended so far, this one included
        ended.add(ends & active & (count <= K), count - 1, top_scores / lp, self.history[batch * K + beam, 1:],
                  self.step_number)

        # the first K others go on, in rank order (column K of these: a dummy for the rest)
        goes_on = finite & (token != eos_id)
        rank = xp.cumsum(goes_on, axis=1, dtype=np.int64) - 1
        at = xp.where(goes_on & (rank < K), rank, K)
        new_rows = xp.concatenate([own_rows, own_rows[:, :1]], axis=1)
        # slots with no continuation and finished sentences are fed bos: never read, and always an
        # id of the vocabulary (eos need not be: the benchmarks pass one the model cannot emit)
        new_tokens = xp.full((B, K + 1), self.bos_id, dtype=np.int64)
        new_scores = xp.full((B, K + 1), -np.inf)
        new_rows[batch, at], new_tokens[batch, at], new_scores[batch, at] = batch * K + beam, token, top_scores
        rows = xp.where(active, new_rows[:, :K], own_rows).reshape(-1)   # finished sentences keep theirs
        next_tokens = xp.where(active, new_tokens[:, :K], self.bos_id).reshape(-1, 1)
        self.scores[...] = xp.where(active, new_scores[:, :K], self.scores)
        self.history[...] = self.history[rows]
        xp.copyto(self.history, next_tokens, where=self.columns == length)

        # out of length: the live hypotheses end too, after the eos ones
        out_of_length = ~self.done & (length >= self.limits)
        alive = xp.minimum(goes_on.sum(axis=1), K)[:, None]
        ended.add(out_of_length[:, None] & (self.k < alive), ended.count[:, None] + self.k, self.scores / lp,
                  self.history[:, 1:].reshape(B, K, -1), length)
        self.done |= out_of_length | (ended.count >= K)
        self.rows[...] = rows
        self.step_number += 1


class _FixedSearch:
    """A beam search over a fixed-size cache, kept per model for the next batch of its shape.

    All that a step reads or writes is made once: the encoder output and the source mask (a later
    batch is copied in), the cross-attention keys and values (recomputed in place), the
    self-attention cache and the beam state (reset in place). A step is then the same work on the
    same memory for every batch of this shape, so with ``cuda_graph`` the two graphs recorded
    during the first batch replay every later one: no eager step, no recording.
    """

    def __init__(self, model, memory, src_mask, limits, K, steps, bos_id, eos_id, alpha, cuda_graph):
        xp = backend.get_array_module(memory.data)
        # a weak reference: the search is kept in a dict weakly keyed by the model, which must be
        # free to go (and its searches with it)
        self.model = weakref.proxy(model)
        self.memory, self.src_mask, self.cuda_graph = memory, src_mask, cuda_graph
        self.beams = beams = _Beams(xp, len(limits), K, steps, bos_id, eos_id, alpha, limits, capturable=cuda_graph)
        self.cache = cache = model.new_cache(memory.shape[0], steps)
        model = self.model

        def step():     # refers to the buffers, not to self: no cycle, so a dropped search is freed at once
            beams.step(_step_logprobs(model, beams.newest(), memory, src_mask, cache))
            _reorder_cache(cache, beams.rows)

        self.step = step
        if cuda_graph:
            from .cuda_graph import CapturedStep
            self.step = CapturedStep(step, "beam_search", period=2)   # the cache's two buffers alternate
        self.searches = 0

    def start(self, memory, src_mask, limits):
        """Begin a search of this batch: a later one's inputs go into the first one's buffers."""
        if self.searches:
            self.memory.data[...] = memory.data
            self.src_mask[...] = src_mask
            self.beams.reset(limits)
            self.model.reset_cache(self.cache, self.memory)
        self.searches += 1

    def finished(self):
        """A fresh ``() -> bool``: all sentences done? Replayed, it reads the flag a step late
        (``cuda_graph.LaggedAll``): the next step is launched before the host waits, and a step
        of a finished search changes nothing (every sentence keeps its state)."""
        if self.cuda_graph:
            from .cuda_graph import LaggedAll
            return LaggedAll(self.beams.done, self.step.stream)
        return lambda: bool(self.beams.done.all())


_KEPT = weakref.WeakKeyDictionary()     # model -> {shape and settings: _FixedSearch}, oldest first
KEEP_SEARCHES = 2                       # fixed-size searches kept per model (each holds its cache)
_ROUND = 8                              # they hold outputs up to a multiple of this: more batches share one


def _fixed_search(model, memory, src_mask, limits, K, steps, bos_id, eos_id, alpha, cuda_graph):
    """The kept search for this shape and these settings, started on this batch, or a new one.
    Its buffers hold ``steps`` rounded up to a multiple of 8 (within the positional table), so
    batches whose longest outputs differ a little share it. The parameters' addresses are part
    of the key: a recorded graph reads the weights there."""
    rounded = -(-max(steps, 1) // _ROUND) * _ROUND
    positions = positions_of(model)
    steps = max(steps, rounded if positions is None else min(rounded, positions))
    key = (tuple(memory.shape), memory.dtype.str, K, steps, bos_id, eos_id, alpha, cuda_graph,
           backend.tf32_enabled(), tuple(backend.address(p.data) for p in model.parameters()))
    kept = _KEPT.setdefault(model, OrderedDict())
    search = kept.pop(key, None) or _FixedSearch(model, memory, src_mask, limits, K, steps, bos_id, eos_id,
                                                 alpha, cuda_graph)
    kept[key] = search                  # the most recent last
    while len(kept) > KEEP_SEARCHES:
        kept.popitem(last=False)
    search.start(memory, src_mask, limits)
    return search


def release_searches(model=None):
    """Free the fixed-size searches kept for ``model`` (for every model if None): their caches,
    beam buffers and recorded CUDA graphs."""
    if model is None:
        _KEPT.clear()
    else:
        _KEPT.pop(model, None)


def beam_search(model, src_ids, bos_id, eos_id, beam_size=4, alpha=0.6, max_len_a=1.0, max_len_b=50,
                use_cache=True, fixed_cache=False, cuda_graph=False, return_scores=False):
    """Beam search (§6.1: beam 4, α = 0.6, max length = source length + 50).

    Keeps ``beam_size`` live hypotheses per sentence, ranked by total log-probability; a
    hypothesis that emits ``eos`` is set aside with score ``log P / lp(length)``; a sentence is
    finished once it has ``beam_size`` such hypotheses or reaches its length limit (then its
    live hypotheses are scored too). Returns the best hypothesis per sentence (a list of
    token-id lists, no bos/eos); with ``return_scores`` also their normalised scores.

    ``use_cache=False`` re-runs the decoder on every prefix (the reference). ``fixed_cache``
    preallocates the key/value cache for the longest output (``Transformer.new_cache(batch,
    max_len)``), so that every step is the same work on the same memory; ``cuda_graph`` (GPU,
    implies ``fixed_cache``) then captures one whole step — decoder, top-k, bookkeeping — as a
    CUDA graph and replays it (``cuda_graph.CapturedStep``). All three give the same hypotheses.
    A fixed-size search is kept for the next batch of the same shape (the last ``KEEP_SEARCHES``
    shapes per model; ``release_searches`` frees them), which then reuses its buffers and graphs.
    """
    check_int("beam_search", "beam_size", beam_size, 1)
    fixed_cache = fixed_cache or cuda_graph
    if fixed_cache and not use_cache:
        raise ValueError("beam_search: fixed_cache and cuda_graph need the key/value cache (use_cache=True)")
    if cuda_graph and model.device != "cuda":
        raise ValueError(f"beam_search: cuda_graph needs the model on the GPU, it is on {model.device}")
    src_ids, limits = _length_limits("beam_search", model, src_ids, bos_id, eos_id, max_len_a, max_len_b)
    B, K, steps = len(src_ids), beam_size, max(0, int(limits.max()))
    was_training = model.training
    model.eval()
    with no_grad():
        memory, src_mask = model.encode(np.repeat(src_ids, K, axis=0))     # (B·K, S, d_model)
        xp = backend.get_array_module(memory.data)
        if cuda_graph and not backend.fused(memory.data):
            raise RuntimeError("beam_search: cuda_graph needs the fused kernels (they are off: "
                               "MINITRANSFORMER_FUSED=0 or backend.set_fused(False))")
        limits = backend.to_device(limits, backend.device_of(memory.data))
        if fixed_cache:
            search = _fixed_search(model, memory, src_mask, limits, K, steps, bos_id, eos_id, alpha, cuda_graph)
            beams, step, finished = search.beams, search.step, search.finished()
        else:
            beams = _Beams(xp, B, K, steps, bos_id, eos_id, alpha, limits)
            cache = model.new_cache() if use_cache else None
            prefix = 0

            def step():
                tokens = beams.newest() if cache is not None else beams.history[:, :prefix + 1]
                beams.step(_step_logprobs(model, tokens, memory, src_mask, cache))
                if cache is not None:
                    _reorder_cache(cache, beams.rows)

            def finished():
                return bool(beams.done.all())
        for prefix in range(steps):
            step()
            if finished():
                break
        hyps, best_scores = beams.ended.best()
    model.train(was_training)
    return (hyps, best_scores) if return_scores else hyps
