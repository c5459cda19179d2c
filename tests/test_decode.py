"""decode (§6.1): greedy decoding and beam search with length penalty, with and without the
key/value cache.

Two kinds of model: a real ``Transformer`` (random-init, and briefly trained on the copy task so
its outputs vary in length and content instead of repeating one token), and a bigram "language
model" with a fixed table of logits, small enough that every hypothesis up to the length limit
can be enumerated, so beam search's bookkeeping (length penalty, finished vs. live hypotheses,
best chosen) is checked against the exact answer.
"""
import itertools
import re

import numpy as np
import pytest

import minitransformer as mt
from minitransformer import backend
from minitransformer.data import BOS_ID, EOS_ID, PAD_ID, collate
from minitransformer.decode import _reorder_cache, _step_logprobs, beam_search, greedy_decode, length_penalty
from minitransformer.nn import Transformer
from minitransformer.optim import Adam, NoamSchedule
from minitransformer.tensor import no_grad
from minitransformer.train import train_step

VOCAB = 20
CONFIG = dict(vocab_size=VOCAB, d_model=32, num_heads=2, num_layers=2, d_ff=64, dropout=0.0, max_len=64)


def random_sequences(rng, n, low=4, high=VOCAB, min_len=3, max_len=8):
    return [rng.integers(low, high, size=rng.integers(min_len, max_len + 1)).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def copy_state():
    """A small model trained for a few seconds on copying: right on some inputs, wrong on others."""
    mt.manual_seed(0)
    model = Transformer(**CONFIG)
    optimizer = Adam(model.parameters(), lr=0.0)
    schedule = NoamSchedule(optimizer, model.d_model, warmup_steps=50)
    rng = np.random.default_rng(0)
    for _ in range(200):
        seqs = random_sequences(rng, 32)
        train_step(model, optimizer, schedule, collate(seqs, seqs), label_smoothing=0.0)
    return model.state_dict()


@pytest.fixture(params=["random", "trained"])
def model(request, device, copy_state):
    m = Transformer(**CONFIG)
    if request.param == "trained":
        m.load_state_dict(copy_state)
    return m.to(device)


@pytest.fixture
def src(rng):
    """A padded batch of 12 sources of lengths 3..8 (so length limits differ per sentence)."""
    seqs = random_sequences(rng, 12)
    return collate(seqs, seqs).src


def source_lengths(src):
    return (np.asarray(src) != PAD_ID).sum(axis=1)


def teacher_forced_logprobs(model, src_row, hyp):
    """``log p(· | src, bos + hyp[:i])`` for i = 0..len(hyp), as a host float64 array (len+1, V),
    with the pad column at -inf as in decoding."""
    model.eval()
    with no_grad():
        logits = model(np.asarray(src_row)[None], np.array([[BOS_ID, *hyp]]))
    logits = backend.to_numpy(logits.data[0]).astype(np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    logp[:, PAD_ID] = -np.inf   # decoding never predicts padding
    return logp


# ---- the length penalty -------------------------------------------------------------------

def test_length_penalty_formula():
    lengths = np.arange(0, 60)
    for alpha in (0.0, 0.6, 1.0, 2.0):
        np.testing.assert_allclose(length_penalty(lengths, alpha), ((5.0 + lengths) / 6.0) ** alpha, rtol=1e-15)
        assert length_penalty(1, alpha) == pytest.approx(1.0)          # lp(1) = 1 for every α
    np.testing.assert_array_equal(length_penalty(lengths, 0.0), 1.0)   # α = 0: no normalisation
    assert length_penalty(7, 0.6) == pytest.approx(2.0 ** 0.6)
    assert np.all(np.diff(length_penalty(lengths, 0.6)) > 0)           # longer -> divided by more


# ---- greedy ---------------------------------------------------------------------------------

def test_trained_copy_model_is_not_degenerate(copy_state, rng):
    """Guards the tests below: the trained model's outputs differ per input, often end with eos,
    and copy some inputs right and others wrong."""
    model = Transformer(**CONFIG)
    model.load_state_dict(copy_state)
    seqs = random_sequences(rng, 40)
    out = greedy_decode(model, collate(seqs, seqs).src, BOS_ID, EOS_ID, max_len_b=10)
    assert len({tuple(o) for o in out}) >= 30
    assert sum(len(o) < len(s) + 10 for o, s in zip(out, seqs)) >= 8   # stopped at eos
    assert 1 <= sum(o == s for o, s in zip(out, seqs)) <= 39


def test_greedy_picks_the_argmax_at_every_step(model, src):
    """Teacher-forcing the greedy output gives back the same argmax at every position, and eos
    right after it whenever the sentence stopped before its length limit."""
    out = greedy_decode(model, src, BOS_ID, EOS_ID, max_len_a=1.0, max_len_b=3)
    limits = source_lengths(src) + 3
    for b, hyp in enumerate(out):
        assert len(hyp) <= limits[b]
        logp = teacher_forced_logprobs(model, src[b], hyp)
        assert logp[:len(hyp)].argmax(axis=1).tolist() == hyp
        if len(hyp) < limits[b]:
            assert logp[len(hyp)].argmax() == EOS_ID
        assert EOS_ID not in hyp


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_batch_equals_one_sentence_at_a_time(model, src, use_cache):
    """Padding a sentence into a batch must not change its translation."""
    batch = greedy_decode(model, src, BOS_ID, EOS_ID, max_len_b=4, use_cache=use_cache)
    for b in range(len(src)):
        alone = src[b:b + 1, :source_lengths(src)[b]]
        assert greedy_decode(model, alone, BOS_ID, EOS_ID, max_len_b=4, use_cache=use_cache) == [batch[b]]


def test_greedy_cached_equals_uncached(model, src):
    cached = greedy_decode(model, src, BOS_ID, EOS_ID, max_len_b=6, use_cache=True)
    uncached = greedy_decode(model, src, BOS_ID, EOS_ID, max_len_b=6, use_cache=False)
    assert cached == uncached


def test_decoding_restores_training_mode(model, src):
    model.train()
    greedy_decode(model, src, BOS_ID, EOS_ID, max_len_b=2)
    assert model.training and all(m.training for m in model.modules())
    beam_search(model, src, BOS_ID, EOS_ID, beam_size=2, max_len_b=2)
    assert model.training
    model.eval()
    greedy_decode(model, src, BOS_ID, EOS_ID, max_len_b=2)
    assert not model.training


# ---- beam search on the real model --------------------------------------------------------------

def test_beam_size_1_equals_greedy(model, src):
    for max_len_a, max_len_b in [(1.0, 5), (0.5, 0), (0.0, 2)]:
        greedy = greedy_decode(model, src, BOS_ID, EOS_ID, max_len_a=max_len_a, max_len_b=max_len_b)
        beam = beam_search(model, src, BOS_ID, EOS_ID, beam_size=1, max_len_a=max_len_a, max_len_b=max_len_b)
        assert beam == greedy, (max_len_a, max_len_b)


@pytest.mark.parametrize("beam_size", [2, 4])
def test_beam_cached_equals_uncached(model, src, beam_size):
    hyps_c, scores_c = beam_search(model, src, BOS_ID, EOS_ID, beam_size=beam_size, max_len_b=6,
                                   use_cache=True, return_scores=True)
    hyps_u, scores_u = beam_search(model, src, BOS_ID, EOS_ID, beam_size=beam_size, max_len_b=6,
                                   use_cache=False, return_scores=True)
    assert hyps_c == hyps_u
    np.testing.assert_allclose(scores_c, scores_u, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_scores_are_the_normalised_log_probability_of_the_returned_hypothesis(model, src, alpha):
    """score = log P(hyp [+ eos] | src) / lp(|hyp| + 1) when it ended with eos, log P(hyp) / lp(|hyp|)
    when it ran into the length limit; recomputed here by teacher forcing."""
    max_len_b = 4
    hyps, scores = beam_search(model, src, BOS_ID, EOS_ID, beam_size=4, alpha=alpha, max_len_b=max_len_b,
                               return_scores=True)
    limits = source_lengths(src) + max_len_b
    assert len(hyps) == len(scores) == len(src)
    for b, (hyp, score) in enumerate(zip(hyps, scores)):
        assert len(hyp) <= limits[b] and EOS_ID not in hyp
        logp = teacher_forced_logprobs(model, src[b], hyp)
        total = sum(logp[i, t] for i, t in enumerate(hyp))
        if len(hyp) < limits[b]:             # ended with eos: its probability counts, and its length
            expected = (total + logp[len(hyp), EOS_ID]) / length_penalty(len(hyp) + 1, alpha)
        else:
            expected = total / length_penalty(len(hyp), alpha)
        assert score == pytest.approx(expected, rel=1e-4, abs=1e-4), b


def test_beam_batch_equals_one_sentence_at_a_time(model, src):
    hyps, scores = beam_search(model, src, BOS_ID, EOS_ID, beam_size=3, max_len_b=4, return_scores=True)
    for b in range(0, len(src), 3):
        alone = src[b:b + 1, :source_lengths(src)[b]]
        h, s = beam_search(model, alone, BOS_ID, EOS_ID, beam_size=3, max_len_b=4, return_scores=True)
        assert h == [hyps[b]]
        assert s[0] == pytest.approx(scores[b], rel=1e-5, abs=1e-5)


def test_max_length_is_source_length_plus_max_len_b(model, src):
    for max_len_a, max_len_b in [(1.0, 0), (1.0, 2), (0.5, 1), (0.0, 3)]:
        limits = (max_len_a * source_lengths(src) + max_len_b).astype(int)
        for out in (greedy_decode(model, src, BOS_ID, EOS_ID, max_len_a=max_len_a, max_len_b=max_len_b),
                    beam_search(model, src, BOS_ID, EOS_ID, beam_size=3, max_len_a=max_len_a, max_len_b=max_len_b)):
            assert all(len(o) <= lim for o, lim in zip(out, limits)), (max_len_a, max_len_b)


def test_outputs_stop_where_the_models_positions_end(device):
    """Source length + 50 may pass the positional table (``max_len``): decoding stops there instead
    of failing part-way. eos = pad is never predicted, so every output runs to its limit."""
    model = Transformer(**dict(CONFIG, max_len=12)).to(device)
    src = np.array([[5, 6, 7, 8, 9]])
    outs = [greedy_decode(model, src, BOS_ID, PAD_ID, use_cache=use_cache) for use_cache in (True, False)]
    outs += [beam_search(model, src, BOS_ID, PAD_ID, beam_size=2, use_cache=use_cache, fixed_cache=fixed)
             for use_cache, fixed in [(True, False), (False, False), (True, True)]]
    assert [len(out[0]) for out in outs] == [12] * 5


def test_an_eos_outside_the_vocabulary_runs_every_sentence_to_its_own_limit(device, src):
    """What benchmarks/decode.py does to decode to full length: an eos the model cannot emit.
    Sentences that reach their limits at different steps must not feed it to the decoder."""
    model = Transformer(**CONFIG).to(device)
    limits = (source_lengths(src) + 3).tolist()
    outs = [greedy_decode(model, src, BOS_ID, VOCAB, max_len_b=3, use_cache=use_cache) for use_cache in (True, False)]
    outs += [beam_search(model, src, BOS_ID, VOCAB, beam_size=3, max_len_b=3, use_cache=use_cache, fixed_cache=fixed)
             for use_cache, fixed in [(True, False), (False, False), (True, True)]]
    for out in outs:
        assert [len(o) for o in out] == limits


@pytest.mark.parametrize("beam_size", [0, -1, -4])
def test_invalid_beam_size_raises(beam_size, src):
    model = Transformer(**CONFIG)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, src, BOS_ID, EOS_ID, beam_size=beam_size)


# ---- beam search against exhaustive search ------------------------------------------------------

class BigramLM:
    """A stand-in for the Transformer with the decoding interface (``encode``, ``decode``,
    ``new_cache``, ``reset_cache``, ``parameters``): the next-token logits depend only on the
    previous token, ``table[prev]``."""

    pad_id = PAD_ID

    def __init__(self, table):
        self.table = np.asarray(table, dtype=np.float64)   # (V, V)
        self.training = True
        self.calls = {"cached": 0, "full": 0}

    def eval(self):
        return self.train(False)

    def train(self, mode=True):
        self.training = mode
        return self

    def encode(self, src_ids):
        return mt.tensor(np.zeros((len(src_ids), src_ids.shape[1], 1))), None

    def new_cache(self, batch=None, max_len=None):     # fixed-size or growing: nothing to keep
        return {"length": 0, "layers": []}

    def reset_cache(self, cache, memory):               # a kept fixed-size search starts again
        cache["length"] = 0

    def parameters(self):
        return []

    def decode(self, tgt_ids, memory, src_mask, cache=None, last_only=False):
        assert tgt_ids.shape[0] == memory.shape[0]
        if last_only:
            tgt_ids = np.asarray(tgt_ids)[:, -1:]
        if cache is not None:   # the cached path is handed the newest token only
            assert tgt_ids.shape[1] == 1
            cache["length"] += 1
        self.calls["cached" if cache is not None else "full"] += 1
        return mt.tensor(self.table[np.asarray(tgt_ids)], dtype="float64")   # (B, T, V)


def log_softmax_rows(table):
    return table - np.logaddexp.reduce(table, axis=1, keepdims=True)


def exhaustive_best(table, limit, alpha):
    """The best normalised hypothesis over *all* outputs up to ``limit`` tokens: ``y + eos`` scored
    ``log P / lp(|y| + 1)`` for ``|y| < limit``; ``y`` of exactly ``limit`` tokens scored ``log P / lp(limit)``."""
    logp = log_softmax_rows(table)
    tokens = [t for t in range(len(table)) if t not in (EOS_ID, PAD_ID)]   # padding is never predicted
    best = (-np.inf, None)
    for n in range(limit + 1):
        for y in itertools.product(tokens, repeat=n):
            prev = (BOS_ID, *y)
            total = sum(logp[prev[i], y[i]] for i in range(n))
            score = ((total + logp[prev[-1], EOS_ID]) / length_penalty(n + 1, alpha) if n < limit
                     else total / length_penalty(limit, alpha))
            if score > best[0]:
                best = (score, list(y))
    return best


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
@pytest.mark.parametrize("use_cache", [True, False])
def test_wide_beam_finds_the_exhaustive_best(rng, alpha, use_cache):
    """With a beam wider than the number of hypotheses nothing is pruned, so beam search must
    return exactly the best normalised hypothesis and its score."""
    # 4 tokens besides eos and pad, 4 steps: at most 4^3 · 5 = 320 finite candidates at the last
    # step, so with K = 512 every one of them ranks among the K best and nothing is pruned.
    V, limit, K = 6, 4, 512
    src = np.array([[3, 4, 4], [4, PAD_ID, PAD_ID]])
    for _ in range(4):
        table = rng.normal(0.0, 1.5, size=(V, V))
        table[:, EOS_ID] += rng.uniform(-1.0, 1.5)   # sometimes stopping early wins, sometimes not
        lm = BigramLM(table)
        hyps, scores = beam_search(lm, src, BOS_ID, EOS_ID, beam_size=K, alpha=alpha, max_len_a=0.0,
                                   max_len_b=limit, use_cache=use_cache, return_scores=True)
        best_score, best_hyp = exhaustive_best(table, limit, alpha)
        assert hyps == [best_hyp, best_hyp]               # the bigram LM ignores the source
        np.testing.assert_allclose(scores, [best_score] * 2, rtol=1e-12)
        assert lm.calls["cached" if use_cache else "full"] > 0 and lm.calls["full" if use_cache else "cached"] == 0


def test_length_penalty_changes_which_hypothesis_wins():
    """Stopping right away is a bit more likely than starting "5 6 5 6", which then goes on almost
    surely: without normalisation the empty output wins, with a strong α the long one does."""
    V = 7
    table = np.full((V, V), -5.0)
    table[:, EOS_ID] = -20.0
    table[BOS_ID, EOS_ID] = 0.0       # p(eos | bos) ≈ 0.54
    table[BOS_ID, 5] = -0.2           # p(5 | bos) ≈ 0.44
    table[5, 6] = table[6, 5] = 5.0   # then 6, 5, 6, … almost surely
    src = np.array([[4]])
    short = beam_search(BigramLM(table), src, BOS_ID, EOS_ID, beam_size=4, alpha=0.0, max_len_a=0.0, max_len_b=4)
    long = beam_search(BigramLM(table), src, BOS_ID, EOS_ID, beam_size=4, alpha=3.0, max_len_a=0.0, max_len_b=4)
    assert short == [[]]
    assert long == [[5, 6, 5, 6]]
    for alpha in (0.0, 3.0):
        assert beam_search(BigramLM(table), src, BOS_ID, EOS_ID, beam_size=16, alpha=alpha, max_len_a=0.0,
                           max_len_b=4) == [exhaustive_best(table, 4, alpha)[1]]


def test_padding_is_never_predicted():
    """A model that prefers the pad id still decodes real tokens (a generated pad would be masked
    out of the uncached decoder's keys, and would end the sentence for ``Batch`` and ``detokenize``)."""
    table = np.random.default_rng(1).normal(size=(6, 6))
    table[:, PAD_ID] = 10.0
    table[:, EOS_ID] = -10.0
    src = np.array([[4, 5, 4]])
    for use_cache in (True, False):
        for out in (greedy_decode(BigramLM(table), src, BOS_ID, EOS_ID, 0.0, 5, use_cache=use_cache),
                    beam_search(BigramLM(table), src, BOS_ID, EOS_ID, beam_size=3, max_len_a=0.0, max_len_b=5,
                                use_cache=use_cache)):
            assert len(out[0]) == 5 and PAD_ID not in out[0]


def test_length_limit_is_exact_when_eos_never_comes():
    """Outputs stop at ``max_len_a · source length + max_len_b`` tokens, per sentence."""
    table = np.random.default_rng(0).normal(size=(5, 5))
    table[:, EOS_ID] = -1e9
    src = np.array([[3, 4, 4, PAD_ID, PAD_ID], [3, PAD_ID, PAD_ID, PAD_ID, PAD_ID], [4, 4, 4, 4, 4]])
    for max_len_a, max_len_b in [(1.0, 2), (1.0, 0), (0.5, 1), (2.0, 0)]:
        expected = (max_len_a * np.array([3, 1, 5]) + max_len_b).astype(int).tolist()
        for use_cache in (True, False):
            greedy = greedy_decode(BigramLM(table), src, BOS_ID, EOS_ID, max_len_a, max_len_b, use_cache=use_cache)
            beam = beam_search(BigramLM(table), src, BOS_ID, EOS_ID, beam_size=3, max_len_a=max_len_a,
                               max_len_b=max_len_b, use_cache=use_cache)
            assert [len(o) for o in greedy] == expected
            assert [len(o) for o in beam] == expected


# ---- the vectorised beam search against the per-sentence loop it replaces --------------------------

def loop_beam_search(model, src_ids, bos_id, eos_id, beam_size, alpha=0.6, max_len_a=1.0, max_len_b=50,
                     use_cache=True):
    """Beam search written as a plain loop over sentences and candidates, on the host (the
    implementation ``decode.beam_search`` had before its bookkeeping became whole-array work).
    The model's log-probabilities come from the same function, so only the bookkeeping differs.
    Returns (hyps, scores)."""
    src_ids = np.asarray(src_ids)
    B, K = len(src_ids), beam_size
    limits = (max_len_a * source_lengths(src_ids) + max_len_b).astype(int)
    model.eval()
    with no_grad():
        memory, src_mask = model.encode(np.repeat(src_ids, K, axis=0))
        device = backend.device_of(memory.data)
        cache = model.new_cache() if use_cache else None
        tokens = np.full((B * K, 1), bos_id, dtype=np.int64)
        scores = np.full((B, K), -np.inf)
        scores[:, 0] = 0.0
        finished = [[] for _ in range(B)]
        done = np.zeros(B, dtype=bool)
        for step in range(int(limits.max())):
            logp = backend.to_numpy(_step_logprobs(model, tokens, memory, src_mask, cache))
            V = logp.shape[1]
            candidates = (scores[:, :, None] + logp.reshape(B, K, V)).reshape(B, K * V)
            order = np.lexsort((np.broadcast_to(np.arange(K * V), candidates.shape), -candidates), axis=1)
            top = order[:, :min(2 * K, K * V)]
            rows = np.arange(B * K).reshape(B, K).copy()
            next_tokens = np.full((B, K), eos_id, dtype=np.int64)
            for b in np.flatnonzero(~done):
                alive = 0
                for rank, flat in enumerate(top[b]):
                    score = candidates[b, flat]
                    beam, token = divmod(int(flat), V)
                    if not np.isfinite(score):
                        break
                    prefix = tokens[b * K + beam, 1:].tolist()
                    if token == eos_id:
                        if rank < K and len(finished[b]) < K:
                            finished[b].append((score / length_penalty(step + 1, alpha), prefix))
                    elif alive < K:
                        rows[b, alive], next_tokens[b, alive], scores[b, alive] = b * K + beam, token, score
                        alive += 1
                scores[b, alive:] = -np.inf
                if len(finished[b]) >= K or step + 1 >= limits[b]:
                    done[b] = True
                    if step + 1 >= limits[b]:
                        for k in range(alive):
                            prefix = tokens[rows[b, k], 1:].tolist() + [int(next_tokens[b, k])]
                            finished[b].append((scores[b, k] / length_penalty(step + 1, alpha), prefix))
            if done.all():
                break
            tokens = np.concatenate([tokens[rows.reshape(-1)], next_tokens.reshape(-1, 1)], axis=1)
            if cache is not None:
                _reorder_cache(cache, backend.to_device(rows.reshape(-1), device))
    best = [max(f, key=lambda h: h[0]) if f else (-np.inf, []) for f in finished]
    return [h for _, h in best], [s for s, _ in best]


@pytest.mark.parametrize("fixed_cache", [False, True])
@pytest.mark.parametrize("beam_size", [1, 2, 3, 5])
def test_beam_search_equals_the_per_sentence_loop(model, src, beam_size, fixed_cache):
    for alpha, max_len_a, max_len_b in [(0.6, 1.0, 4), (0.0, 0.5, 1), (1.5, 1.0, 8)]:
        hyps, scores = beam_search(model, src, BOS_ID, EOS_ID, beam_size, alpha, max_len_a, max_len_b,
                                   fixed_cache=fixed_cache, return_scores=True)
        ref_hyps, ref_scores = loop_beam_search(model, src, BOS_ID, EOS_ID, beam_size, alpha, max_len_a, max_len_b)
        assert hyps == ref_hyps, (alpha, max_len_a, max_len_b)
        # the same log-probabilities, except that a fixed-size cache's attention also adds the
        # masked positions' zeros (float32 rounding; tests below check it exactly in float64)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5 if fixed_cache else 1e-12)


@pytest.mark.parametrize("use_cache, fixed_cache", [(True, False), (True, True), (False, False)])
def test_beam_search_equals_the_loop_when_many_hypotheses_end(rng, use_cache, fixed_cache):
    """Tables where eos is likely: hypotheses end at different steps, an eos often ranks below
    the K best (and must not end a hypothesis), and sentences fill their K ended slots early."""
    V = 9
    src = np.array([[3, 4, 4, 5], [4, PAD_ID, PAD_ID, PAD_ID], [5, 6, PAD_ID, PAD_ID]])
    for trial in range(12):
        table = rng.normal(0.0, 1.0, size=(V, V))
        table[:, EOS_ID] += rng.uniform(-0.5, 2.5)
        for K in (1, 2, 3, 6):
            hyps, scores = beam_search(BigramLM(table), src, BOS_ID, EOS_ID, K, 0.6, 1.0, 3,
                                       use_cache=use_cache, fixed_cache=fixed_cache, return_scores=True)
            ref_hyps, ref_scores = loop_beam_search(BigramLM(table), src, BOS_ID, EOS_ID, K, 0.6, 1.0, 3,
                                                    use_cache=use_cache)
            assert hyps == ref_hyps, (trial, K)
            np.testing.assert_allclose(scores, ref_scores, rtol=1e-12)


# ---- the fixed-size cache (what a CUDA graph replays) ---------------------------------------------

@pytest.mark.parametrize("variant", [{}, dict(norm_first=True, learned_positions=True, share_embeddings=False)])
def test_a_fixed_size_cache_gives_the_logits_of_the_whole_prefix(rng, device, variant):
    """Step by step over preallocated buffers (float64) = the decoder run on the whole prefix."""
    mt.set_default_dtype("float64")         # (the conftest fixture puts it back)
    model = Transformer(**CONFIG, **variant).to(device)
    src, tgt = rng.integers(4, VOCAB, size=(3, 7)), rng.integers(4, VOCAB, size=(3, 9))
    with no_grad():
        memory, src_mask = model.encode(src)
        full = backend.to_numpy(model.decode(tgt, memory, src_mask).data)
        cache = model.new_cache(3, 12)      # more positions than used: the rest stay masked out
        steps = [backend.to_numpy(model.decode(tgt[:, i:i + 1], memory, src_mask, cache).data) for i in range(9)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-10, atol=1e-12)
    assert int(cache["position"]) == 9 and cache["layers"][0]["self"]["k"].shape == (3, 2, 12, 16)


def test_a_fixed_size_cache_refuses_what_it_cannot_hold(rng):
    model = Transformer(**CONFIG)
    memory, src_mask = model.encode(rng.integers(4, VOCAB, size=(2, 5)))
    cache = model.new_cache(2, 2)
    with pytest.raises(ValueError, match=r"one token per step .* \(2, 1\), got \(2, 2\)"):
        model.decode(np.full((2, 2), BOS_ID), memory, src_mask, cache)
    with pytest.raises(ValueError, match=r"\(2, 1\), got \(3, 1\)"):
        model.decode(np.full((3, 1), BOS_ID), memory, src_mask, cache)
    for _ in range(2):
        model.decode(np.full((2, 1), BOS_ID), memory, src_mask, cache)
    with pytest.raises(ValueError, match="holds 2 positions and all are used"):
        model.decode(np.full((2, 1), BOS_ID), memory, src_mask, cache)
    with pytest.raises(ValueError, match="max_len=65 passes the model's max_len=64"):
        model.new_cache(2, 65)
    with pytest.raises(ValueError, match="batch >= 1 and max_len >= 1"):
        model.new_cache(2)


def test_cuda_graph_decoding_is_refused_where_it_cannot_run(src):
    model = Transformer(**CONFIG)
    with pytest.raises(ValueError, match="cuda_graph needs the model on the GPU, it is on cpu"):
        beam_search(model, src, BOS_ID, EOS_ID, cuda_graph=True)
    with pytest.raises(ValueError, match="need the key/value cache"):
        beam_search(model, src, BOS_ID, EOS_ID, use_cache=False, fixed_cache=True)


# ---- top-k (beam search's candidates) ------------------------------------------------------------

def test_top_k_variants_agree_best_first_ties_to_the_lower_index(rng, device):
    """The partition (CPU), argmax-rounds and stable-sort (GPU) top-k give the same indices, best
    first, equal scores by ascending index; rows with a few finite scores keep them in front."""
    xp = backend.xp_for(device)
    scores = rng.integers(0, 6, size=(7, 40)).astype(np.float64)   # many ties
    scores[2, 3:] = -np.inf                                        # only 3 finite
    expected = np.lexsort((np.broadcast_to(np.arange(40), scores.shape), -scores), axis=1)
    for k in (1, 3, 8, 40):
        for top in (backend.top_k(xp.asarray(scores), k), backend.top_k(xp.asarray(scores), k, capturable=True),
                    backend._top_k_argmax(xp.asarray(scores), k),
                    backend._top_k_partition(scores, k)):
            top = backend.to_numpy(top)
            assert top.shape == (7, k)
            finite = np.isfinite(np.take_along_axis(scores, expected[:, :k], axis=1))
            np.testing.assert_array_equal(np.where(finite, top, -1), np.where(finite, expected[:, :k], -1))


def test_the_decode_benchmark_runs_both_variants_to_full_length_with_the_same_output():
    import json
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"
    run = subprocess.run([sys.executable, str(script), "--config", "tiny", "--batch", "2", "--length", "24",
                          "--repeat", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["same_output"] is True and result["batch"] == 2 and result["length"] == 24
    assert result["cached"]["tokens_per_s"] > 0 and result["uncached"]["tokens_per_s"] > 0


def test_a_step_of_a_finished_search_changes_none_of_what_it_returns(rng):
    """A replayed search reads its "all done?" flag one step late (``cuda_graph.LaggedAll``), so one
    step may run after every sentence is done: it must leave the ended hypotheses, the live scores
    and the done flags as they are."""
    from minitransformer.decode import _Beams
    B, K, V, steps = 3, 4, 11, 6
    beams = _Beams(np, B, K, steps, BOS_ID, EOS_ID, 0.6, np.full(B, steps))
    for _ in range(3):                                     # a few real steps first
        beams.step(np.log(rng.dirichlet(np.ones(V), size=B * K)))
    beams.done[...] = True
    def state():      # the ended hypotheses' last slot is the dummy that writes not meant to land go to
        e = beams.ended
        return [a.copy() for a in (e.scores[:, :-1], e.lengths[:, :-1], e.tokens[:, :-1], e.count,
                                   beams.scores, beams.done)]
    before, best = state(), beams.ended.best()
    beams.step(np.log(rng.dirichlet(np.ones(V), size=B * K)))
    for a, b in zip(before, state()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(beams.rows, np.arange(B * K))     # the caches keep their rows
    assert beams.ended.best() == best


# ---- fixed-size searches kept for the next batch of their shape ----------------------------------

def same_shape_batches(rng, n=3, batch=6, width=7):
    """Batches of one shape (``batch × width``, one full-width row each, so the same longest
    output) with different tokens and lengths."""
    out = []
    for _ in range(n):
        seqs = random_sequences(rng, batch, max_len=width)
        seqs[0] = rng.integers(4, VOCAB, size=width).tolist()
        out.append(collate(seqs, seqs).src)
    return out


def test_a_kept_fixed_size_search_decodes_later_batches_of_its_shape_like_a_fresh_search(model, rng):
    """The second and third batch of a shape reuse the first one's search (its buffers refilled
    and reset in place, the cross-attention keys and values recomputed): the same hypotheses and
    scores as the growing cache, also after the weights change in place between batches."""
    from minitransformer import decode
    decode.release_searches(model)
    batches = same_shape_batches(rng)
    for i, src in enumerate(batches):
        if i == 2:
            model.decoder.layers[0].cross_attn.k_proj.weight.data[...] *= 1.5   # in place: still the same search
        got = beam_search(model, src, BOS_ID, EOS_ID, 3, max_len_b=5, fixed_cache=True, return_scores=True)
        want = beam_search(model, src, BOS_ID, EOS_ID, 3, max_len_b=5, return_scores=True)
        assert got[0] == want[0], i
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    (search,) = decode._KEPT[model].values()
    assert search.searches == 3


def test_searches_are_kept_per_shape_and_weights_and_can_be_released(rng):
    """A new shape or a parameter array at a new address (a recorded graph reads weights at their
    address) gets its own search; at most KEEP_SEARCHES are kept per model, the latest used."""
    from minitransformer import decode
    mt.manual_seed(2)
    model = Transformer(**CONFIG)
    a, b = same_shape_batches(rng, 2, width=5)
    (c,) = same_shape_batches(rng, 1, width=6)

    def search(src):
        beam_search(model, src, BOS_ID, EOS_ID, 2, max_len_b=3, fixed_cache=True)
        return list(decode._KEPT[model].values())[-1]
    first = search(a)
    assert search(b) is first and search(c) is not first
    assert search(a) is first and len(decode._KEPT[model]) == 2
    weight = model.generator.weight if model.generator is not None else model.embedding.weight
    weight.data = weight.data.copy()                     # the same values at a new address
    moved = search(a)
    assert moved is not first and moved.searches == 1
    assert len(decode._KEPT[model]) == decode.KEEP_SEARCHES     # the oldest (shape c) went
    assert beam_search(model, b, BOS_ID, EOS_ID, 2, max_len_b=3, fixed_cache=True) == \
        beam_search(model, b, BOS_ID, EOS_ID, 2, max_len_b=3)
    decode.release_searches(model)
    assert model not in decode._KEPT


def test_only_a_fixed_size_cache_is_reset_in_place():
    model = Transformer(**CONFIG)
    memory, _ = model.encode(np.array([[5, 6, 7]]))
    with pytest.raises(ValueError, match="reset_cache: only a fixed-size cache"):
        model.reset_cache(model.new_cache(), memory)


def test_kept_searches_go_with_their_model(rng):
    import gc

    from minitransformer import decode
    model = Transformer(**CONFIG)
    (src,) = same_shape_batches(rng, 1, width=4)
    beam_search(model, src, BOS_ID, EOS_ID, 2, max_len_b=2, fixed_cache=True)
    assert model in decode._KEPT
    kept = len(decode._KEPT)
    del model
    gc.collect()
    assert len(decode._KEPT) == kept - 1


def test_a_dropped_search_is_freed_without_waiting_for_the_cycle_collector(rng):
    """A search holds a GPU memory pool and graphs when replayed: dropping it from the kept ones
    must free it at once (no reference cycle through its step)."""
    import gc
    import weakref as wr

    from minitransformer import decode
    model = Transformer(**CONFIG)
    (src,) = same_shape_batches(rng, 1, width=4)
    beam_search(model, src, BOS_ID, EOS_ID, 2, max_len_b=2, fixed_cache=True)
    (search,) = decode._KEPT[model].values()
    gone = wr.ref(search)
    del search
    gc.disable()
    try:
        decode.release_searches(model)
        assert gone() is None
    finally:
        gc.enable()


def test_batches_whose_longest_outputs_differ_a_little_share_a_kept_search(rng):
    """Buffers hold outputs up to a multiple of 8 positions: a batch whose longest output is 7
    reuses the search of one whose longest is 8, and still gets the growing cache's results."""
    from minitransformer import decode
    mt.set_default_dtype("float64")
    mt.manual_seed(4)
    model = Transformer(**CONFIG)
    (a,) = same_shape_batches(rng, 1, width=5)             # longest source 5: outputs up to 8
    b = np.full_like(a, PAD_ID)
    b[:, :4] = rng.integers(4, VOCAB, size=(len(a), 4))    # longest source 4 (padded to 5): up to 7
    for src in (a, b):
        got = beam_search(model, src, BOS_ID, EOS_ID, 2, max_len_b=3, fixed_cache=True)
        assert got == beam_search(model, src, BOS_ID, EOS_ID, 2, max_len_b=3)
    (search,) = decode._KEPT[model].values()
    assert search.searches == 2 and search.cache["slots"].shape == (8,)
    decode.release_searches(model)


def test_searches_refuse_what_they_cannot_decode(src):
    model = Transformer(**CONFIG)
    for search in (greedy_decode, beam_search):
        op = search.__name__
        with pytest.raises(ValueError, match=rf"{op}: src_ids must be \(batch, length\).*\(3,\).*\[\[i, j, …\]\]"):
            search(model, [5, 6, 7], BOS_ID, EOS_ID)         # one sentence, not a batch of one
        with pytest.raises(ValueError, match=rf"{op}: src_ids of shape \(1, 0\) holds no tokens"):
            search(model, [[]], BOS_ID, EOS_ID)
        with pytest.raises(ValueError, match=rf"{op}: src_ids .*different lengths"):
            search(model, [[5, 6], [7]], BOS_ID, EOS_ID)
        for bad in (2.5, -1, VOCAB, None, True):
            with pytest.raises(ValueError, match=rf"{op}: bos_id must be an int in \[0, {VOCAB}\), "
                                                 rf"got {re.escape(repr(bad))}"):
                search(model, src, bad, EOS_ID)
        with pytest.raises(ValueError, match=rf"{op}: eos_id must be an int >= 0, got -3"):
            search(model, src, BOS_ID, -3)
        search(model, src, np.int64(BOS_ID), np.int64(EOS_ID), max_len_b=1)   # NumPy ints are ids too
        for bad in (-0.5, float("inf"), float("nan"), None, True):
            with pytest.raises(ValueError, match=rf"{op}: max_len_a must be a finite number >= 0"):
                search(model, src, BOS_ID, EOS_ID, max_len_a=bad)
        for bad in (2.5, None, True):       # negative is fine: a · length + b, as the benchmark uses it
            with pytest.raises(ValueError, match=rf"{op}: max_len_b must be an int, got {bad}"):
                search(model, src, BOS_ID, EOS_ID, max_len_b=bad)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match=rf"beam_search: beam_size must be an int >= 1, got {bad}"):
            beam_search(model, src, BOS_ID, EOS_ID, beam_size=bad)
