"""The throughput bench's nanoGPT peer: model.py read from a checkout given by path, trained like the others."""

from __future__ import annotations

import textwrap

import pytest
import torch

from bench.steps import nanogpt_step
from bench.throughput import compile_payback, same_precision
from tinygpt_core.config import ModelConfig, TrainConfig

# A stand-in for a nanoGPT checkout's model.py: the same constructor and forward signature.
FAKE_MODEL_PY = textwrap.dedent(
    """
    from dataclasses import dataclass

    import torch.nn as nn

    from tinygpt_core.config import ModelConfig
    from tinygpt_core.model import GPT as Ours


    @dataclass
    class GPTConfig:
        block_size: int
        vocab_size: int
        n_layer: int
        n_head: int
        n_embd: int
        dropout: float
        bias: bool


    class GPT(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.inner = Ours(ModelConfig(**vars(config)))

        def forward(self, idx, targets=None):
            out = self.inner(idx, targets)
            return out.logits, out.loss
    """
)


def test_nanogpt_peer_loads_model_py_from_a_checkout_and_trains(tmp_path):
    (tmp_path / "model.py").write_text(FAKE_MODEL_PY)
    cfg = ModelConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16)
    tcfg = TrainConfig(batch_size=4, max_iters=10, warmup_iters=0, lr=1e-2, device="cpu")
    stepper = nanogpt_step(tmp_path, cfg, tcfg, torch.arange(400) % 30, precision="fp32")
    losses = [stepper.step() for _ in range(8)]
    assert stepper.name == "nanoGPT fp32" and stepper.tokens_per_step == 32
    assert losses[-1] < losses[0]
    with pytest.raises(FileNotFoundError, match="nanoGPT checkout"):
        nanogpt_step(tmp_path / "nope", cfg, tcfg, torch.arange(400) % 30)


def test_ratios_compare_each_step_with_the_peer_of_its_own_precision():
    rows = [
        {"name": "ours fp32", "precision": "fp32", "s_per_step": 1.0},
        {"name": "ours auto (bf16)", "precision": "bf16", "s_per_step": 0.5},
        {"name": "transformers fp32", "precision": "fp32", "s_per_step": 1.2},
        {"name": "transformers bf16", "precision": "bf16", "s_per_step": 2.0},
    ]
    assert same_precision(rows, "transformers", rows[0]) == "1.20×"
    assert same_precision(rows, "transformers", rows[1]) == "4.00×"
    assert same_precision(rows, "transformers", rows[2]) == "–"  # a peer is not compared with itself
    assert same_precision(rows, "nanoGPT", rows[0]) == "–"  # not run


def test_compile_payback_weighs_the_compile_against_the_presets_steps():
    rows = [
        {"name": "ours fp32", "precision": "fp32", "s_per_step": 0.040},
        {"name": "compiled, empty cache", "precision": "fp32", "s_per_step": 0.036, "first_step_s": 24.0},
        {"name": "compiled, cached", "precision": "fp32", "s_per_step": 0.036, "first_step_s": 0.6},
        {"name": "compiled, slower", "precision": "fp32", "s_per_step": 0.041, "first_step_s": 1.0},
    ]
    said = compile_payback(rows, max_iters=2000)
    assert "empty cache: first step 24.0 s (the compile), then 36.0 against 40.0 ms eager" in said
    assert "pays back after 6,000 steps, not inside the preset's 2,000" in said  # 24 s / 4 ms
    assert "pays back after 150 steps, inside the preset's 2,000" in said
    assert "slower: first step 1.0 s (the compile), then 41.0 against 40.0 ms eager, so it never pays back" in said
    assert compile_payback(rows[:1], max_iters=2000) is None  # nothing compiled: nothing to say
