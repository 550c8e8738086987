"""Device errors speak to both front ends: the app has no --flags, so the core never names one."""

from __future__ import annotations

import pytest
import torch

from tinygpt_core.device import resolve_device
from tinygpt_core.errors import ConfigError


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_asking_for_an_absent_gpu_says_what_to_choose_without_cli_syntax():
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda")
    message = str(err.value)
    assert "no CUDA GPU" in message and "auto or cpu" in message
    assert "--" not in message


def test_unknown_device_lists_the_choices():
    with pytest.raises(ConfigError, match="auto, cpu, cuda or mps"):
        resolve_device("tpu")
    assert resolve_device("cpu") == torch.device("cpu")
