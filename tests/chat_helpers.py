"""Tiny runs for the chat tests: a base run whose characters cover builtin:chat, and a chat fine-tune of it.

Not a test module (no ``test_`` prefix): the chat test files import it (pytest puts tests/ on the path).
"""

from __future__ import annotations

from pathlib import Path

from tinygpt_core.chatdata import builtin_chat
from tinygpt_core.finetune import finetune_spec
from tinygpt_core.spec import TrainSpec, prepare
from tinygpt_core.training import train

TINY = dict(
    n_layer=1,
    n_head=2,
    n_embd=32,
    block_size=48,
    batch_size=4,
    max_iters=2,
    eval_interval=2,
    eval_iters=1,
    warmup_iters=1,
    sample_tokens=0,
    device="cpu",
)


def corpus_file(folder: Path) -> Path:
    """A text holding every character the built-in conversations use (plus some prose)."""
    train_set, _ = builtin_chat()
    lines = [m.content for conv in train_set[:300] for m in conv]
    path = folder / "chars.txt"
    path.write_text("abcdefghijklmnopqrstuvwxyz 0123456789.\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_base(root: Path, tokenizer: str = "char", name: str = "base", **overrides) -> Path:
    corpus = corpus_file(root)
    spec = TrainSpec.from_preset("tiny", str(corpus), tokenizer=tokenizer, name=name, **{**TINY, **overrides})
    if tokenizer == "bpe":
        spec.tokenizer_vocab_size = 300
    result = train(prepare(spec), root / name)
    assert result.status == "done", result.message
    return result.run_dir


def make_chat(root: Path, base: Path, name: str = "chat", steps: int = 2) -> Path:
    spec = finetune_spec(base, "builtin:chat", name=name, max_iters=steps, eval_interval=steps, eval_iters=1)
    result = train(prepare(spec), root / name)
    assert result.status == "done", result.message
    return result.run_dir
