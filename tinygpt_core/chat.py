"""Conversations as token ids: the chat format, the loss mask and fitting a conversation in a context.

The format. Every message opens with its role's special token (``<system>``, ``<user>``,
``<assistant>``, the tokens every tokenizer of the lab reserves) followed by its text. An
assistant's turn ends where the next role token starts; the last assistant message of a
conversation is closed by a ``<user>`` token, so the model learns to hand the turn back, and
generation stops at any role token::

    <system>Answer briefly.<user>reverse cat<assistant>tac<user>

The loss mask. Training predicts only what the assistant writes: its text and the role token that
ends its turn. Everything else (system prompt, user text, role tokens that open turns) is context,
never a target. ``Encoded.mask[i]`` says whether token ``i`` is a target (predicted from ``i - 1``).

The context. A conversation longer than the model's context loses its oldest user/assistant
exchanges first (the system message is kept while it fits), whole messages at a time, so a special
token is never cut away from the text it opens. What remains must still hold the last exchange.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import DataError
from .tokenizers import DEFAULT_SPECIAL_TOKENS

ROLES = ("system", "user", "assistant")
# The role tokens are the tokenizers' reserved special tokens, named by role ("<user>" -> "user").
ROLE_TOKENS: dict[str, str] = {t.strip("<>"): t for t in DEFAULT_SPECIAL_TOKENS}
END_OF_ANSWER = ROLE_TOKENS["user"]  # closes the last assistant message: the turn goes back to the user
MAX_MESSAGE_CHARS = 4_000  # one message's text; a chat model of this lab has a context of a few hundred tokens
assert set(ROLE_TOKENS) == set(ROLES), "every role needs a reserved special token"


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class Encoded:
    """A conversation as token ids and, per token, whether training predicts it."""

    ids: list[int]
    mask: list[bool]
    dropped: int = 0  # messages dropped from the start to fit the context


class ChatFormatError(DataError):
    """A conversation breaks the chat format (roles out of order, empty text, a special token inside)."""


def check_messages(messages: Sequence[Message], *, for_training: bool = True) -> None:
    """Roles in order: an optional system message first, then user and assistant alternating,
    starting with a user; a training conversation ends with an assistant answer, a prompt with a
    user message. Texts are non-empty strings without role tokens. ChatFormatError says which message."""
    if not messages:
        raise ChatFormatError("the conversation has no messages; give at least a user and an assistant message")
    expected = "user"
    for k, m in enumerate(messages, 1):
        if m.role not in ROLES:
            raise ChatFormatError(f"message {k} has role {m.role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m.content, str) or not m.content.strip():
            raise ChatFormatError(f"message {k} ({m.role}) has no text; every message needs some")
        if len(m.content) > MAX_MESSAGE_CHARS:
            raise ChatFormatError(f"message {k} is {len(m.content):,} characters; the limit is {MAX_MESSAGE_CHARS:,}")
        inside = [t for t in ROLE_TOKENS.values() if t in m.content]
        if inside:
            raise ChatFormatError(
                f"message {k} contains {', '.join(inside)}, a role marker the format adds itself; remove it"
            )
        if m.role == "system":
            if k != 1:
                raise ChatFormatError(f"message {k} is a system message; only the first message may be one")
            continue
        if m.role != expected:
            raise ChatFormatError(
                f"roles out of order: message {k} is from the {m.role} but the {expected} speaks next "
                "(user and assistant take turns, starting with the user)"
            )
        expected = "assistant" if expected == "user" else "user"
    last = messages[-1].role
    if for_training and last != "assistant":
        raise ChatFormatError("the conversation must end with an assistant message: that is what the model learns")
    if not for_training and last != "user":
        raise ChatFormatError("a prompt must end with the user's message, which the assistant answers")


def check_user_text(text: str) -> None:
    """A message someone types to a chat run: ChatFormatError if it is empty or holds a role token."""
    if not text.strip():
        raise ChatFormatError("the message is empty; type something for the model to answer")
    inside = [t for t in ROLE_TOKENS.values() if t in text]
    if inside:
        raise ChatFormatError(
            f"your message contains {', '.join(inside)}, a hidden token that marks who speaks (the chat adds "
            "it itself); remove it"
        )


def role_ids(tokenizer) -> dict[str, int]:
    """The id of each role token in ``tokenizer``; ChatFormatError if it lacks them (an old tokenizer)."""
    special = tokenizer.special_token_ids
    missing = [t for t in ROLE_TOKENS.values() if t not in special]
    if missing:
        raise ChatFormatError(
            f"this run's {getattr(tokenizer, 'kind', '')} tokenizer has no {', '.join(missing)} token, so it "
            "cannot mark who speaks; fine-tune a run trained with a char, word or BPE tokenizer (they reserve "
            "these tokens; GPT-2's fixed vocabulary has none)"
        )
    return {role: special[tok] for role, tok in ROLE_TOKENS.items()}


def _segments(tokenizer, messages: Sequence[Message], for_training: bool) -> list[tuple[list[int], list[bool]]]:
    """One (ids, mask) per message; an assistant message also carries the role token that ends it."""
    ids_of = role_ids(tokenizer)
    end = ids_of["user"]
    out = []
    for k, m in enumerate(messages):
        text = tokenizer.encode(m.content)
        ids = [ids_of[m.role], *text]
        if m.role == "assistant":
            # The turn's end is the next message's <user>, or a closing <user> after the last answer.
            closes = k + 1 == len(messages)
            out.append((ids + ([end] if closes else []), [False] + [True] * (len(text) + closes)))
        else:
            # A user message right after an answer opens with the token that ended it: a target.
            after_answer = k > 0 and messages[k - 1].role == "assistant"
            out.append((ids, [after_answer] + [False] * len(text)))
    if not for_training:
        out.append(([ids_of["assistant"]], [False]))  # the prompt the model answers
    return out


def encode_conversation(
    tokenizer, messages: Sequence[Message], max_tokens: int, *, for_training: bool = True
) -> Encoded:
    """Token ids and loss mask of ``messages``, fitted into ``max_tokens`` by dropping the oldest turns.

    For training ``max_tokens`` is the context plus one (inputs and targets are shifted by one);
    for a prompt (``for_training=False``) it is what the context leaves for the question once the
    answer has room. ChatFormatError for a conversation that breaks the format or whose last
    exchange alone does not fit; TokenizerError for symbols the tokenizer does not know.
    """
    messages = list(messages)
    check_messages(messages, for_training=for_training)
    segs = _segments(tokenizer, messages, for_training)
    system = messages[0].role == "system"
    first_turn = 1 if system else 0
    # The last exchange: the final (user, assistant) pair for training, the final user message
    # (and the <assistant> that opens the answer) for a prompt.
    keep_from = len(segs) - 2
    start = first_turn
    dropped = 0

    def length(seg_list) -> int:
        return sum(len(s[0]) for s in seg_list)

    while True:
        kept = (segs[:1] if system else []) + segs[start:]
        if length(kept) <= max_tokens:
            break
        if start < keep_from:
            start += 2  # the oldest user message and the assistant's answer to it
            dropped += 2
            continue
        if system:  # the system message goes last, before giving up
            system = False
            dropped += 1
            continue
        raise ChatFormatError(
            f"the conversation's last exchange takes {length(segs[keep_from:])} tokens but the model's "
            f"context holds {max_tokens}; shorten the message or fine-tune a run with a larger context"
        )
    ids: list[int] = []
    mask: list[bool] = []
    first_kept = len(kept) - (len(segs) - start)  # index in ``kept`` of segs[start]
    for k, (s_ids, s_mask) in enumerate(kept):
        ids.extend(s_ids)
        # The first turn kept opens the (remaining) conversation: its role token ends no answer.
        mask.extend([False] + s_mask[1:] if k == first_kept else s_mask)
    return Encoded(ids, mask, dropped)


def format_text(messages: Sequence[Message], *, closed: bool = True) -> str:
    """The conversation as text with its role tokens, exactly what ``encode_conversation`` encodes."""
    parts = [ROLE_TOKENS[m.role] + m.content for m in messages]
    if closed and messages and messages[-1].role == "assistant":
        parts.append(END_OF_ANSWER)
    return "".join(parts)


def parse_text(text: str) -> list[Message]:
    """The inverse of ``format_text``: split a formatted conversation back into messages."""
    by_token = {t: r for r, t in ROLE_TOKENS.items()}
    out: list[Message] = []
    i = 0
    while i < len(text):
        tok = next((t for t in by_token if text.startswith(t, i)), None)
        if tok is None:
            raise ChatFormatError(f"formatted text must start each message with a role token, at {text[i : i + 20]!r}")
        j = min((p for p in (text.find(t, i + len(tok)) for t in by_token) if p != -1), default=len(text))
        content = text[i + len(tok) : j]
        if content or j == len(text):
            out.append(Message(by_token[tok], content))
        i = j
    if out and out[-1].role == "user" and out[-1].content == "" and len(out) > 1:
        out.pop()  # the closing <user> after the last answer
    return out


def split_answer(tokenizer, ids: Sequence[int]) -> tuple[list[int], bool]:
    """The answer's ids up to (not including) the first role token, and whether one ended it."""
    specials = set(tokenizer.special_token_ids.values())
    for k, i in enumerate(ids):
        if int(i) in specials:
            return [int(x) for x in ids[:k]], True
    return [int(x) for x in ids], False


def hide_role_tokens(text: str) -> str:
    """``text`` without role tokens (what a reader sees unless they ask for the special tokens)."""
    for t in ROLE_TOKENS.values():
        text = text.replace(t, "")
    return text


__all__ = [
    "END_OF_ANSWER",
    "ROLES",
    "ROLE_TOKENS",
    "ChatFormatError",
    "Encoded",
    "Message",
    "check_messages",
    "check_user_text",
    "encode_conversation",
    "format_text",
    "hide_role_tokens",
    "parse_text",
    "role_ids",
    "split_answer",
]
