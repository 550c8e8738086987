"""Hugging Face GPT-2 export: a run folder -> a folder GPT2LMHeadModel loads with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tinygpt_core.config import ModelConfig, TrainConfig
from tinygpt_core.errors import ExportError
from tinygpt_core.export import TOKENIZER_FILE, check_exportable, export_hf
from tinygpt_core.model import GPT
from tinygpt_core.runs import RunConfig, RunWriter, load_run
from tinygpt_core.tokenizers import load_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

TEXT = "the quick brown fox jumps over the lazy dog.\nA <b>bold</b> & 'quoted' line!\n" * 4
TINY = dict(block_size=16, n_layer=2, n_head=2, n_embd=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _trained_model(cfg: ModelConfig, seed: int, steps: int = 4) -> GPT:
    """A few large AdamW steps on random tokens: every weight, bias and LayerNorm gain moves off its
    initial value (zero biases / unit gains at init would hide a mis-mapped tensor)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (4, cfg.block_size), generator=g)
        y = torch.randint(0, cfg.vocab_size, (4, cfg.block_size), generator=g)
        loss = model(x, targets=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _make_run(root: Path, name: str, seed: int = 0, *, last_seed: int | None = None, **overrides) -> Path:
    """A run folder written through the run store's writer, as training writes it."""
    tok = train_tokenizer("char", TEXT)
    cfg = ModelConfig(vocab_size=tok.vocab_size, **{**TINY, **overrides})
    run_dir = root / name
    w = RunWriter(run_dir)
    w.write_config(
        RunConfig(
            name=name,
            model=cfg,
            train=TrainConfig(max_iters=4),
            tokenizer={"kind": "char", "vocab_size": tok.vocab_size},
            corpus={"name": "test", "source": "test", "sha256": "0" * 64, "chars": len(TEXT)},
        )
    )
    w.write_tokenizer(tok)
    w.append_metrics({"step": 4, "loss": 3.0, "train_loss": 3.0, "val_loss": 3.1})
    w.save_checkpoint("best", _trained_model(cfg, seed))
    w.save_checkpoint("last", _trained_model(cfg, seed if last_seed is None else last_seed))
    w.write_status("done", "finished", step=4)
    return run_dir


def _hf_logits(out: Path, idx: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Module]:
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(idx).logits, hf


ABLATIONS = {
    "baseline": {},
    "relu": dict(activation="relu"),
    "swap_qk": dict(swap_qk=True),
    "sinusoidal": dict(pos_encoding="sinusoidal"),
    "no_pos": dict(pos_encoding="none"),
    "untied": dict(tie_weights=False),
    "no_bias": dict(bias=False),
    "all_at_once": dict(
        activation="relu",
        swap_qk=True,
        pos_encoding="sinusoidal",
        tie_weights=False,
        bias=False,
        ff_mult=2,
        dropout=0.1,
    ),
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_export_matches_run_logits(tmp_path: Path, name: str) -> None:
    run_dir = _make_run(tmp_path, name, seed=len(name), **ABLATIONS[name])
    out = export_hf(run_dir, tmp_path / "hf")
    run = load_run(run_dir)
    assert check_exportable(run.config.model) == []

    idx = torch.randint(
        0, run.config.model.vocab_size, (3, run.config.model.block_size), generator=torch.Generator().manual_seed(1)
    )  # full context: every position row is used
    with torch.no_grad():
        ours = run.model(idx).logits
    theirs, hf = _hf_logits(out, idx)
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max |logit difference| = {diff:.2e}")
    assert diff < 1e-4
    assert ours.abs().max().item() > 0.1  # the comparison is not between two near-zero outputs

    # transformers honours the tie setting rather than silently re-tying the head.
    tied = hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert tied == run.config.model.tie_weights


def test_export_folder_contents(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path, "run")
    out = export_hf(run_dir, tmp_path / "export" / "nested")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", TOKENIZER_FILE} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".tmp")) for n in names)  # safetensors only
    cfg = json.loads((out / "config.json").read_text())
    # nn.GELU is exact (erf); GPT-2's own "gelu_new" is the tanh approximation and would drift.
    assert cfg["activation_function"] == "gelu"
    assert cfg["n_positions"] == 16 and cfg["n_inner"] == 4 * 32 and cfg["layer_norm_epsilon"] == 1e-5
    # The exported tokenizer is ours and encodes exactly as the run's tokenizer does.
    tok = load_tokenizer(out / TOKENIZER_FILE)
    assert tok.encode("the lazy fox") == load_run(run_dir).tokenizer.encode("the lazy fox")
    readme = (out / "README.md").read_text()
    assert "not GPT-2's" in readme and TOKENIZER_FILE in readme


def test_export_last_checkpoint(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path, "run", seed=0, last_seed=7)
    idx = torch.arange(16).unsqueeze(0) % 10
    out = export_hf(run_dir, tmp_path / "last", checkpoint="last")
    with torch.no_grad():
        last = load_run(run_dir, checkpoint="last").model(idx).logits
        best = load_run(run_dir, checkpoint="best").model(idx).logits
    theirs, _ = _hf_logits(out, idx)
    assert (last - theirs).abs().max().item() < 1e-4
    assert (best - theirs).abs().max().item() > 1e-2  # it really is the other checkpoint


@pytest.mark.parametrize(
    "overrides, phrase",
    [
        (dict(norm_position="post"), "this run uses post-norm"),
        (dict(use_layernorm=False), "no LayerNorm"),
        (dict(use_residual=False), "no residual"),
        (dict(attn_window=4), "attention window of 4 tokens"),
    ],
)
def test_unexportable_architectures_are_refused(tmp_path: Path, overrides: dict, phrase: str) -> None:
    run_dir = _make_run(tmp_path, "run", **overrides)
    reasons = check_exportable(ModelConfig(**overrides))
    assert len(reasons) == 1 and phrase in reasons[0]
    out = tmp_path / "hf"
    with pytest.raises(ExportError, match=phrase):
        export_hf(run_dir, out)
    assert not out.exists()  # refused before anything was written


def test_every_reason_is_named(tmp_path: Path) -> None:
    overrides = dict(norm_position="post", use_residual=False, attn_window=3)
    run_dir = _make_run(tmp_path, "run", **overrides)
    with pytest.raises(ExportError) as exc:
        export_hf(run_dir, tmp_path / "hf")
    msg = str(exc.value)
    for phrase in ("post-norm", "no residual", "attention window of 3"):
        assert phrase in msg
    assert len(check_exportable(ModelConfig(**overrides))) == 3


def test_export_into_run_folder_is_refused(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path, "run")
    before = (run_dir / "config.json").read_bytes()
    with pytest.raises(ExportError, match="inside the run folder"):
        export_hf(run_dir, run_dir)
    with pytest.raises(ExportError, match="inside the run folder"):
        export_hf(run_dir, run_dir / "hf")
    assert (run_dir / "config.json").read_bytes() == before
    load_run(run_dir)  # still a valid run
