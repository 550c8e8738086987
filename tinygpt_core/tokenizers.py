"""Turn text into token ids and back: character, word and byte-level BPE tokenizers.

All three share one interface (``Tokenizer``) so the rest of the lab never cares which one a run
uses. Each can be saved to and loaded from a small JSON file; loading validates everything, because
tokenizer files come from run folders a user may have been handed by someone else.

Id layouts (stable, they are what the saved files mean):

- char: the sorted distinct characters of the training text, then the special tokens.
- word: ``<unk>`` (id 0), the kept pieces (most frequent first), then the special tokens.
- bpe:  the 256 byte values, then one id per merge in learning order, then the special tokens.

Special tokens (``<user>``, ...) are matched in the text before anything else, so each one always
encodes to a single id and decodes back to itself.

One subject, the three tokenizers behind one interface with their training, file format and
inspection helpers; hence past 400 lines.
"""

from __future__ import annotations

import codecs
import heapq
import json
import math
import operator
import os
import re
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .config import TOKENIZER_KINDS  # declared once, with the other config choices
from .errors import TokenizerError
from .fileio import write_text_atomic

DEFAULT_SPECIAL_TOKENS = ("<user>", "<assistant>", "<system>")
FORMAT_VERSION = 1

DEFAULT_BPE_VOCAB_SIZE = 512
# BPE training only looks at this many characters of the corpus: the merge statistics of 2 MB of
# text are already stable, and it keeps training within a few seconds in the app.
BPE_TRAIN_MAX_CHARS = 2_000_000

UNK_TOKEN = "<unk>"
BYTE_LABEL = "<0x{:02X}>"  # how a byte that is not a whole UTF-8 character is labelled, e.g. <0xE2>

# Limits on what a tokenizer file may contain. They are far above anything the lab trains and only
# exist so a hostile or corrupted file cannot make loading allocate unbounded memory.
_MAX_FILE_BYTES = 200_000_000
_MAX_VOCAB = 2_000_000
_MAX_MERGES = 1_000_000
_MAX_SPECIAL_TOKENS = 1_000
_MAX_SPECIAL_LEN = 256
_MAX_WORD_PIECE_LEN = 100_000

# Word pre-tokenisation: runs of letters, runs of digits, runs of whitespace, and any other single
# character (punctuation, symbols, combining marks). Together the alternatives match every
# character, so joining the pieces gives back the text exactly.
_WORD_PATTERN = re.compile(r"[^\W\d_]+|\d+|\s+|.", re.DOTALL)

# BPE pre-tokenisation, modelled on GPT-2's pattern but written for the standard ``re`` module:
# ``[^\W\d_]`` is "a letter", ``\d`` a digit, ``[^\s\w]|_`` anything else that is not whitespace.
# Merges never cross a chunk boundary, so "dog" and " dog" become tokens but "dog." does not.
# Every character is matched by some alternative, which is what makes BPE round-trip any text.
_BPE_PATTERN_NAME = "gpt2-like-re-v1"
_BPE_PATTERN = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")

# Per-chunk encoding results are memoised; the cache is simply emptied when it grows past this.
_BPE_CACHE_MAX = 200_000


# ---------------------------------------------------------------------------------------------
# The shared interface


