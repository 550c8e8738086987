"""The Attention page through AppTest: per-head heatmaps and statistics for a tiny trained run,
enlarging a head, prompts with unknown symbols or longer than the context, and run stores that are
empty or hold a broken run folder."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tinygpt_core import checkpoints
from tinygpt_core.runs import RunStore
from tinygpt_core.training import TrainSpec, train

APP = str(Path(__file__).resolve().parent.parent / "app.py")
N_LAYER, N_HEAD, BLOCK = 2, 2, 16


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory) -> tuple[Path, str]:
    """One tiny run (a few steps on builtin:tiny) plus a broken run folder, shared by the module."""
    root = tmp_path_factory.mktemp("runs")
    spec = TrainSpec.from_preset(
        "tiny",
        "builtin:tiny",
        n_layer=N_LAYER,
        n_head=N_HEAD,
        n_embd=32,
        block_size=BLOCK,
        batch_size=4,
        max_iters=2,
        eval_interval=2,
        eval_iters=1,
        warmup_iters=1,
        sample_tokens=0,
        device="cpu",
        name="attn",
    )
    result = train(spec, store=RunStore(root))
    assert result.status == "done", result.message
    broken = root / "broken-20200101-000000"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    (broken / "model.safetensors").write_bytes(b"not weights either")
    return root, result.run_dir.name


@pytest.fixture
def use_store(monkeypatch):
    """Point the app at a run store; the store and loaded models are cached per process, so clear them."""

    def _use(root: Path) -> None:
        monkeypatch.setenv("TINYGPT_RUNS_DIR", str(root))
        st.cache_resource.clear()
        st.cache_data.clear()

    yield _use
    st.cache_resource.clear()
    st.cache_data.clear()


def open_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=90)
    at.run()
    at.switch_page("app_pages/attention.py").run()
    assert not at.exception
    return at


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def title(fig: dict) -> str:
    return (fig["layout"].get("title") or {}).get("text") or ""


def heatmaps(fig: dict) -> list[dict]:
    return [t for t in fig["data"] if t.get("type") == "heatmap"]


def array(value) -> np.ndarray:
    """A plotly JSON array: a plain list, or a typed array {"dtype", "bdata" (base64), "shape"}."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        if isinstance(shape, str):
            shape = [int(n) for n in shape.split(",")]
        return flat.reshape(shape) if shape else flat
    return np.asarray(value, dtype=float)


def test_no_runs_points_to_train(tmp_path, use_store):
    use_store(tmp_path)
    at = open_page()
    assert not at.exception and not at.error
    assert any("Train" in i.value for i in at.info)
    assert not at.get("plotly_chart")


def test_only_a_broken_run_is_not_offered(tmp_path, use_store):
    broken = tmp_path / "bad-20200101-000000"
    broken.mkdir()
    (broken / "config.json").write_text('{"name": 3}')
    use_store(tmp_path)
    at = open_page()
    assert not at.exception
    assert any("Train" in i.value for i in at.info)


def test_heads_and_statistics_for_a_trained_run(trained_store, use_store):
    root, run_id = trained_store
    use_store(root)
    at = open_page()
    assert not at.exception and not at.error
    # The broken folder is not among the choices; the good run is picked.
    options = at.selectbox(key="attn_run").options
    assert len(options) == 1 and "attn" in options[0]

    figs = charts(at)
    grids = [f for f in figs if "attention ·" in title(f)]
    assert len(grids) == N_LAYER  # a small model shows every layer by default
    for fig in grids:
        maps = heatmaps(fig)
        assert len(maps) == N_HEAD
        z = array(maps[0]["z"])
        assert z.shape[0] == z.shape[1] <= BLOCK
        rows = np.nansum(z, axis=1)  # every query's weights sum to 1 (masked cells are blank)
        assert np.allclose(rows, 1.0, atol=1e-4)
    stat_titles = {title(f) for f in figs if len(heatmaps(f)) == 1 and not title(f).startswith("Layer")}
    for name in ("entropy", "distance", "previous-token", "first-token", "induction"):
        assert any(name in t for t in stat_titles), (name, stat_titles)
    stats = [f for f in figs if "induction" in title(f)][0]
    assert array(heatmaps(stats)[0]["z"]).shape == (N_LAYER, N_HEAD)

    # One layer at a time.
    at.button_group(key="attn_layer").set_value(1).run()
    assert not at.exception
    grids = [f for f in charts(at) if "attention ·" in title(f)]
    assert [title(f).startswith("Layer 1") for f in grids] == [True]


