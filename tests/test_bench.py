"""The benchmark suite's helpers, the baby-fast preset, precision resolution and the bf16 attention path.

Timings are never asserted here (a shared CI machine makes them meaningless); what is checked is
that the helpers measure what they claim: turns really interleave, steps really train, reports
really land in the file they name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import common
from bench.steps import hf_step, our_step
from tinygpt_core import device as device_mod
from tinygpt_core.config import PRESETS, ModelConfig, TrainConfig, get_preset
from tinygpt_core.limits import cpu_cores
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


def test_overhead_interval_brackets_the_ratio_of_medians_and_widens_with_the_spread():
    base = [100.0, 90.0, 110.0, 95.0, 105.0]
    slower = [x * 0.9 for x in base]  # 10% lost in every run
    low, high = common.overhead_interval(base, slower)
    assert low <= 0.1 <= high and common.overhead_interval(base, slower) == (low, high)  # seeded
    assert common.overhead_interval([100.0] * 5, [90.0] * 5) == pytest.approx((0.1, 0.1))  # no spread, no doubt
    noisy_low, noisy_high = common.overhead_interval([80.0, 120, 100, 70, 130], [75.0, 125, 95, 72, 118])
    assert noisy_low < 0 < noisy_high  # 5% between medians, runs spread ±30%: no verdict


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


def test_a_bench_that_changes_torch_threads_does_not_change_the_next_ones(monkeypatch):
    import types

    import bench.__main__ as suite

    seen = []

    def fake(threads_to_set):
        def run(quick=False, results=None):
            seen.append(torch.get_num_threads())
            if threads_to_set:
                torch.set_num_threads(threads_to_set)

        return types.SimpleNamespace(run=run)

    modules = {"bench.fake_a": fake(1), "bench.fake_b": fake(None)}
    monkeypatch.setattr(suite, "BENCHES", {"a": "bench.fake_a", "b": "bench.fake_b"})
    monkeypatch.setattr(suite.importlib, "import_module", modules.__getitem__)
    before = torch.get_num_threads()
    try:
        assert suite.main(["--threads", "2"]) == 0
        assert seen == [2, 2]  # "a" set 1 thread; "b" still started with the suite's 2
    finally:
        torch.set_num_threads(before)


def run_quick(module: str, *args: str, out: Path, timeout: int) -> str:
    """``python -m MODULE ARGS --results OUT`` on the built-in corpus; asserts it ended well, returns OUT's text."""
    env = {**os.environ, "BENCH_CORPUS": "builtin:tiny"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, "--results", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out.read_text()


@pytest.mark.slow
@pytest.mark.heavy  # every bench's quick form, ~30 s: CI's heavy stage
def test_quick_suite_smoke(tmp_path):
    """The fast benchmarks end to end, on the built-in corpus, writing to a temp results file."""
    only = ",".join(SMOKE_BENCHES)
    text = run_quick("bench", "--quick", "--only", only, out=tmp_path / "R.md", timeout=600)
    for title in ("3. Generation", "3b. Decoding on a page run's thread", "4. Live overhead", "5. Inspection"):
        assert title in text
    assert "decode the same tokens: yes" in text
    assert "| 2             |" in text and "| 1             |" in text  # both thread counts timed


# --- every bench script in its --quick form ----------------------------------------------------------

# The suite's fast benches run together in test_quick_suite_smoke above (CI's heavy stage); the rest
# train real presets, start servers, browsers or Ray, and run with -m heavy.
SMOKE_BENCHES = ("inspection", "generation", "page_threads", "live")
HEAVY_MARKS = {"ray": (pytest.mark.ray,), "watched": (pytest.mark.browser,)}


def test_every_bench_has_a_quick_test():
    from bench.__main__ import BENCHES

    assert set(SMOKE_BENCHES) | set(_HEAVY_BENCHES) == set(BENCHES)


def _heavy_params():
    from bench.__main__ import BENCHES

    names = [n for n in BENCHES if n not in SMOKE_BENCHES]
    marks = (pytest.mark.heavy, pytest.mark.timeout(1500))  # minutes each on a busy 2-core machine
    return names, [pytest.param(n, marks=(*marks, *HEAVY_MARKS.get(n, ()))) for n in names]


_HEAVY_BENCHES, _HEAVY_PARAMS = _heavy_params()


@pytest.mark.parametrize("name", _HEAVY_PARAMS)
def test_bench_quick(name, tmp_path):
    """``python -m bench --quick --only NAME`` ends well and writes its section (built-in corpus)."""
    text = run_quick("bench", "--quick", "--only", name, out=tmp_path / "R.md", timeout=1200)
    assert "(--quick: smoke figures, not results)" in text
    if name == "convergence":  # no checkout given: said so, and no nanoGPT time quoted
        assert "nanoGPT comparison skipped" in text and "| skipped" in text
    if name == "profile":  # our fp32 step beside transformers', kind by kind
        assert "ours beside the peers" in text and "nanoGPT not run" in text
        assert "| ours" in text and "transformers" in text and "| matmul" in text and "| total" in text
    if name == "recipes":  # the preset beside the variants it was chosen over, on tuning seeds only
        assert "How the baby-fast recipe was chosen" in text and "baby-fast as it ships" in text
        assert "over tuning seeds 11 (not the convergence table's)" in text
    if name == "grids":  # processes side by side, then the bound on batching members into one model
        assert "| auto (" in text and "Members batched into one model" in text and "(the floor)" in text
        assert "What one core can do" in text and "| one member on 1 thread " in text
        assert "members batched (batch ×" in text
        if cpu_cores() > 1:  # the one-thread step again with the other core(s) training too; whole members
            assert "| one member on 1 thread, " in text and " training one too " in text
            assert "| seq-1 " in text and "**The floor with whole members**" in text
    if name == "gpu":  # on a CPU: the same harness at toy sizes, every part of it
        assert "Time to whole-split val 4.0, `shakespeare-char`" in text and "| 1337 " in text
        assert "**Tokens/s, `baby`**" in text and "| fp32 " in text and "| bf16 autocast " in text
        assert "| runs at once |" in text and "| 2 " in text


def test_gpu_bench_without_a_gpu_says_not_measured(tmp_path, monkeypatch):
    """A full GPU bench on a machine without one writes a single honest line and trains nothing."""
    import bench.gpu as gpu

    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "run_ours", lambda *a, **k: pytest.fail("trained without a GPU"))
    out = gpu.run(results=tmp_path / "R.md")
    text = (tmp_path / "R.md").read_text()
    assert out == {"gpu": None}
    assert "Not measured: this machine has no CUDA GPU" in text and "no GPU" in text