class Tokenizer(ABC):
    """Maps text to a list of integer ids and back. Subclasses define the vocabulary."""

    kind: str = ""

    def __init__(self, special_tokens: Sequence[str]) -> None:
        self.special_tokens: tuple[str, ...] = _validate_special_tokens(special_tokens)
        # Longest first so that a special token that is a prefix of another never wins wrongly.
        ordered = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")") if ordered else None

    # --- the interface -----------------------------------------------------------------------

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct ids; valid ids are 0 .. vocab_size - 1."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``."""

    @abstractmethod
    def _id_to_text(self, i: int) -> str:
        """Readable text of one (already range-checked) id."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text for a sequence of ids; ids outside the vocabulary raise ``TokenizerError``."""
        return "".join(self._id_to_text(i) for i in self._check_ids(ids))

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """One readable label per id (whitespace is left as it is, so callers can escape it)."""
        return [self._id_to_text(i) for i in self._check_ids(ids)]

    def unknown_symbols(self, text: str) -> list[str]:
        """Distinct symbols of ``text`` that ``encode`` would reject or map to ``<unk>``."""
        return []

    @property
    def special_token_ids(self) -> dict[str, int]:
        """Id of each special token, e.g. ``{"<user>": 65, ...}``."""
        base = self.vocab_size - len(self.special_tokens)
        return {t: base + k for k, t in enumerate(self.special_tokens)}

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description from which ``tokenizer_from_dict`` rebuilds this."""

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as JSON, atomically (a reader never sees a half-written file)."""
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=1) + "\n", fsync=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, special_tokens={list(self.special_tokens)})"

    # --- helpers for subclasses ----------------------------------------------------------------

    def _split_specials(self, text: str) -> Iterator[tuple[str, bool]]:
        """Yield (piece, is_special) covering ``text`` in order; empty pieces are skipped."""
        if self._special_re is None:
            if text:
                yield text, False
            return
        # re.split with one capturing group alternates plain text (even indices) and matches.
        for k, piece in enumerate(self._special_re.split(text)):
            if piece:
                yield piece, k % 2 == 1

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        if hasattr(ids, "tolist"):  # torch tensors and numpy arrays
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)):
            raise TokenizerError("decode expects a sequence of integer token ids, not text.")
        out: list[int] = []
        n = self.vocab_size
        for i in ids:
            try:
                i = operator.index(i)
            except TypeError:
                raise TokenizerError(f"Token ids must be integers, got {type(i).__name__} ({i!r}).") from None
            if not 0 <= i < n:
                raise TokenizerError(
                    f"Token id {i} is outside this tokenizer's vocabulary (0..{n - 1}). "
                    "The ids probably come from a different tokenizer or model."
                )
            out.append(i)
        return out

    def _base_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "version": FORMAT_VERSION,
            "special_tokens": list(self.special_tokens),
        }


# ---------------------------------------------------------------------------------------------
# Character level


