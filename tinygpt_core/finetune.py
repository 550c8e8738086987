"""Chat fine-tuning: a new run that starts from a trained run's weights and learns conversations.

``finetune_spec(parent, source)`` reads the parent's settings (cheap: no weights, no data) and
returns a ``FinetuneSpec``, a ``TrainSpec`` the job runner and ``training.train`` take like any
other: the model is the parent's, the training settings are the parent's with the fine-tune's own
(``FINETUNE_SETTINGS``), and the "corpus" is the conversation set as text. Preparing it
(``FinetuneSpec.prepare_run``, called by ``spec.prepare``) checks the parent (finished, has
weights, its tokenizer has the role tokens), encodes every conversation with the parent's tokenizer
(``chat.encode_conversation``: role tokens, loss only on the assistant's tokens, oldest turns
dropped to fit the context) and loads the parent's weights.

At each evaluation the run answers its held-out prompts greedily (``ChatEval``): the exact-match
accuracy is the ``chat_accuracy`` column of metrics.csv, and a few answers are the run's samples.
The new run's config.json records its parent and conversation set under ``chat``: that is what
makes a run a chat run (``chat_info``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .chat import ChatFormatError, Message, encode_conversation, role_ids, split_answer
from .chatdata import BUILTIN_CHAT, ChatBatches, ChatSet, load_chat_set
from .data import Corpus
from .errors import DataError, RunError, TinyGPTError
from .spec import PreparedRun, TrainSpec

# What a fine-tune changes of its parent's training settings. Conversations are short, so a batch
# of 32 is cheap; a fixed warm-up and a lower peak than pre-training keep the first steps from
# wrecking what the parent learned.
FINETUNE_SETTINGS = dict(
    batch_size=32,
    max_iters=600,
    eval_interval=100,
    eval_iters=4,
    warmup_iters=30,
    grad_accum=1,
    early_stop_patience=None,
    stop_at_val_loss=None,
    sample_tokens=1,  # > 0: write samples (a chat run's samples are answers to held-out prompts)
)
EVAL_PROMPTS = 240  # held-out prompts answered at each eval (the built-in set has 240)
SAMPLE_ANSWERS = 6  # of which this many are written as the eval's sample
ACTIVE = ("queued", "running")


def chat_info(run_dir: str | Path) -> dict | None:
    """The ``chat`` record of a run's config (parent, conversation set), None for a run that is not a chat run."""
    from .runs import read_config

    return read_config(run_dir).chat


@dataclass
class FinetuneSpec(TrainSpec):
    """A TrainSpec whose model and tokenizer come from a parent run and whose corpus is conversations."""

    parent: str = ""  # the parent run's folder

    def validate(self) -> FinetuneSpec:
        super().validate()
        if not isinstance(self.corpus, Corpus):
            raise DataError("A fine-tune's conversations must be loaded first (finetune_spec does it).")
        return self

    def prepare_run(self) -> PreparedRun:
        from .device import resolve_device, resolve_precision
        from .runs import read_config, read_status
        from .tokenizers import load_tokenizer

        self.validate()
        parent = Path(self.parent)
        cfg = read_config(parent)
        status = read_status(parent).status
        if status in ACTIVE:
            raise RunError(
                f"Run {parent.name} is still {status}; fine-tune it once it has finished (or stop it first)."
            )
        from .checkpoints import read_weights

        try:
            weights = read_weights(parent, "best")
        except RunError as e:
            raise RunError(f"Run {parent.name} has no weights to start from ({e}); train it first.") from None
        tokenizer = load_tokenizer(parent / "tokenizer.json")
        role_ids(tokenizer)  # ChatFormatError: a tokenizer without the role tokens
        chat_set = _chat_set_of(self.corpus)
        train_b, val_b, chat = _encode_set(chat_set, tokenizer, cfg.model.block_size, _record(self, cfg, chat_set))
        device = resolve_device(self.train.device)
        precision = resolve_precision(self.train.precision, device)
        return PreparedRun(
            self, self.corpus, tokenizer, cfg.model, train_b, val_b, device, precision, init_weights=weights, chat=chat
        )


def finetune_spec(
    parent: str | Path,
    source: str = BUILTIN_CHAT,
    *,
    data: bytes | None = None,
    name: str | None = None,
    **train_overrides: Any,
) -> FinetuneSpec:
    """The spec of a chat fine-tune of ``parent`` on ``source`` (``builtin:chat`` or a JSONL path; an
    upload's bytes in ``data``). Checks the parent's settings and the whole conversation set now
    (DataError naming the line), so nothing is queued that would fail; the parent's state is
    checked again when the run starts."""
    from .runs import read_config

    parent = Path(parent)
    if not parent.is_dir():
        raise RunError(f"Run folder {parent} does not exist; pick a trained run to fine-tune.")
    cfg = read_config(parent)  # a chat run may be fine-tuned again, e.g. on the user's own set
    chat_set = load_chat_set(source, data)
    settings = {**FINETUNE_SETTINGS, **{k: v for k, v in train_overrides.items() if v is not None}}
    if "lr" in train_overrides and "min_lr" not in train_overrides:
        settings["min_lr"] = None
    train = dataclasses.replace(cfg.train, **settings).validate()
    corpus = Corpus(chat_set.name, chat_set.text, chat_set.source)
    spec = FinetuneSpec(
        corpus=corpus,
        model=cfg.model,
        train=train,
        tokenizer=cfg.tokenizer["kind"],
        name=name or f"{cfg.name or parent.name}-chat",
        preset=cfg.preset,
        parent=str(parent.resolve()),
    )
    return spec.validate()


