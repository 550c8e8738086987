"""Config validation (tinygpt_core.config): the whole-number ranges are declared once and enforced by
validate(), and the same ranges give the app its messages (check_field, range_text)."""

from __future__ import annotations

import pytest

from tinygpt_core.config import INT_RANGES, ModelConfig, TrainConfig, check_field, range_text
from tinygpt_core.errors import ConfigError


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_layer=49), "n_layer must be a whole number >= 0 and <= 48, got 49."),  # 0: the bigram model
        (dict(n_layer=-3), "n_layer must be a whole number >= 0 and <= 48, got -3."),
        (dict(n_embd=0), "n_embd must be a whole number >= 1 and <= 4,096, got 0."),
        (dict(block_size=99999), "block_size must be a whole number >= 1 and <= 8,192, got 99999."),
        (dict(n_layer=2.0), "n_layer must be a whole number >= 0 and <= 48, got 2.0."),  # configs take ints
        (dict(attn_window=0), "attn_window must be a whole number >= 1"),
    ],
)
def test_model_config_names_the_setting_and_its_range(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ModelConfig(**overrides).validate()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(max_iters=-1), "max_iters must be a whole number >= 1, got -1."),
        (dict(warmup_iters=-1), "warmup_iters must be a whole number >= 0, got -1."),
        (dict(seed=-1), "seed must be a whole number >= 0"),
        (dict(early_stop_patience=0), "early_stop_patience must be a whole number >= 1, got 0."),
        (dict(stop_at_val_loss=-1.0), "stop_at_val_loss must be a number > 0"),
    ],
)
def test_train_config_names_the_setting_and_its_range(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        TrainConfig(**overrides).validate()


def test_every_range_is_stated_and_checked_the_same_way():
    for name, (lo, hi) in INT_RANGES.items():
        check_field(name, lo)
        check_field(name, float(lo))  # a whole number typed in a form
        with pytest.raises(ConfigError, match=name):
            check_field(name, lo - 1)
        if hi is not None:
            check_field(name, hi)
            with pytest.raises(ConfigError, match=f"<= {hi:,}"):
                check_field(name, hi + 1)
    assert range_text("n_layer") == "0 to 48" and range_text("max_iters") == "1 or more"
    assert ModelConfig().validate() and TrainConfig().validate()
