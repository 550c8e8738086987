"""The benchmark suite's helpers, the baby-fast preset, precision resolution and the bf16 attention path.

Timings are never asserted here (a shared CI machine makes them meaningless); what is checked is
that the helpers measure what they claim: turns really interleave, steps really train, reports
really land in the file they name.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import common
from bench.steps import hf_step, our_step
from tinygpt_core import device as device_mod
from tinygpt_core.config import PRESETS, ModelConfig, TrainConfig, get_preset
from tinygpt_core.model import GPT

ROOT = Path(__file__).resolve().parent.parent


def test_baby_fast_has_the_baby_model_and_validates():
    fast, baby = get_preset("baby-fast"), get_preset("baby")
    assert fast.description and "\n" not in fast.description
    for key in ("n_layer", "n_head", "n_embd", "block_size", "dropout"):
        assert fast.model_config().__getattribute__(key) == baby.model_config().__getattribute__(key), key
    fast.model_config(vocab_size=65).validate()
    tc = fast.train_config().validate()
    assert tc.optimizer == "muon"
    assert tc.max_iters < baby.train_config().max_iters  # the point of the preset: fewer steps to the same loss
    assert "baby-fast" in PRESETS


def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: True)
    assert device_mod.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: False)
    assert device_mod.resolve_precision("auto", cpu) == "fp32"
    assert device_mod.resolve_precision("fp32", cpu) == "fp32"  # an explicit choice always wins
    assert device_mod.resolve_precision("bf16", cpu) == "bf16"


def test_bf16_autocast_attention_runs_in_fp32_on_cpu_and_keeps_the_cache_dtype(monkeypatch):
    import tinygpt_core.model as model_mod

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        ref = model(idx).logits
        seen = []
        real_sdpa = model_mod.F.scaled_dot_product_attention

        def spy(q, k, v, **kw):
            out = real_sdpa(q, k, v, **kw)
            seen.append((q.dtype, out.dtype))
            return out

        monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", spy)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(idx, use_cache=True)
    # CPU bf16 flash-attention backward is slow: attention itself must run (and stay) in fp32.
    assert seen == [(torch.float32, torch.float32)] * 2
    assert out.logits.dtype == torch.bfloat16
    assert (out.logits.float() - ref).abs().max() < 0.05  # bf16 rounding, not a different computation
    k, v = out.past_kv[0]
    assert k.dtype == v.dtype == torch.bfloat16  # the fp32 upcast is local to the attention call


def test_bf16_training_step_has_gradients_for_every_parameter():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(0, 40, (3, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_interleaved_runs_in_turns_and_times_every_call():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = common.interleaved(fns, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4  # one warm-up round, then A B A B A B
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_table_is_markdown_with_aligned_columns():
    text = common.table(["name", "value"], [["x", 1234.5], ["long name", None]])
    lines = text.splitlines()
    assert lines[0].startswith("| name") and set(lines[1]) <= {"|", "-"}
    assert "1,234" in text or "1,235" in text
    assert "–" in lines[3]
    assert len({len(line) for line in lines}) == 1


def test_report_appends_sections_with_the_machine_line(tmp_path):
    path = tmp_path / "RESULTS.md"
    for i in range(2):
        r = common.Report(f"bench {i}")
        r.add_table(["a"], [[i]])
        r.emit(path)
    text = path.read_text()
    assert text.startswith("# Benchmark results")
    assert text.count("## bench") == 2 and text.index("## bench 0") < text.index("## bench 1")
    assert f"torch {torch.__version__}" in text and "threads" in text


def test_corpus_source_prefers_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_CORPUS", "builtin:tiny")
    assert common.corpus_source() == "builtin:tiny"
    monkeypatch.delenv("BENCH_CORPUS")
    assert common.corpus_source() in (str(common.SHAKESPEARE), "builtin:shakespeare")


def _tiny():
    cfg = ModelConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16)
    tcfg = TrainConfig(batch_size=4, max_iters=10, warmup_iters=0, lr=1e-2, device="cpu")
    ids = torch.randint(0, 30, (400,), generator=torch.Generator().manual_seed(0))
    return cfg, tcfg, ids


@pytest.mark.parametrize("make", [our_step, hf_step])
def test_steppers_train(make):
    cfg, tcfg, ids = _tiny()
    # A corpus with an obvious pattern, so a few steps must lower the loss.
    ids = torch.arange(400) % 30
    stepper = make(cfg, tcfg, ids, precision="fp32")
    losses = [stepper.step() for _ in range(15)]
    assert all(map(lambda x: x == x, losses))
    assert losses[-1] < losses[0]
    assert stepper.tokens_per_step == 4 * 8
    assert stepper.flops_per_token > 0


def test_our_stepper_runs_the_training_loops_step():
    cfg, tcfg, ids = _tiny()
    stepper = our_step(cfg, dataclasses.replace(tcfg, optimizer="muon"), ids, precision="bf16")
    before = [p.detach().clone() for p in stepper.model.parameters()]
    stepper.step()
    assert stepper.precision == "bf16"
    assert any(not torch.equal(a, p) for a, p in zip(before, stepper.model.parameters()))


def test_flops_estimates_agree_between_ours_and_the_peer():
    cfg, tcfg, ids = _tiny()
    assert our_step(cfg, tcfg, ids).flops_per_token == hf_step(cfg, tcfg, ids).flops_per_token


def test_bench_cli_rejects_unknown_names(capsys):
    from bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["--only", "nope"])
    assert "unknown benchmark" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_suite_smoke(tmp_path):
    """The fast benchmarks end to end, on the built-in corpus, writing to a temp results file."""
    out = tmp_path / "R.md"
    env = {**__import__("os").environ, "BENCH_CORPUS": "builtin:tiny"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "inspection,generation,live", "--results", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    for title in ("3. Generation", "4. Live overhead", "5. Inspection"):
        assert title in text
    assert "decode the same tokens: yes" in text
