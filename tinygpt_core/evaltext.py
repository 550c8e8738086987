"""The tokens a run is inspected on: the start of its validation split, or a visitor's own text, bounded.

The validation split is the run's own: its corpus (the copy kept in the run folder, else its built-in
or allowed source, read the way a visitor may read it: ``data.load_visitor_corpus``), encoded with the
run's tokenizer and split with the run's ``val_fraction`` exactly as training split it, so what the
token-loss view and the knockout grid score is text the model never trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import limits
from .data import load_visitor_corpus, split_ids
from .errors import DataError, TinyGPTError, TokenizerError


def run_corpus_text(run_dir: str | Path, corpus: dict) -> str:
    """The text a run trained on, as a visitor may read it; DataError (what to do) when it cannot be read."""
    try:
        return (Path(run_dir) / "corpus.txt").read_text(encoding="utf-8")
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"The run's copy of its corpus cannot be read ({e}); type a text instead.") from None
    source = str(corpus.get("source") or corpus.get("name") or "")
    try:
        return load_visitor_corpus(source).text
    except TinyGPTError as e:
        raise DataError(f"This run's corpus {source!r} cannot be opened here ({e}); type a text instead.") from None


def validation_ids(run: Any, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` token ids of a loaded run's validation split (``runs.LoadedRun``)."""
    limits.check_inspect_tokens(max_tokens)
    text = run_corpus_text(run.path, run.config.corpus)
    try:
        ids = torch.tensor(run.tokenizer.encode(text), dtype=torch.long)
    except TokenizerError as e:
        raise DataError(f"The run's tokenizer cannot read its corpus any more: {e}") from None
    _, val = split_ids(ids, run.config.train.val_fraction)
    if len(val) < 2:
        raise DataError("This run's validation split has fewer than 2 tokens; type a text instead.")
    return val[:max_tokens].tolist()


def text_ids(tokenizer: Any, text: str, max_tokens: int) -> list[int]:
    """A visitor's text as token ids, at most ``max_tokens`` (its start); TokenizerError for unknown symbols."""
    limits.check_inspect_tokens(max_tokens)
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise DataError("The text needs at least 2 tokens: one to read and one to predict.")
    return ids[:max_tokens]


__all__ = ["run_corpus_text", "text_ids", "validation_ids"]
