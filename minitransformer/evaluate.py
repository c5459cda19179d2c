"""Translating and scoring (§6.1): sentences in, sentences out, and the BLEU of a test set.

``translate`` encodes sentences with the shared tokenizer, decodes them in batches of similar
length (beam search, or greedy for ``beam_size=1``) and returns the text in the caller's order.
``bleu`` translates the sources of (source, reference) pairs and scores them with sacreBLEU,
whose signature (``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:…``) says exactly how
the number was computed, so it can be compared with other sacreBLEU numbers (§6.1 reports BLEU
on newstest2014; we report it on a held-out Tatoeba split).

``attention_maps`` returns every attention weight of one translation as plain arrays, for
``viz.plot_all_attention``.
"""
import numpy as np

from . import backend
from .decode import beam_search, check_length_limits, greedy_decode, positions_of
from .progress import progress_bar
from .tensor import check_int, no_grad


def source_limit(model, max_len_a=1.0, max_len_b=50):
    """The most source tokens a translation may start from: the decoder writes up to
    ``max_len_a · S + max_len_b`` tokens after bos (§6.1), all within the model's positional table
    (``max_len``). None for a model without one."""
    positions = positions_of(model)
    return int((positions - max_len_b - 1) / max(max_len_a, 1.0)) if positions else None


