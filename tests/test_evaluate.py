"""Tests for minitransformer.evaluate: translate keeps the caller's order, BLEU/chrF via sacreBLEU,
attention maps of every layer."""
from pathlib import Path

import numpy as np
import pytest

import minitransformer as mt
from minitransformer import evaluate
from minitransformer.data import Tokenizer, read_pairs
from minitransformer.nn.transformer import Transformer

SAMPLE = Path(__file__).parent / "data" / "spa_sample.tsv"


@pytest.fixture(scope="module")
def pairs():
    return read_pairs(SAMPLE)


@pytest.fixture(scope="module")
def tok(pairs, tmp_path_factory):
    return Tokenizer.train([s for s, _ in pairs] + [t for _, t in pairs], vocab_size=300,
                           cache=tmp_path_factory.mktemp("tok"))


@pytest.fixture
def model(tok):
    mt.set_default_dtype("float64")   # batched and one-by-one decoding then agree to the last bit
    return Transformer(tok.vocab_size, d_model=16, num_heads=2, num_layers=2, d_ff=32, max_len=128)


@pytest.fixture
def echo(monkeypatch):
    """Replace both decoders by one that returns each source row unchanged, and record the batches."""
    widths = []

    def fake(model, src, bos_id, eos_id, *args, **kwargs):
        widths.append([int((row != model.pad_id).sum()) for row in src])
        return [[int(i) for i in row if i != model.pad_id] for row in src]
    monkeypatch.setattr(evaluate, "greedy_decode", fake)
    monkeypatch.setattr(evaluate, "beam_search", fake)
    return widths


@pytest.mark.parametrize("beam_size", [1, 3])
def test_translate_restores_order(model, tok, pairs, echo, rng, beam_size):
    sentences = [pairs[i][0] for i in rng.permutation(len(pairs))[:50]]
    out = evaluate.translate(model, tok, sentences, beam_size=beam_size, batch_size=int(rng.integers(1, 9)))
    assert out == sentences
    lengths = [n for batch in echo for n in batch]
    assert lengths == sorted(lengths)                 # decoded shortest first, so batches pad little
    assert len(lengths) == len(sentences)


def test_translate_empty_input(model, tok, echo):
    assert evaluate.translate(model, tok, []) == []
    assert evaluate.translate(model, tok, ["", "Hello.", ""]) == ["", "Hello.", ""]
    assert len(echo) == 1                             # the empty sentences are not decoded


@pytest.mark.parametrize("beam_size", [1, 2])
def test_translate_batched_equals_one_by_one(model, tok, pairs, rng, beam_size):
    sentences = [pairs[i][0] for i in rng.choice(len(pairs), 6, replace=False)]
    batched = evaluate.translate(model, tok, sentences, beam_size=beam_size, batch_size=4, max_len_b=8)
    single = [evaluate.translate(model, tok, [s], beam_size=beam_size, max_len_b=8)[0] for s in sentences]
    assert batched == single
    assert all(isinstance(s, str) for s in batched)