class CharTokenizer(Tokenizer):
    """One id per distinct character of the training text (plus one per special token)."""

    kind = "char"

    def __init__(self, chars: Sequence[str], special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS):
        super().__init__(special_tokens)
        self.chars: list[str] = list(chars)
        self._itos: list[str] = self.chars + list(self.special_tokens)
        self._stoi: dict[str, int] = {c: i for i, c in enumerate(self.chars)}
        self._special_ids = self.special_token_ids

    @classmethod
    def train(cls, text: str, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> CharTokenizer:
        return cls(sorted(set(text)), special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        stoi = self._stoi
        for piece, special in self._split_specials(text):
            if special:
                ids.append(self._special_ids[piece])
                continue
            try:
                ids.extend([stoi[c] for c in piece])
            except KeyError:
                unknown = self.unknown_symbols(text)
                shown = ", ".join(repr(c) for c in unknown[:20]) + (", ..." if len(unknown) > 20 else "")
                noun, them = ("symbol", "it") if len(unknown) == 1 else ("symbols", "them")
                raise TokenizerError(
                    f"The text contains {len(unknown)} {noun} this tokenizer has never seen: {shown}. "
                    f"Remove {them}, or train on a corpus that contains {them}."
                ) from None
        return ids

    def unknown_symbols(self, text: str) -> list[str]:
        seen: dict[str, None] = {}  # dict keeps first-appearance order
        for piece, special in self._split_specials(text):
            if not special:
                for c in piece:
                    if c not in self._stoi:
                        seen[c] = None
        return list(seen)

    def _id_to_text(self, i: int) -> str:
        return self._itos[i]

    def to_dict(self) -> dict[str, Any]:
        return {**self._base_dict(), "vocab": list(self.chars)}


# ---------------------------------------------------------------------------------------------
# Word level


class WordTokenizer(Tokenizer):
    """One id per word, number, punctuation mark or whitespace run; rare pieces become ``<unk>``."""

    kind = "word"

    def __init__(self, pieces: Sequence[str], special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS):
        super().__init__(special_tokens)
        self.pieces: list[str] = list(pieces)
        self._itos: list[str] = [UNK_TOKEN] + self.pieces + list(self.special_tokens)
        self._stoi: dict[str, int] = {p: i + 1 for i, p in enumerate(self.pieces)}
        self._special_ids = self.special_token_ids
        # "<unk>" written in the text stands for the unknown token itself, so decode(encode(t)) == t
        # still holds for text produced by decode.
        self._special_ids.setdefault(UNK_TOKEN, 0)
        ordered = sorted(self._special_ids, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")")

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int | None = None,
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    ) -> WordTokenizer:
        special_tokens = _validate_special_tokens(special_tokens)
        reserved = 1 + len(special_tokens)  # <unk> and the special tokens
        if vocab_size is not None and vocab_size < reserved + 1:
            raise TokenizerError(
                f"A word vocabulary of {vocab_size} leaves no room for words: <unk> and the "
                f"{len(special_tokens)} special tokens already take {reserved} ids. "
                f"Use a vocabulary size of at least {reserved + 1}, or leave it empty to keep every word."
            )
        probe = cls([], special_tokens)  # only used for its special-token splitter
        counts: Counter[str] = Counter()
        for piece, special in probe._split_specials(text):
            if not special:
                counts.update(_WORD_PATTERN.findall(piece))
        # Most frequent first; ties broken alphabetically so training is deterministic.
        ranked = sorted(counts, key=lambda p: (-counts[p], p))
        if vocab_size is not None:
            ranked = ranked[: vocab_size - reserved]
        return cls(ranked, special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        stoi = self._stoi
        for piece, special in self._split_specials(text):
            if special:
                ids.append(self._special_ids[piece])
            else:
                ids.extend([stoi.get(w, 0) for w in _WORD_PATTERN.findall(piece)])
        return ids

    def unknown_symbols(self, text: str) -> list[str]:
        seen: dict[str, None] = {}
        for piece, special in self._split_specials(text):
            if not special:
                for w in _WORD_PATTERN.findall(piece):
                    if w not in self._stoi:
                        seen[w] = None
        return list(seen)

    def _id_to_text(self, i: int) -> str:
        return self._itos[i]

    def to_dict(self) -> dict[str, Any]:
        return {**self._base_dict(), "unk_token": UNK_TOKEN, "vocab": list(self.pieces)}


# ---------------------------------------------------------------------------------------------
# Byte-level BPE


def _merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of ``pair`` (left to right) by ``new_id``."""
    a, b = pair
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def readable_bytes(data: bytes) -> str:
    """A token's bytes as text: whole UTF-8 characters as themselves, any other byte as ``<0xE2>``.

    A byte-level BPE token can hold part of a multi-byte character (an emoji is four byte tokens
    until merges join them); a label of U+FFFD would hide which byte it is.
    """
    return data.decode("utf-8", errors=_BYTE_LABEL_ERRORS)


def _label_bytes(err: UnicodeDecodeError) -> tuple[str, int]:
    return "".join(BYTE_LABEL.format(b) for b in err.object[err.start : err.end]), err.end


_BYTE_LABEL_ERRORS = "tinygpt-byte-labels"
codecs.register_error(_BYTE_LABEL_ERRORS, _label_bytes)


def _to_bytes(text: str) -> bytes:
    # surrogatepass: a str holding a lone surrogate still encodes (BPE never fails); such text is
    # not valid Unicode, so it cannot come back exactly anyway.
    return text.encode("utf-8", errors="surrogatepass")


class BPETokenizer(Tokenizer):
    """Byte-level byte-pair encoding: 256 byte tokens, learned merges, then special tokens.

    Any text encodes (every string is a sequence of bytes), and decoding the ids gives the bytes
    back, so the round trip is exact even for emoji or scripts the tokenizer never saw in training.
    """

    kind = "bpe"

    def __init__(
        self,
        merges: Sequence[tuple[int, int]],
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    ):
        super().__init__(special_tokens)
        self.merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges]
        # A merge's rank is the id it creates: lower ids were learned earlier and apply first.
        self._ranks: dict[tuple[int, int], int] = {p: 256 + k for k, p in enumerate(self.merges)}
        self._bytes: list[bytes] = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            self._bytes.append(self._bytes[a] + self._bytes[b])
        self._bytes.extend(t.encode("utf-8") for t in self.special_tokens)
        self._special_ids = self.special_token_ids
        self._cache: dict[str, list[int]] = {}

    # --- training --------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int = DEFAULT_BPE_VOCAB_SIZE,
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    ) -> BPETokenizer:
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from (the first 2 MB of) ``text``.

        Stops early if the text has no pair left to merge, so the vocabulary can end up smaller.
        """
        special_tokens = _validate_special_tokens(special_tokens)
        minimum = 256 + len(special_tokens)
        if vocab_size < minimum:
            raise TokenizerError(
                f"A BPE vocabulary of {vocab_size} is too small: the 256 byte tokens and "
                f"{len(special_tokens)} special tokens already need {minimum}. "
                f"Use a vocabulary size of at least {minimum} (512 to 4096 is typical)."
            )
        n_merges = vocab_size - minimum

        # Merges never cross chunk boundaries, so training only needs each distinct chunk once,
        # weighted by how often it occurs: a few tens of thousands of words instead of a megabyte.
        probe = cls([], special_tokens)
        chunk_counts: Counter[str] = Counter()
        for piece, special in probe._split_specials(text[:BPE_TRAIN_MAX_CHARS]):
            if not special:
                chunk_counts.update(_BPE_PATTERN.findall(piece))
        words: list[list[int]] = [list(_to_bytes(c)) for c in chunk_counts]
        freqs: list[int] = list(chunk_counts.values())

        # pair -> total count over all chunks, and pair -> chunks that (may) contain it.
        counts: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for wi, w in enumerate(words):
            for p in zip(w, w[1:]):
                counts[p] += freqs[wi]
                where[p].add(wi)

        # Max-heap of (-count, pair) with lazy deletion: an entry is only trusted when its count
        # still equals the live count. Ties go to the smallest pair, so training is deterministic.
        heap = [(-c, p) for p, c in counts.items()]
        heapq.heapify(heap)

        merges: list[tuple[int, int]] = []
        while len(merges) < n_merges:
            best = None
            while heap:
                neg, p = heapq.heappop(heap)
                if counts.get(p, 0) == -neg and -neg > 0:
                    best = p
                    break
            if best is None:
                break  # nothing left to merge: the text is fully merged into its chunks
            new_id = 256 + len(merges)
            merges.append(best)

            # Only chunks containing the pair change; update the counts of just their pairs.
            touched: set[tuple[int, int]] = set()
            for wi in where.pop(best, ()):
                w = words[wi]
                merged = _merge_pair(w, best, new_id)
                if len(merged) == len(w):
                    continue  # stale index entry: an earlier merge already consumed this pair
                f = freqs[wi]
                for p in zip(w, w[1:]):
                    counts[p] -= f
                    touched.add(p)
                for p in zip(merged, merged[1:]):
                    counts[p] += f
                    where[p].add(wi)
                    touched.add(p)
                words[wi] = merged
            counts.pop(best, None)
            for p in touched:
                c = counts.get(p, 0)
                if c > 0:
                    heapq.heappush(heap, (-c, p))
                else:
                    counts.pop(p, None)
        return cls(merges, special_tokens)

    # --- the interface ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece, special in self._split_specials(text):
            if special:
                ids.append(self._special_ids[piece])
            else:
                for chunk in _BPE_PATTERN.findall(piece):
                    ids.extend(self._encode_chunk(chunk))
        return ids

    def _encode_chunk(self, chunk: str) -> list[int]:
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        ids = list(_to_bytes(chunk))
        ranks = self._ranks
        while len(ids) >= 2:
            # The earliest-learned merge present in this chunk applies next, as in training.
            pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, math.inf))
            if pair not in ranks:
                break
            ids = _merge_pair(ids, pair, ranks[pair])
        if len(self._cache) >= _BPE_CACHE_MAX:
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        # Decoded as a whole, not token by token: a character split over several byte tokens joins up.
        raw = b"".join(self._bytes[i] for i in self._check_ids(ids))
        # A model can emit half of a multi-byte character; show U+FFFD rather than failing.
        return raw.decode("utf-8", errors="replace")

    def _id_to_text(self, i: int) -> str:
        return readable_bytes(self._bytes[i])

    def to_dict(self) -> dict[str, Any]:
        return {
            **self._base_dict(),
            "pre_tokenizer": _BPE_PATTERN_NAME,
            "vocab_size": self.vocab_size,
            "merges": [[a, b] for a, b in self.merges],
        }

    # --- inspection ------------------------------------------------------------------------------

    def merge_labels(self) -> list[tuple[str, str, str]]:
        """(left, right, merged) as readable strings, one per merge in learning order."""
        label = self._id_to_text
        return [(label(a), label(b), label(256 + k)) for k, (a, b) in enumerate(self.merges)]

    def encode_steps(self, text: str, max_steps: int | None = None) -> list[list[str]]:
        """Token strings of ``text`` after 0, 1, 2, ... merges, for a step-by-step display.

        Step 0 is the raw bytes. Each later step applies the earliest-learned merge that occurs
        anywhere in the text (everywhere it occurs), so only steps that change something are
        listed, and the last step equals ``token_strings(encode(text))`` when ``max_steps`` does
        not cut it short. (Applying the lowest-ranked pair globally is the same as encoding each
        chunk on its own: in every chunk that contains it, it is also the lowest-ranked pair.)
        Each step rescans the whole text, so this is meant for display-sized text, not corpora.
        """
        # Each segment is a chunk's id list; special tokens are single-id segments never merged.
        segments: list[list[int]] = []
        for piece, special in self._split_specials(text):
            if special:
                segments.append([self._special_ids[piece]])
            else:
                segments.extend(list(_to_bytes(c)) for c in _BPE_PATTERN.findall(piece))

        def labels() -> list[str]:
            return [self._id_to_text(i) for seg in segments for i in seg]

        steps = [labels()]
        ranks = self._ranks
        while max_steps is None or len(steps) <= max_steps:
            present = {p for seg in segments for p in zip(seg, seg[1:]) if p in ranks}
            if not present:
                break
            pair = min(present, key=ranks.__getitem__)
            new_id = ranks[pair]
            segments = [_merge_pair(seg, pair, new_id) if len(seg) > 1 else seg for seg in segments]
            steps.append(labels())
        return steps


