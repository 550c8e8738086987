"""Conversation sets for chat fine-tuning: the built-in one, a user's JSONL, and their batches.

``builtin:chat`` is written by the project and generated deterministically (no download): short
tasks on made-up lowercase words whose answers can be checked exactly and that a tiny character
model learns in minutes because each is a rule over letters it has seen, not a fact to memorise
(so the held-out prompts, whose words training never shows, can be answered): repeat a word,
spell it backwards, give its first or last letter, its length, or each letter's successor. A few
conversations carry a system message or an earlier exchange, so the format and the dropping of
old turns are exercised too. The held-out split is a fixed set of prompts, none of them in training.

A user's JSONL has one conversation per line, ``{"messages": [{"role": ..., "content": ...}, ...]}``;
every problem names its line. The last tenth of the lines (at least one) is held out.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .chat import ROLES, ChatFormatError, Encoded, Message, check_messages
from .errors import DataError

BUILTIN_PREFIX = "builtin:"
BUILTIN_CHAT = "builtin:chat"
MAX_JSONL_BYTES = 20_000_000
MAX_CONVERSATIONS = 200_000
HELDOUT_FRACTION = 0.1

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_SYSTEM_PROMPTS = ("Answer briefly.", "You are a word helper.")
# (prompt template, answer function): each a rule over the letters of the word.
_TASKS = (
    ("repeat {w}", lambda w: w),
    ("reverse {w}", lambda w: w[::-1]),
    ("first letter of {w}", lambda w: w[0]),
    ("last letter of {w}", lambda w: w[-1]),
    ("length of {w}", lambda w: str(len(w))),
    ("next letters of {w}", lambda w: "".join(_LETTERS[(_LETTERS.index(c) + 1) % 26] for c in w)),
)
BUILTIN_DESCRIPTION = (
    "Word tasks with exact answers (repeat, reverse, first/last letter, length, next letters) on made-up "
    "3-5 letter words; 4,000 training conversations, 240 held-out prompts."
)


@dataclass(frozen=True)
class ChatSet:
    """A conversation set: training conversations and held-out ones (whose last answer is checked)."""

    name: str
    source: str  # "builtin:chat" or the path / upload name the user gave
    text: str  # the source as text (the JSONL; for the built-in set its JSONL rendering): hashed and kept
    train: list[list[Message]]
    heldout: list[list[Message]]
    lines: list[int]  # the JSONL line of each train conversation, then of each held-out one

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def list_chat_sets() -> list[tuple[str, str]]:
    return [(BUILTIN_CHAT, BUILTIN_DESCRIPTION)]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 5)))


def _exchange(rng: random.Random, word: str) -> tuple[Message, Message]:
    template, answer = _TASKS[rng.randrange(len(_TASKS))]
    return Message("user", template.format(w=word)), Message("assistant", answer(word))


def builtin_chat(seed: int = 1234, n_train: int = 4000, n_heldout: int = 240) -> tuple[list, list]:
    """The built-in set: (train, held-out) conversations, the same on every machine.

    Held-out conversations use words that no training conversation contains, one task each.
    """
    rng = random.Random(seed)
    heldout_words: list[str] = []
    seen: set[str] = set()
    while len(heldout_words) < n_heldout // len(_TASKS):
        w = _word(rng)
        if w not in seen:
            seen.add(w)
            heldout_words.append(w)
    heldout = []
    for w in heldout_words:  # every task on every held-out word: accuracy covers each task equally
        for template, answer in _TASKS:
            heldout.append([Message("user", template.format(w=w)), Message("assistant", answer(w))])
    train = []
    while len(train) < n_train:
        w = _word(rng)
        if w in seen:
            continue
        conv: list[Message] = []
        r = rng.random()
        if r < 0.15:
            conv.append(Message("system", rng.choice(_SYSTEM_PROMPTS)))
        elif r < 0.3:
            other = _word(rng)
            if other in seen:
                continue
            conv.extend(_exchange(rng, other))  # an earlier exchange: multi-turn context
        conv.extend(_exchange(rng, w))
        train.append(conv)
    return train, heldout


def _to_jsonl(conversations: list[list[Message]]) -> str:
    return "".join(
        json.dumps({"messages": [{"role": m.role, "content": m.content} for m in c]}) + "\n" for c in conversations
    )


def load_chat_set(source: str, data: bytes | None = None) -> ChatSet:
    """``builtin:chat``, a JSONL file path, or (with ``data``) an upload named ``source``.

    DataError (ChatFormatError for the format) names the line and what is wrong.
    """
    if not isinstance(source, str) or not source.strip():
        raise DataError("Give a conversation set: builtin:chat or the path of a .jsonl file.")
    if data is None and source.startswith(BUILTIN_PREFIX):
        if source != BUILTIN_CHAT:
            raise DataError(f"Unknown built-in conversation set {source!r}; the built-in one is {BUILTIN_CHAT}.")
        train, heldout = builtin_chat()
        return ChatSet(
            "builtin:chat",
            source,
            _to_jsonl(train + heldout),
            train,
            heldout,
            list(range(1, len(train) + len(heldout) + 1)),
        )
    if data is None:
        path = Path(source).expanduser()
        try:
            if path.stat().st_size > MAX_JSONL_BYTES:
                raise DataError(
                    f"{path} is larger than {MAX_JSONL_BYTES // 1_000_000} MB; use a smaller conversation set."
                )
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"Conversation file {path} does not exist; check the path.") from None
        except IsADirectoryError:
            raise DataError(f"{path} is a folder; give a .jsonl file with one conversation per line.") from None
        except OSError as e:
            raise DataError(f"Cannot read {path}: {e.strerror or e}.") from None
    if len(data) > MAX_JSONL_BYTES:
        raise DataError(f"{source} is larger than {MAX_JSONL_BYTES // 1_000_000} MB; use a smaller conversation set.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{source}, line {line}: not UTF-8 text; save the file as UTF-8.") from None
    conversations, lines = parse_jsonl(text, source)
    n_held = max(1, int(len(conversations) * HELDOUT_FRACTION))
    if len(conversations) < 2:
        raise DataError(
            f"{source} has {len(conversations)} conversation; at least 2 are needed "
            "(one is held out to measure accuracy)."
        )
    name = Path(source).name
    return ChatSet(name, source, text, conversations[:-n_held], conversations[-n_held:], lines)


def parse_jsonl(text: str, source: str = "the file") -> tuple[list[list[Message]], list[int]]:
    """Conversations of a JSONL text and the line of each; DataError names the first bad line."""
    out: list[list[Message]] = []
    lines: list[int] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}, line {n}"
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise DataError(
                f"{where}: not valid JSON ({getattr(e, 'msg', e)}); each line must be one JSON object."
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
            raise DataError(
                f'{where}: expected an object with a "messages" list, '
                'like {"messages": [{"role": "user", "content": "hi"}, ...]}.'
            )
        msgs = []
        for k, m in enumerate(obj["messages"], 1):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f'{where}: message {k} must be an object with a "role" and a "content" string.')
            if m["role"] not in ROLES:
                raise DataError(f"{where}: message {k} has role {m['role']!r}; use one of {', '.join(ROLES)}.")
            msgs.append(Message(m["role"], m["content"]))
        try:
            check_messages(msgs)
        except ChatFormatError as e:
            raise ChatFormatError(f"{where}: {e}.") from None
        out.append(msgs)
        lines.append(n)
        if len(out) > MAX_CONVERSATIONS:
            raise DataError(f"{source} has more than {MAX_CONVERSATIONS:,} conversations; use fewer.")
    if not out:
        raise DataError(f'{source} holds no conversations; write one JSON object per line with a "messages" list.')
    return out, lines


class ChatBatches:
    """Encoded conversations served as training batches (the loop's ``get_batch`` for a chat run).

    A batch is ``batch_size`` conversations drawn with the run's generator, padded to the longest
    one (not to the context: short conversations make short, fast steps). Targets are -1 (ignored
    by the loss) wherever the mask says the token is not the assistant's, and in the padding.
    """

    def __init__(self, encoded: list[Encoded]):
        if not encoded:
            raise DataError("No conversations to train on.")
        self.encoded = encoded
        self.n_tokens = sum(len(e.ids) for e in encoded)
        self.mean_tokens = self.n_tokens / len(encoded)  # tokens per row of a batch, about

    def __len__(self) -> int:
        return len(self.encoded)

    def get_batch(self, block_size: int, batch_size: int, generator: torch.Generator | None, device) -> tuple:
        picks = torch.randint(len(self.encoded), (batch_size,), generator=generator).tolist()
        rows = [self.encoded[i] for i in picks]
        T = min(block_size, max(len(e.ids) for e in rows) - 1)
        x = torch.zeros(batch_size, T, dtype=torch.long)
        y = torch.full((batch_size, T), -1, dtype=torch.long)
        for b, e in enumerate(rows):
            ids = torch.tensor(e.ids[: T + 1])
            keep = torch.tensor(e.mask[1 : T + 1])
            n = len(ids) - 1
            x[b, :n] = ids[:-1]
            y[b, :n] = torch.where(keep, ids[1:], torch.tensor(-1))
        return x.to(device), y.to(device)


__all__ = [
    "BUILTIN_CHAT",
    "ChatBatches",
    "ChatSet",
    "builtin_chat",
    "list_chat_sets",
    "load_chat_set",
    "parse_jsonl",
]