def test_recipes_first_step_needs_every_seed_under_the_target():
    from bench.convergence import SEEDS
    from bench.recipes import TUNING_SEEDS, VARIANTS, first_step_all_reach

    def run(*vals):
        return dict(evals=[dict(step=50 * (i + 1), whole=v) for i, v in enumerate(vals)])

    runs = [run(2.0, 1.89, 1.85), run(2.0, 1.88, 1.86), run(1.99, 1.87, 1.80)]
    assert first_step_all_reach(runs, 1.886) == 150  # at 100 one seed (1.89) is still above
    assert first_step_all_reach(runs[1:], 1.886) == 100
    assert first_step_all_reach([run(2.0, 1.9)], 1.886) is None
    assert first_step_all_reach([run(None, 1.8)], 1.886) == 100  # an eval without a whole-split figure never counts
    assert not set(TUNING_SEEDS) & set(SEEDS)  # the recipe is never chosen on the seeds it is reported on
    assert list(VARIANTS.values())[-1] == {}  # the table ends with the preset as it ships


def test_profile_kinds_sort_operators_by_what_they_do():
    from bench.profile import kind_of

    assert kind_of("aten::addmm") == kind_of("aten::mm") == "matmul"
    assert kind_of("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert kind_of("aten::gelu_backward") == "activation"
    assert kind_of("aten::native_layer_norm_backward") == "layer norm"  # not "norm" of the clipping
    assert kind_of("aten::linalg_vector_norm") == kind_of("aten::_fused_adamw_") == "optimizer, clipping"
    assert kind_of("aten::scatter_add_") != "copies, casts" and kind_of("aten::cat") == "copies, casts"
    assert kind_of("aten::view") == "other"


# --- the convergence harness's parts ------------------------------------------------------------------


def test_whole_split_loss_is_the_mean_over_every_window():
    from bench.convergence import whole_split_loss

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    val = torch.randint(0, 20, (8 * 5 + 3,))
    x, y = val[:40].view(5, 8), val[1:41].view(5, 8)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(x).logits.reshape(-1, 20), y.reshape(-1)).item()
    assert abs(whole_split_loss(model, val, 8, batch=2) - ref) < 1e-5  # batching does not change it
    assert not model.training


FAKE_TRAIN = """
import sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
assert args["device"] == "cpu" and args["batch_size"] == "12" and args["n_embd"] == "128"  # the CPU recipe
for step, val in ((0, 4.2), (250, 2.5), (500, 1.9), (750, 1.8), (1000, 1.7)):
    print(f"step {step}: train loss {val:.4f}, val loss {val:.4f}", flush=True)
    print(f"iter {step}: loss {val:.4f}, time 1.00ms, mfu 0.00%", flush=True)
    time.sleep(0.05)
"""