# ---------------------------------------------------------------------------------------------
# Building, saving and loading


def train_tokenizer(
    kind: str,
    text: str,
    vocab_size: int | None = None,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
) -> Tokenizer:
    """Train a tokenizer of ``kind`` ("char" | "word" | "bpe"; "gpt2" is GPT-2's fixed one) on ``text``.

    ``vocab_size`` counts every id (special tokens and ``<unk>`` included). It is ignored for char
    (the text decides), the upper bound for word (default: every piece) and the target for bpe
    (default 512; at least 256 + the number of special tokens).
    """
    if kind not in TOKENIZER_KINDS:
        raise TokenizerError(f"Unknown tokenizer kind {kind!r}. Choose one of: {', '.join(TOKENIZER_KINDS)}.")
    if not isinstance(text, str) or not text:
        raise TokenizerError("Cannot train a tokenizer on empty text. Pick a corpus that has some text in it.")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0):
        raise TokenizerError(f"The vocabulary size must be a positive whole number, got {vocab_size!r}.")
    if kind == "gpt2":  # GPT-2's fixed vocabulary: nothing to train (gpt2_tokenizer.py)
        from .gpt2_tokenizer import gpt2_tokenizer

        return gpt2_tokenizer(vocab_size)
    if kind == "char":
        return CharTokenizer.train(text, special_tokens)
    if kind == "word":
        return WordTokenizer.train(text, vocab_size, special_tokens)
    return BPETokenizer.train(text, DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size, special_tokens)


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Read a tokenizer saved with ``Tokenizer.save``. Any problem raises ``TokenizerError``."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise TokenizerError(f"Tokenizer file {p} is {size:,} bytes, far too large to be a tokenizer.")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"Tokenizer file {p} does not exist. Check the run folder path.") from None
    except IsADirectoryError:
        raise TokenizerError(f"{p} is a folder, not a tokenizer file. Point to its tokenizer.json.") from None
    except OSError as e:
        raise TokenizerError(f"Cannot read tokenizer file {p}: {e.strerror or e}.") from None
    try:
        d = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TokenizerError(
            f"Tokenizer file {p} is not valid JSON ({e}). It may be damaged; retrain the tokenizer."
        ) from None
    return tokenizer_from_dict(d)


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from ``to_dict`` output, checking every field (the data is untrusted)."""
    if not isinstance(d, dict):
        raise TokenizerError(f"A tokenizer description must be a JSON object, got {type(d).__name__}.")
    kind = d.get("kind")
    if kind not in TOKENIZER_KINDS:
        raise TokenizerError(f"Unknown tokenizer kind {kind!r}; expected one of: {', '.join(TOKENIZER_KINDS)}.")
    version = d.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise TokenizerError(
            f"Unsupported tokenizer file version {version!r} (this TinyGPT Lab reads version {FORMAT_VERSION})."
        )
    expected = {
        "char": {"kind", "version", "special_tokens", "vocab"},
        "word": {"kind", "version", "special_tokens", "unk_token", "vocab"},
        "bpe": {"kind", "version", "special_tokens", "pre_tokenizer", "vocab_size", "merges"},
        "gpt2": {"kind", "version", "encoding"},
    }[kind]
    _check_keys(d, expected, kind)
    if kind == "gpt2":
        from .gpt2_tokenizer import gpt2_from_dict

        return gpt2_from_dict(d)

    specials = d["special_tokens"]
    if not isinstance(specials, list):
        raise TokenizerError("Tokenizer file: 'special_tokens' must be a list of strings.")
    specials = _validate_special_tokens(specials)

    if kind == "char":
        vocab = _string_list(d["vocab"], "vocab", max_len=_MAX_VOCAB)
        for c in vocab:
            if len(c) != 1:
                raise TokenizerError(f"Tokenizer file: char vocabulary entries must be single characters, got {c!r}.")
        return CharTokenizer(vocab, specials)

    if kind == "word":
        if d["unk_token"] != UNK_TOKEN:
            raise TokenizerError(f"Tokenizer file: 'unk_token' must be {UNK_TOKEN!r}, got {d['unk_token']!r}.")
        vocab = _string_list(d["vocab"], "vocab", max_len=_MAX_VOCAB)
        for w in vocab:
            if not w or len(w) > _MAX_WORD_PIECE_LEN:
                raise TokenizerError(
                    "Tokenizer file: word vocabulary entries must be non-empty, reasonably short strings."
                )
        return WordTokenizer(vocab, specials)

    # bpe
    if d["pre_tokenizer"] != _BPE_PATTERN_NAME:
        raise TokenizerError(
            f"Tokenizer file: unknown BPE pre-tokenizer {d['pre_tokenizer']!r} (expected {_BPE_PATTERN_NAME!r})."
        )
    merges_raw = d["merges"]
    if not isinstance(merges_raw, list):
        raise TokenizerError("Tokenizer file: 'merges' must be a list of [left, right] id pairs.")
    if len(merges_raw) > _MAX_MERGES:
        raise TokenizerError(f"Tokenizer file: {len(merges_raw):,} merges is more than the {_MAX_MERGES:,} allowed.")
    merges: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for k, m in enumerate(merges_raw):
        if not (isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m)):
            raise TokenizerError(f"Tokenizer file: merge {k} must be a pair of integer ids, got {m!r}.")
        a, b = m
        limit = 256 + k  # a merge may only combine bytes and tokens created by earlier merges
        if not (0 <= a < limit and 0 <= b < limit):
            raise TokenizerError(
                f"Tokenizer file: merge {k} uses id {a if not 0 <= a < limit else b}, but only ids "
                f"0..{limit - 1} exist at that point. The file is damaged."
            )
        if (a, b) in seen:
            raise TokenizerError(f"Tokenizer file: merge {k} repeats the pair {(a, b)}.")
        seen.add((a, b))
        merges.append((a, b))
    tok = BPETokenizer(merges, specials)
    vs = d["vocab_size"]
    if type(vs) is not int or vs != tok.vocab_size:
        raise TokenizerError(
            f"Tokenizer file: 'vocab_size' is {vs!r} but its merges and special tokens make {tok.vocab_size}."
        )
    return tok


# ---------------------------------------------------------------------------------------------
# Small helpers


def _validate_special_tokens(tokens: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tokens, str):
        raise TokenizerError("special_tokens must be a list of strings, not a single string.")
    tokens = tuple(tokens)
    if len(tokens) > _MAX_SPECIAL_TOKENS:
        raise TokenizerError(f"At most {_MAX_SPECIAL_TOKENS} special tokens are allowed, got {len(tokens)}.")
    for t in tokens:
        if not isinstance(t, str) or not t or len(t) > _MAX_SPECIAL_LEN:
            raise TokenizerError(
                f"Special tokens must be non-empty strings of at most {_MAX_SPECIAL_LEN} characters, got {t!r}."
            )
        if t == UNK_TOKEN:
            raise TokenizerError(f"{UNK_TOKEN!r} is reserved by the word tokenizer and cannot be a special token.")
    if len(set(tokens)) != len(tokens):
        raise TokenizerError("Special tokens must be distinct; remove the duplicates.")
    return tokens


def _string_list(value: Any, key: str, max_len: int) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise TokenizerError(f"Tokenizer file: {key!r} must be a list of strings.")
    if len(value) > max_len:
        raise TokenizerError(f"Tokenizer file: {key!r} has {len(value):,} entries, more than the {max_len:,} allowed.")
    if len(set(value)) != len(value):
        raise TokenizerError(f"Tokenizer file: {key!r} contains duplicate entries.")
    return value


def _check_keys(d: dict[str, Any], expected: set[str], kind: str) -> None:
    missing = sorted(expected - d.keys())
    if missing:
        raise TokenizerError(f"Tokenizer file ({kind}) is missing: {', '.join(missing)}. It may be damaged.")
    extra = sorted(str(k) for k in d.keys() - expected)
    if extra:
        raise TokenizerError(f"Tokenizer file ({kind}) has unexpected fields: {', '.join(extra)}.")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")