def _chat_set_of(corpus: Corpus) -> ChatSet:
    if corpus.source == BUILTIN_CHAT:
        return load_chat_set(BUILTIN_CHAT)
    return load_chat_set(corpus.source, corpus.text.encode("utf-8"))


def _record(spec: FinetuneSpec, parent_cfg: Any, chat_set: ChatSet) -> dict:
    return {
        "parent": spec.parent,
        "parent_name": parent_cfg.name or Path(spec.parent).name,
        "source": chat_set.source,
        "conversations": len(chat_set.train),
        "heldout": len(chat_set.heldout),
    }


def _encode_set(chat_set: ChatSet, tokenizer: Any, block_size: int, record: dict) -> tuple:
    """(train batches, held-out batches, ChatEval); DataError names the conversation's line."""
    encoded = []
    for k, conv in enumerate(chat_set.train + chat_set.heldout):
        try:
            encoded.append(encode_conversation(tokenizer, conv, block_size + 1))
        except TinyGPTError as e:
            line = chat_set.lines[k] if k < len(chat_set.lines) else k + 1
            raise type(e)(f"{chat_set.source}, conversation on line {line}: {_sentence(e)}") from None
    n = len(chat_set.train)
    chat = ChatEval(tokenizer, chat_set.heldout, block_size, record)
    return ChatBatches(encoded[:n]), ChatBatches(encoded[n:]), chat


def _sentence(e: Exception) -> str:
    text = str(e)
    return text if text.endswith(".") else text + "."


def chat_inputs(run_dir: Path, cfg: Any, tokenizer: Any) -> tuple:
    """A chat run's batches and evaluation rebuilt as they were (``training.resume``): the built-in set
    is generated again, a user's set is the copy kept in the run (corpus.txt); both checked by sha256."""
    source = cfg.chat.get("source", BUILTIN_CHAT)
    try:
        if source == BUILTIN_CHAT:
            chat_set = load_chat_set(BUILTIN_CHAT)
        else:
            chat_set = load_chat_set(source, (Path(run_dir) / "corpus.txt").read_bytes())
    except (OSError, DataError) as e:
        raise RunError(f"Cannot resume {Path(run_dir).name}: its conversations cannot be loaded: {e}") from None
    if cfg.corpus.get("sha256") not in (None, chat_set.sha256):
        raise RunError(f"Cannot resume {Path(run_dir).name}: its conversations have changed; start a new fine-tune.")
    return _encode_set(chat_set, tokenizer, cfg.model.block_size, dict(cfg.chat))


class ChatEval:
    """Greedy answers to held-out prompts: exact-match accuracy and a few answers to show."""

    def __init__(self, tokenizer: Any, heldout: list[list[Message]], block_size: int, record: dict):
        self.tokenizer, self.block_size, self.record = tokenizer, block_size, record
        self.items: list[tuple[list[int], str, str]] = []  # (prompt ids, expected answer, question)
        for conv in heldout[:EVAL_PROMPTS]:
            prompt, expected = conv[:-1], conv[-1].content
            room = len(tokenizer.encode(expected)) + 1  # the answer and the token that ends it
            try:
                enc = encode_conversation(tokenizer, prompt, block_size - room, for_training=False)
            except ChatFormatError:
                continue  # its question alone does not fit: training drops it the same way
            self.items.append((enc.ids, expected, prompt[-1].content))

    def answers(self, model: torch.nn.Module) -> list[str]:
        """Greedy answers to every held-out prompt, each cut at the first role token.

        Prompts of the same length decode together as one batch (the model has no padding mask,
        so only equal lengths can share a batch): a dozen batched decodes instead of hundreds.
        """
        from .sampling import SamplingSettings, generate_ids

        groups: dict[int, list[int]] = {}
        for k, (ids, _, _) in enumerate(self.items):
            groups.setdefault(len(ids), []).append(k)
        out = [""] * len(self.items)
        for members in groups.values():
            longest = max(len(self.tokenizer.encode(self.items[k][1])) for k in members) + 1
            idx = torch.tensor([self.items[k][0] for k in members], dtype=torch.long)
            settings = SamplingSettings(strategy="greedy", max_new_tokens=longest)
            new = generate_ids(model, idx, longest, settings)[:, idx.size(1) :].tolist()
            for k, ids in zip(members, new):
                out[k] = self.tokenizer.decode(split_answer(self.tokenizer, ids)[0])
        return out

    def evaluate(self, model: torch.nn.Module) -> tuple[float, str]:
        """(accuracy in [0, 1], the first answers as text) for ``model`` as it is now."""
        right, shown = 0, []
        for k, ((_, expected, question), got) in enumerate(zip(self.items, self.answers(model))):
            ok = got.strip() == expected.strip()
            right += ok
            if k < SAMPLE_ANSWERS:
                shown.append(f"{question} → {got} {'✓' if ok else '✗ (' + expected + ')'}")
        accuracy = right / len(self.items) if self.items else float("nan")
        return accuracy, "\n".join(shown)


def evaluate_run(run_dir: str | Path, source: str = BUILTIN_CHAT, device: str = "cpu") -> float:
    """Held-out exact-match accuracy of any run (a base run too: how it does before fine-tuning)."""
    from .runs import load_run

    run = load_run(run_dir, device=device)
    chat_set = load_chat_set(source)
    return ChatEval(run.tokenizer, chat_set.heldout, run.config.model.block_size, {}).evaluate(run.model)[0]


__all__ = [
    "EVAL_PROMPTS",
    "FINETUNE_SETTINGS",
    "ChatEval",
    "FinetuneSpec",
    "chat_info",
    "chat_inputs",
    "evaluate_run",
    "finetune_spec",
]
