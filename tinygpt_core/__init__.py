"""TinyGPT Lab's core: train, inspect, sample and export tiny GPTs. No UI code lives here.

    >>> from tinygpt_core import TrainSpec, train, load_run
    >>> result = train(TrainSpec.from_preset("tiny", "builtin:tiny"))
    >>> run = load_run(result.run_dir)
    >>> run.model(idx).logits          # (B, T, vocab)

The names below are imported on first use, so ``import tinygpt_core.config`` stays light.
"""

import importlib

_EXPORTS = {
    "GPT": "model",
    "ModelOutput": "model",
    "ModelConfig": "config",
    "TrainConfig": "config",
    "PRESETS": "config",
    "get_preset": "config",
    "TinyGPTError": "errors",
    "RunStore": "runs",
    "load_run": "runs",
    "TrainSpec": "training",
    "train": "training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'tinygpt_core' has no attribute {name!r}")
