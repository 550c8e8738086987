"""Talking to a run: one assistant reply to a conversation, streamed token by token.

Used by the CLI's ``chat`` command and the Chat page alike. The history is plain messages (text,
never tensors), so a page can keep it in its session. The prompt is the history in the chat format
(``chat.encode_conversation``) with room left in the context for the answer; the oldest turns are
dropped when it does not fit. The answer ends at the first role token the model writes (a chat
model writes ``<user>`` when its turn is over) or after ``settings.max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .chat import Message, encode_conversation
from .errors import ConfigError
from .sampling import SamplingSettings, stream_ids

DEFAULT_SETTINGS = SamplingSettings(strategy="greedy", max_new_tokens=40)


@dataclass
class Reply:
    """What ``stream_reply`` leaves behind once its pieces have been consumed."""

    text: str = ""  # the answer, without role tokens
    ids: list[int] | None = None  # the answer's ids, the token that ended it included
    ended: bool = False  # the model ended its turn (False: it ran out of tokens)
    dropped: int = 0  # old messages left out to fit the context
    prompt_ids: list[int] | None = None


def stream_reply(
    model: torch.nn.Module,
    tokenizer: Any,
    history: Sequence[Message],
    settings: SamplingSettings = DEFAULT_SETTINGS,
    *,
    show_special: bool = False,
    reply: Reply | None = None,
) -> Iterator[str]:
    """Yield the assistant's answer to ``history`` (ending with a user message) piece by piece.

    ``reply`` (if given) is filled in as the answer grows. ``show_special``: the token that ends
    the answer is yielded as text too (``<user>``). ChatFormatError for a history out of order or a
    last message that does not fit; TokenizerError for symbols the tokenizer does not know.
    """
    reply = reply if reply is not None else Reply()
    settings.validate(model.config.vocab_size)
    block = model.config.block_size
    room = min(settings.max_new_tokens, block // 2)  # the answer's share of the context
    if room < 1:
        raise ConfigError("The model's context is too small to answer in.")
    enc = encode_conversation(tokenizer, history, block - room, for_training=False)
    reply.dropped, reply.prompt_ids = enc.dropped, enc.ids
    specials = set(tokenizer.special_token_ids.values())
    idx = torch.tensor([enc.ids], dtype=torch.long)
    ids: list[int] = []
    shown = ""
    for token in stream_ids(model, idx, settings, stop_ids=specials):
        ids.append(token)
        if token in specials:
            reply.ended = True
            if show_special:
                yield tokenizer.decode([token])
            break
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue  # half of a multi-byte character (BPE): wait for the rest
        yield text[len(shown) :]
        shown = text
        reply.text = text
    reply.ids = ids
    reply.text = tokenizer.decode([i for i in ids if i not in specials])


def reply_text(
    model: torch.nn.Module, tokenizer: Any, history: Sequence[Message], settings: SamplingSettings = DEFAULT_SETTINGS
) -> str:
    """The whole answer at once."""
    reply = Reply()
    for _ in stream_reply(model, tokenizer, history, settings, reply=reply):
        pass
    return reply.text


__all__ = ["DEFAULT_SETTINGS", "Reply", "reply_text", "stream_reply"]
