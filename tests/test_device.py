"""Devices and process set-up: torch threads set once, parameters counted without memory, and device errors
that speak to both front ends (the app has no --flags, so the core never names one)."""

from __future__ import annotations

import pytest
import torch

from tinygpt_core import device
from tinygpt_core.config import ModelConfig
from tinygpt_core.device import resolve_device
from tinygpt_core.errors import ConfigError
from tinygpt_core.model import GPT, count_params


@pytest.fixture
def fresh_threads(monkeypatch):
    """Forget any earlier configure_threads call, and put torch's thread count back afterwards."""
    before = torch.get_num_threads()
    monkeypatch.setattr(device, "_threads_configured", None)
    yield
    torch.set_num_threads(before)


def test_configure_threads_sets_once_and_keeps_the_first_value(fresh_threads, monkeypatch):
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "1")
    assert device.configure_threads() == 1 and torch.get_num_threads() == 1
    assert device.configure_threads(2) == 1 and torch.get_num_threads() == 1  # process-wide: set once


def test_configure_threads_defaults_to_torchs_own(fresh_threads, monkeypatch):
    monkeypatch.delenv("TINYGPT_NUM_THREADS", raising=False)
    assert device.configure_threads() == torch.get_num_threads()


def test_a_default_applies_only_where_the_variable_is_unset(fresh_threads, monkeypatch):
    monkeypatch.delenv("TINYGPT_NUM_THREADS", raising=False)
    assert device.configure_threads(default=device.SERVER_THREADS) == 1 == torch.get_num_threads()
    monkeypatch.setattr(device, "_threads_configured", None)
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "2")
    assert device.configure_threads(default=1) == 2 == torch.get_num_threads()


@pytest.mark.parametrize("raw", ["lots", "-1", "1.5"])
def test_a_malformed_thread_count_is_a_config_error(fresh_threads, monkeypatch, raw):
    monkeypatch.setenv("TINYGPT_NUM_THREADS", raw)
    with pytest.raises(ConfigError, match="TINYGPT_NUM_THREADS|threads"):
        device.configure_threads()


@pytest.mark.parametrize("overrides", [{}, {"tie_weights": False}, {"pos_encoding": "none", "bias": False}])
def test_count_params_matches_a_built_model(overrides):
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, **overrides)
    assert count_params(cfg) == GPT(cfg).num_params()


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


@pytest.mark.parametrize(
    "cap, capped", [("AVX2", True), ("avx512_core", True), ("AVX512_CORE_AMX", False), ("", False)]
)
def test_a_onednn_isa_cap_below_bf16_means_no_native_bf16(monkeypatch, cap, capped):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # the hardware has it…
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert device.cpu_has_native_bf16() is (not capped)  # …but oneDNN may be told not to use it
    assert device.resolve_precision("auto", torch.device("cpu")) == ("fp32" if capped else "bf16")