def test_translate_rejects_bad_settings(model, tok):
    with pytest.raises(ValueError, match="beam_size"):
        evaluate.translate(model, tok, ["Hi."], beam_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate.translate(model, tok, ["Hi."], batch_size=0)
    for name, bad in (("beam_size", 2.5), ("batch_size", 1.5), ("batch_size", True)):   # not counts
        with pytest.raises(ValueError, match=rf"translate: {name} must be an int >= 1, got {bad}"):
            evaluate.translate(model, tok, ["Hi."], **{name: bad})
    for name, bad in (("max_len_a", float("nan")), ("max_len_a", None), ("max_len_b", None), ("max_len_b", 1.5)):
        with pytest.raises(ValueError, match=rf"translate: {name} must be"):    # not a NumPy or Python error
            evaluate.translate(model, tok, ["Hi."], **{name: bad})


def test_score_of_references_against_themselves_is_100(pairs):
    refs = [t for _, t in pairs[:200]]
    result = evaluate.score(refs, refs)
    assert result["bleu"] == pytest.approx(100.0) and result["chrf"] == pytest.approx(100.0)
    assert result["n"] == 200
    assert "nrefs:1" in result["signature"] and "tok:13a" in result["signature"]
    assert "nrefs:1" in result["chrf_signature"]
    assert evaluate.score(["completely different words"] * 3, refs[:3])["bleu"] < 5


def test_score_checks_lengths():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        evaluate.score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no sentences"):
        evaluate.score([], [])


def test_bleu_with_a_perfect_translator(model, tok, pairs, monkeypatch):
    table = dict(pairs[:40])
    monkeypatch.setattr(evaluate, "translate", lambda model, tok, sources, *a, **k: [table[s] for s in sources])
    subset = list(table.items())
    result = evaluate.bleu(model, tok, subset, beam_size=2, num_samples=2)
    assert result["bleu"] == pytest.approx(100.0)
    assert result["n"] == len(subset) and result["beam_size"] == 2
    assert result["samples"] == [{"src": s, "ref": r, "hyp": r} for s, r in (subset[0], subset[-1])]
    assert len(evaluate.bleu(model, tok, subset, num_samples=5)["samples"]) == 5


def test_bleu_of_no_pairs_says_what_to_do(model, tok):
    with pytest.raises(ValueError, match=r"bleu: no sentence pairs.*--split valid or --split train\) or train on more"):
        evaluate.bleu(model, tok, [])


def test_bleu_runs_the_model(model, tok, pairs):
    result = evaluate.bleu(model, tok, pairs[:5], beam_size=2, num_samples=1)
    assert 0.0 <= result["bleu"] <= 100.0 and result["n"] == 5 and len(result["samples"]) == 1


def test_attention_maps(model, tok):
    maps = evaluate.attention_maps(model, tok, "I like cats.")
    S, T = len(maps["src_tokens"]), len(maps["tgt_tokens"])
    assert maps["src_tokens"] == tok.pieces("I like cats.") and maps["tgt_tokens"][0] == "<s>"
    for kind, shape in [("enc_self", (2, S, S)), ("dec_self", (2, T, T)), ("cross", (2, T, S))]:
        assert len(maps[kind]) == 2
        for w in maps[kind]:
            assert isinstance(w, np.ndarray) and w.shape == shape
            np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    assert np.all(np.triu(maps["dec_self"][0][0], k=1) == 0)        # causal: no look-ahead
    assert tok.decode(tok.encode(maps["translation"])) == maps["translation"]


def test_attention_maps_of_a_given_translation(model, tok):
    maps = evaluate.attention_maps(model, tok, "Hello.", translation="Hola.")
    assert maps["tgt_tokens"] == ["<s>"] + tok.pieces("Hola.") and maps["translation"] == "Hola."
    with pytest.raises(ValueError, match="empty"):
        evaluate.attention_maps(model, tok, "")


def test_translate_pads_widths_to_multiples_of_8_for_replayed_searches(model, tok, pairs, monkeypatch):
    """With ``cuda_graph`` the batches are padded to widths of a multiple of 8 (so that batches of
    one width reuse a kept search), the padding being pad ids only; without it, to the longest."""
    widths = {}

    def fake(model, src, bos_id, eos_id, *args, cuda_graph=False, **kwargs):
        widths.setdefault(cuda_graph, []).append(src.shape[1])
        return [[int(i) for i in row if i != model.pad_id] for row in src]
    monkeypatch.setattr(evaluate, "beam_search", fake)
    sentences = [s for s, _ in pairs[:40]]
    for cuda_graph in (False, True):
        assert evaluate.translate(model, tok, sentences, batch_size=8, cuda_graph=cuda_graph) == sentences
    assert all(w % 8 == 0 for w in widths[True]) and any(w % 8 for w in widths[False])
    assert [-(-w // 8) * 8 for w in widths[False]] == widths[True]
