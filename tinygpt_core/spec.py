"""A training request (``TrainSpec``) and the one step that makes it ready to train (``prepare``).

Two stages, kept apart on purpose:

- ``TrainSpec.validate()`` is pure: it checks every setting (ConfigError naming the fix) and reads no
  file, trains no tokenizer and probes no device. Cheap enough to call on every keystroke.
- ``prepare(spec)`` does the work a run needs before its first step, once: load the corpus, train the
  tokenizer (on the whole text: a char/word vocabulary then covers the validation text too), encode
  and split the ids and check that both splits hold a full context (DataError otherwise), fill in the
  model's vocabulary size, and resolve the device and precision. Its result, a ``PreparedRun``, is
  what is passed on: to the operator's limits (``limits.check_spec``, which needs the real vocabulary
  to count parameters), to ``training.train``, to a job runner. Nothing is cached on the spec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .config import TOKENIZER_KINDS, ModelConfig, TrainConfig, get_preset
from .data import Corpus, check_split, load_corpus, split_ids
from .device import resolve_device, resolve_precision
from .errors import ConfigError, DataError


@dataclass
class TrainSpec:
    """Everything needed to start a run."""

    corpus: str | Corpus  # "builtin:tiny", a path, or a Corpus (uploads)
    model: ModelConfig  # vocab_size is filled in from the tokenizer by prepare()
    train: TrainConfig
    tokenizer: str = "char"  # char | word | bpe
    tokenizer_vocab_size: int | None = None
    name: str | None = None
    preset: str | None = None

    @classmethod
    def from_preset(cls, preset: str, corpus: str | Corpus, **overrides: Any) -> TrainSpec:
        """A preset's spec; overrides may name ModelConfig or TrainConfig fields, tokenizer,
        tokenizer_vocab_size or name."""
        p = get_preset(preset)
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        spec_fields = {"tokenizer", "tokenizer_vocab_size", "name"}
        unknown = sorted(set(overrides) - model_fields - train_fields - spec_fields)
        if unknown:
            raise ConfigError(f"Unknown setting(s) {', '.join(unknown)} for preset {preset!r}.")
        model = p.model_config(**{k: v for k, v in overrides.items() if k in model_fields})
        train = p.train_config(**{k: v for k, v in overrides.items() if k in train_fields})
        return cls(
            corpus=corpus,
            model=model,
            train=train,
            tokenizer=overrides.get("tokenizer", p.tokenizer),
            tokenizer_vocab_size=overrides.get("tokenizer_vocab_size", p.tokenizer_vocab_size),
            name=overrides.get("name"),
            preset=p.name,
        )

    def validate(self) -> TrainSpec:
        """Check every setting; reads no file and trains nothing (``prepare`` does). ConfigError/DataError."""
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ConfigError(f"tokenizer must be one of {', '.join(TOKENIZER_KINDS)}; got {self.tokenizer!r}.")
        vs = self.tokenizer_vocab_size
        if vs is not None and (not isinstance(vs, int) or isinstance(vs, bool) or vs < 1):
            raise ConfigError(f"tokenizer_vocab_size must be a whole number >= 1 or None, got {vs!r}.")
        if not isinstance(self.model, ModelConfig) or not isinstance(self.train, TrainConfig):
            raise ConfigError("TrainSpec.model must be a ModelConfig and TrainSpec.train a TrainConfig.")
        if not isinstance(self.corpus, (str, Corpus)):
            raise DataError("The corpus must be 'builtin:NAME', the path of a UTF-8 text file, or a Corpus.")
        self.model.validate()
        self.train.validate()
        return self


@dataclass
class PreparedRun:
    """A validated spec made ready to train: corpus, tokenizer, token ids split, device and precision."""

    spec: TrainSpec
    corpus: Corpus
    tokenizer: Any  # tokenizers.Tokenizer, trained on corpus.text
    model_config: ModelConfig  # spec.model with the tokenizer's vocab_size
    train_ids: torch.Tensor  # (N_train,) int64
    val_ids: torch.Tensor  # (N_val,) int64
    device: torch.device
    precision: str  # fp32 | bf16 | fp16, resolved for ``device``
    # A fine-tune (finetune.py): the weights it starts from, and the chat evaluation and record
    # (train_ids/val_ids are then chatdata.ChatBatches, which serve their own batches).
    init_weights: dict | None = None
    chat: Any = None

    @property
    def train_config(self) -> TrainConfig:
        return self.spec.train

    @property
    def name(self) -> str | None:
        return self.spec.name


def prepare(spec: TrainSpec) -> PreparedRun:
    """Validate ``spec`` and do everything a run needs before its first step (see the module docstring).

    Raises ConfigError (a setting; a device that is absent), DataError (a corpus that cannot be
    read, or too short for the context) or TokenizerError; writes nothing.
    """
    from .tokenizers import train_tokenizer

    own = getattr(spec, "prepare_run", None)  # a fine-tune prepares from its parent run (finetune.py)
    if own is not None:
        return own()
    spec.validate()
    if spec.train.tensorboard_dir:
        from .tensorboard_log import check_available

        check_available()  # a clear message now rather than a failing callback later
    device = resolve_device(spec.train.device)
    precision = resolve_precision(spec.train.precision, device)
    corpus = load_corpus(spec.corpus) if isinstance(spec.corpus, str) else spec.corpus
    tokenizer = train_tokenizer(spec.tokenizer, corpus.text, spec.tokenizer_vocab_size)
    ids = torch.tensor(tokenizer.encode(corpus.text), dtype=torch.long)
    train_ids, val_ids = split_ids(ids, spec.train.val_fraction)
    check_split(train_ids, val_ids, spec.model.block_size)
    # Validated with the spec; the vocabulary comes from a tokenizer, so it is a positive int.
    model_config = dataclasses.replace(spec.model, vocab_size=tokenizer.vocab_size)
    return PreparedRun(spec, corpus, tokenizer, model_config, train_ids, val_ids, device, precision)


__all__ = ["PreparedRun", "TrainSpec", "prepare"]
