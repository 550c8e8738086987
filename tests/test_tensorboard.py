"""TensorBoard logging (tinygpt_core.tensorboard_log): a CLI run's events read back with TensorBoard's own reader."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tinygpt_core import cli
from tinygpt_core.config import TrainConfig
from tinygpt_core.errors import ConfigError
from tinygpt_core.tensorboard_log import attention_image, loggers_for


def test_cli_run_writes_scalars_and_attention_images_readable_by_tensorboard(tmp_path):
    run, tb = tmp_path / "run", tmp_path / "tb"
    args = ["train", "--corpus", "builtin:tiny", "--preset", "tiny", "--out", str(run), "--max-iters", "12"]
    args += ["--eval-interval", "6", "--eval-iters", "2", "--threads", "1", "--no-progress", "--tensorboard", str(tb)]
    assert cli.main(args) == 0
    acc = EventAccumulator(str(tb / "run"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss/train", "loss/val", "lr", "tokens_per_s", "grad_norm"} <= set(tags["scalars"])
    assert set(tags["images"]) == {"attention/layer_0", "attention/layer_1"}  # tiny: 2 layers
    # The scalars mirror the run folder, which stays the source of truth.
    evals = pd.read_csv(run / "metrics.csv").dropna(subset=["val_loss"])
    val = acc.Scalars("loss/val")
    assert [e.step for e in val] == [6, 12]
    np.testing.assert_allclose([e.value for e in val], evals["val_loss"], rtol=1e-5)
    assert all(e.value > 0 for e in acc.Scalars("grad_norm"))
    image = acc.Images("attention/layer_0")[-1]
    assert image.step == 12 and image.width == 2 * 32 * 4 + 1 and image.height == 32 * 4  # 2 heads, 32 tokens


def test_attention_image_puts_heads_side_by_side():
    w = np.zeros((2, 3, 3), dtype=np.float32)
    w[1, 2, 0] = 1.0
    img = attention_image(w, cell=2)
    assert img.shape == (6, 13) and img[:, 6].min() == 1.0  # the separator column
    assert img[4:6, 7:9].min() == 1.0 and img[:, :6].max() == 0.0


def test_no_logger_without_a_dir_and_a_bad_dir_is_refused(tmp_path):
    assert loggers_for(TrainConfig(), tmp_path / "r") == []
    (logger,) = loggers_for(TrainConfig(tensorboard_dir=str(tmp_path / "tb")), tmp_path / "r")
    assert logger.log_dir == tmp_path / "tb" / "r"
    with pytest.raises(ConfigError, match="tensorboard_dir"):
        TrainConfig(tensorboard_dir="").validate()
