"""The seed presets train, the overfit demo shows the seed's shape, and every preset's description says
only what the preset does (docs/REPRODUCTIONS.md has the measured figures)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from tinygpt_core.ablations import metrics_summary
from tinygpt_core.config import PRESETS
from tinygpt_core.runs import read_metrics
from tinygpt_core.training import TrainSpec, train

SEEDS = ("gptiny", "mini-gpt", "tinystories")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", SEEDS)
def test_seed_preset_trains_a_few_steps(name, tmp_path):
    # Shrunk only where a unit test must be fast: batch and context (builtin:tiny is 1,462 characters).
    # The architecture (layers, heads, width, FFN, positions, window, dropout) and tokenizer are the preset's.
    spec = TrainSpec.from_preset(
        name, "builtin:tiny", max_iters=3, eval_interval=3, eval_iters=1, batch_size=2, block_size=16, sample_tokens=0
    )
    result = train(spec, tmp_path / name)
    assert result.status == "done", result.message
    assert math.isfinite(result.final_train_loss) and math.isfinite(result.final_val_loss)
    preset = PRESETS[name]
    keep = {k: v for k, v in preset.model.items() if k != "block_size"}
    assert {k: getattr(spec.model, k) for k in keep} == keep
    assert spec.tokenizer == preset.tokenizer


_CLAIMS = {  # a phrase a description may use -> what it must match in the preset
    r"(\d+) layers?": lambda p: p.model_config().n_layer,
    r"(\d+) heads?": lambda p: p.model_config().n_head,
    r"(\d+) dims": lambda p: p.model_config().n_embd,
    r"context (\d+)": lambda p: p.model_config().block_size,
    r"batch (\d+)": lambda p: p.train_config().batch_size,
    r"([\d,]+) steps": lambda p: p.train_config().max_iters,
    r"FFN (\d+)": lambda p: p.model_config().ff_mult * p.model_config().n_embd,
    r"window (\d+)": lambda p: p.model_config().attn_window,
    r"BPE (\d+)": lambda p: p.tokenizer_vocab_size,
    r"dropout (\d+(?:\.\d+)?)": lambda p: p.model_config().dropout,
    r"lr (\d+(?:\.\d+)?(?:e-\d+)?)": lambda p: p.train_config().lr,
}
_KINDS = {"char-level": "char", "word-level": "word", "BPE": "bpe"}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_description_says_only_what_the_preset_does(name):
    p = PRESETS[name]
    text = p.description
    for pattern, actual in _CLAIMS.items():
        for found in re.findall(pattern, text):
            assert float(found.replace(",", "")) == pytest.approx(actual(p)), f"{name}: {pattern} says {found}"
    for word, kind in _KINDS.items():
        if word in text:
            assert p.tokenizer == kind, f"{name} says {word} but uses {p.tokenizer}"
    assert "memorises" not in text  # a result, not a setting (issue 17): the tiny preset did not


@pytest.mark.heavy
def test_overfit_preset_memorises_builtin_tiny_and_val_climbs(tmp_path):
    """The seed's shape, in steps: train loss under 0.3; val loss at its minimum early, then 1.5 above it."""
    spec = TrainSpec.from_preset("overfit", "builtin:tiny", device="cpu")
    result = train(spec, tmp_path / "overfit")
    assert result.status == "done", result.message
    s = metrics_summary(read_metrics(tmp_path / "overfit"))
    assert s["final_train_loss"] < 0.3
    assert s["final_val_loss"] >= s["best_val_loss"] + 1.5
    assert s["best_step"] <= spec.train.max_iters // 4  # the minimum comes early
