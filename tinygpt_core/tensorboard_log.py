"""TensorBoard logging: an extra view of a run, written by one training callback.

The run folder stays the source of truth (metrics.csv, samples, checkpoints); TensorBoard only
mirrors it, through PyTorch's own ``torch.utils.tensorboard`` writer. A run whose ``TrainConfig``
names a ``tensorboard_dir`` gets a ``TensorBoardLogger`` among its training callbacks
(``training.train``/``resume``), which writes at each evaluation:

- scalars ``loss/train``, ``loss/val``, ``lr``, ``tokens_per_s`` and ``grad_norm`` (the global gradient
  norm of the last step before clipping; absent when clipping is off, as the step does not compute it);
- images ``attention/layer_<i>``: that layer's heads side by side over a fixed probe (the first tokens
  of the validation text), brighter where a query attends more.

Events go to ``<tensorboard_dir>/<run folder name>``, so ``tensorboard --logdir <tensorboard_dir>``
lists every run under its own name; the app writes into the run store itself (each run's events in
its own folder). The logger runs where the training loop runs: with the Ray runner, on the worker's
machine (TensorBoard is then read there, or the folder copied back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

INSTALL_HINT = "pip install 'tensorboard>=2.14,<3'"  # as requirements.txt
CELL_PX = 4  # pixels per attention weight in the images: a 32-token probe is 128 px a head


def check_available() -> None:
    """ConfigError saying what to install when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"TensorBoard logging needs the tensorboard package, which is not installed: {INSTALL_HINT}, "
            "or train without --tensorboard."
        ) from None


def log_dir_for(tensorboard_dir: str | Path, run_dir: str | Path) -> Path:
    """Where one run's events go: a folder named after the run inside ``tensorboard_dir``."""
    return Path(tensorboard_dir).expanduser() / Path(run_dir).name


def attention_image(weights: np.ndarray, cell: int = CELL_PX) -> np.ndarray:
    """One layer's heads (H, T, T) side by side as one (T·cell, H·(T·cell + 1) − 1) image in [0, 1].

    Each weight becomes a cell×cell square; a one-pixel white column separates the heads."""
    heads = [np.kron(np.clip(w, 0.0, 1.0), np.ones((cell, cell), dtype=np.float32)) for w in weights]
    gap = np.ones((heads[0].shape[0], 1), dtype=np.float32)
    parts: list[np.ndarray] = []
    for i, h in enumerate(heads):
        if i:
            parts.append(gap)
        parts.append(h)
    return np.concatenate(parts, axis=1).astype(np.float32)


class TensorBoardLogger:
    """A training callback (``training.TrainCallback``) that mirrors a run into TensorBoard event files.

    ``wants_attention`` asks the training loop to put the probe's attention weights into each eval
    event (``data["attention"]``: (n_layer, n_head, T, T)). The writer is opened at the first event and
    closed (flushed) at the end event."""

    wants_attention = True

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self._writer: Any = None
        self._last_step: dict[str, float] = {}

    def __call__(self, event: Any) -> None:
        if event.kind == "step":
            self._last_step = event.data  # lr and tokens/s are logged with the next eval
            return
        if event.kind == "end":
            self.close()
            return
        if event.kind != "eval":
            return
        w = self._open()
        data, step = event.data, event.step
        for tag, value in (
            ("loss/train", data.get("train_loss")),
            ("loss/val", data.get("val_loss")),
            ("lr", self._last_step.get("lr")),
            ("tokens_per_s", self._last_step.get("tokens_per_s")),
            ("grad_norm", data.get("grad_norm")),
        ):
            if value is not None:
                w.add_scalar(tag, float(value), step)
        attention = data.get("attention")
        if attention is not None:
            for layer, weights in enumerate(attention):
                w.add_image(f"attention/layer_{layer}", attention_image(weights), step, dataformats="HW")
        w.flush()

    def _open(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def loggers_for(train_cfg: Any, run_dir: str | Path) -> list[TensorBoardLogger]:
    """The extra callbacks a run's settings ask for: a TensorBoardLogger when ``tensorboard_dir`` is set."""
    if not getattr(train_cfg, "tensorboard_dir", None):
        return []
    return [TensorBoardLogger(log_dir_for(train_cfg.tensorboard_dir, run_dir))]