def _fake_nanogpt(root: Path) -> Path:
    from bench.convergence import NANOGPT_FILES

    for f in (*NANOGPT_FILES, "data/shakespeare_char/prepare.py"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("")
    (root / "train.py").write_text(FAKE_TRAIN)
    (root / "data/shakespeare_char/prepare.py").write_text("open('input.txt').read()\n")  # reads the linked corpus
    return root


def test_nanogpt_runs_from_a_copy_and_is_timed_to_its_first_eval_at_the_target(tmp_path):
    from bench.convergence import nanogpt_problem, prepare_nanogpt, run_nanogpt

    checkout = _fake_nanogpt(tmp_path / "nanoGPT")
    before = sorted(p.name for p in checkout.rglob("*"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\n" * 50)
    assert nanogpt_problem(checkout) is None
    work = prepare_nanogpt(checkout, corpus, tmp_path / "work")
    r = run_nanogpt(work, target=1.886)
    assert r["hit"]["step"] == 750 and r["hit"]["estimate"] == 1.8  # 1.9 at step 500 is not there yet
    assert [e["step"] for e in r["evals"]] == [0, 250, 500, 750]  # stopped at the target
    assert 0 < r["evals"][0]["s"] <= r["hit"]["s"]
    assert sorted(p.name for p in checkout.rglob("*")) == before  # the checkout is never written to


def test_without_a_nanogpt_checkout_the_comparison_says_why(tmp_path):
    from bench.convergence import nanogpt_problem

    assert "no nanoGPT checkout" in nanogpt_problem(None)
    assert "is not a nanoGPT checkout" in nanogpt_problem(tmp_path)


def test_grid_modes_parse_and_alternate():
    from bench.grids import mirrored, parse_mode

    assert parse_mode("seq-2") == (1, 2) and parse_mode("par-3x1") == (3, 1) and parse_mode("auto") == (None, None)
    with pytest.raises(ValueError):
        parse_mode("fast")
    assert mirrored(["a", "b"], 3) == ["a", "b", "b", "a", "a", "b"]


def test_core_bound_maps_step_times_to_grid_floors_and_restores_threads(monkeypatch):
    """Each core trains its share of the members: in turn (share × one-thread step) or batched, alone or
    with the other core busy."""
    import bench.grids as grids

    seconds = {
        "one member on": 0.010,
        "one member on 1 thread": 0.016,
        "3 members batched": 0.045,
        "one member on 1 thread, the other": 0.019,
    }
    busy = []

    @contextlib.contextmanager
    def fake_neighbours(count, preset, vocab_size):
        busy.append(count)
        yield
        busy.append(0)

    def fake_interleaved(fns, rounds, warmup):  # each row's time: the longest label prefix that names it
        return {k: [seconds[max((p for p in seconds if k.startswith(p)), key=len)]] for k in fns}

    monkeypatch.setattr(grids, "cpu_cores", lambda: 2)
    monkeypatch.setattr(grids, "neighbours", fake_neighbours)
    monkeypatch.setattr(grids, "interleaved", fake_interleaved)
    threads = torch.get_num_threads()
    rows, cores = grids.core_bound("tiny", 6, rounds=1)
    assert cores == 2 and torch.get_num_threads() == threads
    assert busy == [1, 0]  # one neighbour for the other core, stopped afterwards
    floors = [f for _, f in rows.values()]
    # one after another: 6 × 10 ms; 3 members per core in turn: 3 × 16 ms; batched: 45 ms; in turn, busy: 3 × 19
    assert floors == pytest.approx([1.0, 48 / 60, 45 / 60, 57 / 60])
    assert list(rows)[2:] == [
        "3 members batched (batch × 3) on 1 thread",
        "one member on 1 thread, the other core training one too",
    ]


def test_core_bound_times_the_busy_step_with_the_neighbour_running(monkeypatch):
    """The last row is timed while the neighbour trains, not before it starts or after it stops."""
    import bench.grids as grids

    state = {"running": False}
    real = grids.neighbours

    def tracked(count, preset, vocab_size):
        @contextlib.contextmanager
        def cm():
            with real(count, preset, vocab_size):
                state["running"] = True
                yield
            state["running"] = False

        return cm()

    seen = {}

    def fake_interleaved(fns, rounds, warmup):
        for k in fns:
            seen[k] = state["running"]
        return {k: [0.01] for k in fns}

    monkeypatch.setattr(grids, "cpu_cores", lambda: 2)
    monkeypatch.setattr(grids, "neighbours", tracked)
    monkeypatch.setattr(grids, "interleaved", fake_interleaved)
    grids.core_bound("tiny", 3, rounds=1)
    assert seen.pop("one member on 1 thread, the other core training one too") is True
    assert not any(seen.values())


def test_core_bound_really_times_the_steps():
    from bench.grids import core_bound

    threads = torch.get_num_threads()
    rows, cores = core_bound("tiny", 3, rounds=1)
    assert torch.get_num_threads() == threads
    assert len(rows) == (4 if cores > 1 else 3) and all(s > 0 for s, _ in rows.values())


@pytest.mark.heavy
@pytest.mark.browser
@pytest.mark.timeout(900)
def test_watched_steady_quick(tmp_path):
    """``python -m bench.watched --steady --quick``: a long CLI run watched by 0, 1 and 3 tabs, measured."""
    text = run_quick("bench.watched", "--steady", "--quick", out=tmp_path / "R.md", timeout=600)
    assert "8b. Watching a run, steady state" in text and "(--quick: smoke figures, not results)" in text
    rows = [line for line in text.splitlines() if line.startswith("| after")]
    assert [row.split("|")[2].strip() for row in rows] == ["0", "1", "3"]
    assert all(float(row.split("|")[3]) > 0 for row in rows), rows  # the run trained while watched