def translate(model, tokenizer, sentences, beam_size=4, alpha=0.6, batch_size=64, max_len_a=1.0, max_len_b=50,
              max_src_len=None, progress=False, cuda_graph=False):
    """Translate ``sentences`` (a list of str); returns one str per sentence, in the same order.

    Sentences are sorted by token length and decoded ``batch_size`` at a time, so a batch pads
    little; the outputs are then put back in the input order. ``beam_size=1`` is greedy decoding,
    otherwise beam search with length penalty ``alpha`` (§6.1: beam 4, α = 0.6). The output is at
    most ``max_len_a · source length + max_len_b`` tokens (§6.1: source length + 50). Sources longer
    than ``max_src_len`` tokens (default: what the model's positional table leaves room for) are
    cut. An empty sentence translates to an empty string. ``cuda_graph`` (GPU): each batch's beam
    search replays its step as a CUDA graph (``decode.beam_search``; beam 1 too, which equals greedy);
    batches are then padded to widths of a multiple of 8 (padding is masked out), so that batches of
    one width replay the graphs a kept search recorded.
    """
    sentences = [str(s) for s in sentences]
    check_int("translate", "beam_size", beam_size, 1)
    check_int("translate", "batch_size", batch_size, 1)
    check_length_limits("translate", max_len_a, max_len_b)     # before source_limit computes with them
    positions = positions_of(model)
    if max_src_len is None:
        max_src_len = source_limit(model, max_len_a, max_len_b)
        max_src_len = 256 if max_src_len is None else max_src_len
    ids = [tokenizer.encode(s)[:max_src_len] for s in sentences]
    order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: len(ids[i]))
    out = [""] * len(sentences)
    bar = None
    if progress:
        bar = progress_bar(total=len(order), unit="sent", desc="translating", leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        if cuda_graph:      # padded to a multiple of 8: batches of one width reuse a kept search's graphs
            width = min(-(-width // 8) * 8, positions or width)
        src = np.full((len(chunk), width), model.pad_id, dtype=np.int64)     # (B, S)
        for row, i in enumerate(chunk):
            src[row, :len(ids[i])] = ids[i]
        if beam_size == 1 and not cuda_graph:
            hyps = greedy_decode(model, src, tokenizer.bos_id, tokenizer.eos_id, max_len_a, max_len_b)
        else:
            hyps = beam_search(model, src, tokenizer.bos_id, tokenizer.eos_id, beam_size, alpha,
                               max_len_a, max_len_b, cuda_graph=cuda_graph)
        for i, hyp in zip(chunk, hyps):
            out[i] = tokenizer.decode(hyp)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return out


def score(hypotheses, references):
    """sacreBLEU corpus BLEU and chrF of ``hypotheses`` against one reference each.

    Returns ``{"bleu", "chrf", "signature", "chrf_signature", "n"}``; the scores are on the 0–100
    scale, the signatures are sacreBLEU's own strings.
    """
    from sacrebleu.metrics import BLEU, CHRF
    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(f"score: {len(hypotheses)} hypotheses but {len(references)} references")
    if not references:
        raise ValueError("score: no sentences to score")
    bleu_metric, chrf_metric = BLEU(), CHRF()
    b = bleu_metric.corpus_score(hypotheses, [references])
    c = chrf_metric.corpus_score(hypotheses, [references])
    return {"bleu": float(b.score), "chrf": float(c.score), "signature": str(bleu_metric.get_signature()),
            "chrf_signature": str(chrf_metric.get_signature()), "n": len(hypotheses)}


def bleu(model, tokenizer, pairs, beam_size=4, alpha=0.6, batch_size=64, num_samples=3, progress=False,
         cuda_graph=False):
    """Translate the sources of ``pairs`` (a list of (source, reference)) and score them.

    Returns ``score()``'s dict plus ``beam_size``, ``alpha`` and ``samples``: ``num_samples``
    pairs spread evenly over ``pairs``, as ``{"src", "ref", "hyp"}`` dicts.
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("bleu: no sentence pairs to translate; if they are an empty split (too little data to hold "
                         "any out), score another one (evaluate --split valid or --split train) or train on more data")
    hyps = translate(model, tokenizer, [s for s, _ in pairs], beam_size, alpha, batch_size, progress=progress,
                     cuda_graph=cuda_graph)
    result = score(hyps, [r for _, r in pairs])
    shown = sorted(set(np.linspace(0, len(pairs) - 1, num_samples).round().astype(int).tolist())) if num_samples else []
    result.update(beam_size=beam_size, alpha=alpha,
                  samples=[{"src": pairs[i][0], "ref": pairs[i][1], "hyp": hyps[i]} for i in shown])
    return result


def attention_maps(model, tokenizer, text, translation=None):
    """Every attention weight of the model translating ``text``, as plain host arrays.

    The translation is decoded greedily (unless given), then one teacher-forced forward pass
    runs source → [bos] + translation and each ``MultiHeadAttention`` keeps the weights of that
    pass. Returns a dict: ``enc_self``, ``dec_self``, ``cross`` (lists over layers of
    ``(h, Lq, Lk)`` arrays: source×source, target×target, target×source), ``src_tokens`` and
    ``tgt_tokens`` (the subword pieces on the axes; the target starts with ``<s>``) and
    ``translation``.
    """
    src = tokenizer.encode(text)
    if not src:
        raise ValueError("attention_maps: the text is empty")
    src_ids = np.array([src], dtype=np.int64)                                   # (1, S)
    if translation is None:
        hyp = greedy_decode(model, src_ids, tokenizer.bos_id, tokenizer.eos_id)[0]
    else:
        hyp = tokenizer.encode(translation)
    tgt_in = np.array([[tokenizer.bos_id, *hyp]], dtype=np.int64)              # (1, T)
    was_training = model.training
    model.eval()
    with no_grad():
        model(src_ids, tgt_in)
    model.train(was_training)

    def host(attention):                                                        # (1, h, Lq, Lk) -> (h, Lq, Lk)
        w = attention.attention_weights
        return np.asarray(backend.to_numpy(getattr(w, "data", w)))[0]
    return {
        "enc_self": [host(layer.self_attn) for layer in model.encoder.layers],
        "dec_self": [host(layer.self_attn) for layer in model.decoder.layers],
        "cross": [host(layer.cross_attn) for layer in model.decoder.layers],
        "src_tokens": [tokenizer.id_to_piece(i) for i in src],
        "tgt_tokens": [tokenizer.id_to_piece(i) for i in tgt_in[0]],
        "translation": tokenizer.decode(hyp),
    }