def test_enlarging_a_head_shows_that_head(trained_store, use_store):
    root, _ = trained_store
    use_store(root)
    at = open_page()
    big = [f for f in charts(at) if title(f).startswith("Layer 0 · head 0")]
    assert len(big) == 1
    z00 = array(heatmaps(big[0])[0]["z"])

    at.selectbox(key="attn_big_layer").set_value(1)
    at.selectbox(key="attn_big_head").set_value(1).run()
    assert not at.exception
    big = [f for f in charts(at) if title(f).startswith("Layer 1 · head 1")]
    assert len(big) == 1
    z11 = array(heatmaps(big[0])[0]["z"])
    assert z11.shape == z00.shape and not np.allclose(np.nan_to_num(z11), np.nan_to_num(z00))
    # The metrics beside it describe the selected head.
    assert {m.label for m in at.metric} >= {"Entropy (nats)", "Induction score"}


def test_unknown_symbols_warn_and_long_prompts_are_cropped(trained_store, use_store):
    root, run_id = trained_store
    use_store(root)
    at = open_page()
    at.text_area(key=f"attn_prompt_{run_id}").set_value("The light ✨ held§").run()
    assert not at.exception and not at.error
    warning = " ".join(w.value for w in at.warning)
    assert "✨" in warning and "§" in warning
    assert at.get("plotly_chart")  # still drawn, without the unknown symbols

    at.text_area(key=f"attn_prompt_{run_id}").set_value("the light held " * 8).run()
    assert not at.exception and not at.warning
    assert any(f"last {BLOCK}" in i.value for i in at.info)
    grid = [f for f in charts(at) if "attention ·" in title(f)][0]
    assert array(heatmaps(grid)[0]["z"]).shape == (BLOCK, BLOCK)


def test_induction_demo_fills_a_repeated_sequence(trained_store, use_store):
    root, run_id = trained_store
    use_store(root)
    at = open_page()
    at.button(key="attn_demo").click().run()
    assert not at.exception and not at.error
    prompt = at.text_area(key=f"attn_prompt_{run_id}").value
    half = len(prompt) // 2
    assert half > 0 and prompt[:half] == prompt[half:]


def test_a_damaged_checkpoint_shows_an_error(trained_store, use_store, tmp_path):
    root, run_id = trained_store
    copy = tmp_path / run_id
    shutil.copytree(root / run_id, copy)
    last = checkpoints.find_checkpoint(copy, "last").weights
    last.write_bytes(last.read_bytes()[:200])
    use_store(tmp_path)
    at = open_page()
    assert not at.error and at.get("plotly_chart")  # the best checkpoint is intact
    at.radio(key="attn_checkpoint").set_value("last").run()
    assert not at.exception
    assert len(at.error) == 1 and "model.safetensors is truncated" in at.error[0].value
    assert not at.get("plotly_chart")


def test_the_prompt_and_checkpoint_are_kept_across_a_visit_to_another_page(trained_store, use_store):
    """Issue 12 item 4 (forms forget), on this page's prompt and checkpoint."""
    root, run_id = trained_store
    use_store(root)
    at = open_page()
    at.text_area(key=f"attn_prompt_{run_id}").set_value("the light held").run()
    at.radio(key="attn_checkpoint").set_value("last").run()
    at.switch_page("app_pages/runs.py").run()
    at.switch_page("app_pages/attention.py").run()
    assert not at.exception
    assert at.text_area(key=f"attn_prompt_{run_id}").value == "the light held"
    assert at.radio(key="attn_checkpoint").value == "last"
