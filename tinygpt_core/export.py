"""Export a run's model as a Hugging Face GPT-2 checkpoint (config.json + model.safetensors).

The export folder loads with ``transformers.GPT2LMHeadModel.from_pretrained(DIR)`` and gives the
same logits as the run's own model. GPT-2 is one fixed architecture, so an ablation is exported only
when it can be written as GPT-2 weights and config: relu is an activation setting, swapped q/k is a
swap of two weight blocks, sinusoidal or absent positions are a fixed (or zero) position table,
missing biases are zero biases, untied heads are a separate ``lm_head``. The ablation registry says
which ablations GPT-2 cannot express (post-norm, no LayerNorm, no residual, windowed attention,
QK-norm change the computation itself) and why; those runs are refused with an ``ExportError`` that
names each reason (``check_exportable`` lists them up front).

transformers itself is only needed to *check* an export (``verify_export``), not to write one.
Weights are written with safetensors; nothing here unpickles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from .ablation_registry import REGISTRY
from .config import ModelConfig
from .errors import ExportError, RunError
from .model import GPT
from .runs import load_run, read_config, write_bytes_atomic, write_json_atomic

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.py uses
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Not "tokenizer.json": in a Hugging Face folder that name means a `tokenizers` fast-tokenizer file,
# and AutoTokenizer would fail on ours with a confusing parse error.
TOKENIZER_FILE = "tinygpt_tokenizer.json"
SOURCE_FILE = "tinygpt_config.json"
README_FILE = "README.md"


def check_exportable(cfg: ModelConfig) -> list[str]:
    """Reasons GPT-2 cannot express this architecture; an empty list means it can be exported.

    Each reason is the ``export_refusal`` of an ablation the config has (tinygpt_core.ablation_registry).
    """
    return REGISTRY.export_refusals(cfg)


def _require_exportable(cfg: ModelConfig) -> None:
    reasons = check_exportable(cfg)
    if reasons:
        raise ExportError(
            "This run cannot be exported as a Hugging Face GPT-2 model: "
            + "; ".join(reasons)
            + ". Train a run without these ablations to export it."
        )


def _gpt2_eot(tokenizer: Any | None) -> int | None:
    """GPT-2's <|endoftext|> id when the run used GPT-2's own tokenizer (kind "gpt2"), else None."""
    return getattr(tokenizer, "eot_id", None) if getattr(tokenizer, "kind", None) == "gpt2" else None


def hf_config(cfg: ModelConfig, tokenizer: Any | None = None) -> dict[str, Any]:
    """The GPT2Config fields (as config.json holds them) that reproduce this architecture; a run on
    GPT-2's own tokenizer also declares its end-of-text id, so GPT-2's tokenizer pairs with it."""
    eot = _gpt2_eot(tokenizer)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.ff_mult * cfg.n_embd,
        # nn.GELU is the exact erf GELU, which transformers calls "gelu" ("gelu_new" is the tanh one).
        "activation_function": cfg.activation,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,  # 1/sqrt(head_size), as ours
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_weights,
        # The lab's own vocabularies have no GPT-2 <|endoftext|> (id 50256), so no special ids are
        # claimed; a gpt2-tokenizer run has GPT-2's real vocabulary, <|endoftext|> included.
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": "float32",
    }


def _f32(t: torch.Tensor) -> torch.Tensor:
    # A fresh contiguous CPU copy: safetensors refuses tensors that share storage (tied weights).
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def _conv1d(linear: torch.nn.Linear) -> torch.Tensor:
    """GPT-2's Conv1D computes x @ W + b with W (in, out): the transpose of nn.Linear's (out, in)."""
    return _f32(linear.weight.t())


def _bias(linear_or_norm: torch.nn.Module, size: int) -> torch.Tensor:
    b = getattr(linear_or_norm, "bias", None)
    return _f32(b) if b is not None else torch.zeros(size)  # bias=False runs: GPT-2 adds a zero bias


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights renamed and reshaped to GPT2LMHeadModel's state dict (float32, CPU)."""
    cfg = model.config
    _require_exportable(cfg)
    C = cfg.n_embd
    sd: dict[str, torch.Tensor] = {"transformer.wte.weight": _f32(model.wte.weight)}
    # GPT-2 always adds a learned position table; a fixed table or zeros in it computes the same thing.
    if cfg.pos_encoding == "learned":
        wpe = _f32(model.wpe.weight)
    elif cfg.pos_encoding == "sinusoidal":
        wpe = _f32(model.sin_table)
    else:
        wpe = torch.zeros(cfg.block_size, C)
    sd["transformer.wpe.weight"] = wpe  # (block_size, C)

    for i, block in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        for name in ("ln_1", "ln_2"):
            norm = getattr(block, name)
            sd[p + name + ".weight"] = _f32(norm.weight)
            sd[p + name + ".bias"] = _bias(norm, C)
        attn_w = _conv1d(block.attn.c_attn)  # (C, 3C): columns are q | k | v
        attn_b = _bias(block.attn.c_attn, 3 * C)  # (3C,)
        if cfg.swap_qk:
            # Our swapped model queries with the k projection and keys with the q projection;
            # GPT-2 always reads q first, so put the blocks where it expects them.
            order = torch.cat([torch.arange(C, 2 * C), torch.arange(0, C), torch.arange(2 * C, 3 * C)])
            attn_w, attn_b = attn_w[:, order].contiguous(), attn_b[order].contiguous()
        sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"] = attn_w, attn_b
        sd[p + "attn.c_proj.weight"] = _conv1d(block.attn.c_proj)
        sd[p + "attn.c_proj.bias"] = _bias(block.attn.c_proj, C)
        sd[p + "mlp.c_fc.weight"] = _conv1d(block.mlp.c_fc)
        sd[p + "mlp.c_fc.bias"] = _bias(block.mlp.c_fc, cfg.ff_mult * C)
        sd[p + "mlp.c_proj.weight"] = _conv1d(block.mlp.c_proj)
        sd[p + "mlp.c_proj.bias"] = _bias(block.mlp.c_proj, C)

    sd["transformer.ln_f.weight"] = _f32(model.ln_f.weight)
    sd["transformer.ln_f.bias"] = _bias(model.ln_f, C)
    if not cfg.tie_weights:
        sd["lm_head.weight"] = _f32(model.lm_head.weight)  # (vocab, C); tied heads are re-tied on load
    return sd


def _readme(cfg: ModelConfig, tokenizer: Any | None, source: dict[str, Any]) -> str:
    ablations = cfg.ablations()
    lines = [
        "# TinyGPT Lab export (Hugging Face GPT-2 format)",
        "",
        f"Exported from run `{source.get('run', '?')}` (checkpoint `{source.get('checkpoint', '?')}`) by TinyGPT Lab.",
        "",
        "```python",
        "from transformers import GPT2LMHeadModel",
        'model = GPT2LMHeadModel.from_pretrained("THIS_FOLDER").eval()',
        "```",
        "",
        "## Model",
        "",
        f"- {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} dims, MLP {cfg.ff_mult * cfg.n_embd} wide, "
        f"context {cfg.block_size} tokens (`n_positions`), vocabulary {cfg.vocab_size} tokens.",
        f"- Activation `{cfg.activation}` (exact erf GELU is transformers' `gelu`, not GPT-2's `gelu_new`)."
        if cfg.activation == "gelu"
        else f"- Activation `{cfg.activation}`.",
        f"- Ablations: {', '.join(ablations) if ablations else 'none (the GPT-2 baseline)'}.",
    ]
    for a in REGISTRY:
        if a.labelled and a.export_as and a.active(cfg):
            lines.append(f"  - {a.label_of(cfg)}: {a.export_as}.")
    if _gpt2_eot(tokenizer) is not None:
        return "\n".join([*lines, *_gpt2_tokenizer_notes(cfg, tokenizer)])
    lines += [
        "",
        "## Tokenizer: not GPT-2's",
        "",
        "The vocabulary is this run's own"
        + (f" ({tokenizer.kind}, {tokenizer.vocab_size} tokens)" if tokenizer is not None else "")
        + ", not GPT-2's 50k BPE: `GPT2Tokenizer` / `AutoTokenizer` will give wrong ids. "
        "The model has no end-of-text token (`eos_token_id` is unset), so pass `max_new_tokens` to `generate`, "
        f"and keep prompt + new tokens within the context of {cfg.block_size}.",
    ]
    if tokenizer is not None:
        lines += [
            "",
            f"Encode with TinyGPT Lab's tokenizer, saved here as `{TOKENIZER_FILE}`:",
            "",
            "```python",
            "import torch",
            "from tinygpt_core.tokenizers import load_tokenizer",
            f'tok = load_tokenizer("THIS_FOLDER/{TOKENIZER_FILE}")',
            'prompt = "..."  # text made of symbols the training corpus had',
            "ids = torch.tensor([tok.encode(prompt)])",
            f"out = model.generate(ids, max_new_tokens={max(1, cfg.block_size // 2)}, do_sample=True)",
            "print(tok.decode(out[0].tolist()))",
            "```",
        ]
    lines += [
        "",
        f"`{SOURCE_FILE}` holds the original TinyGPT Lab model config. Logits match the run's own model "
        "to within 1e-4 (float32).",
        "",
    ]
    return "\n".join(lines)


def _gpt2_tokenizer_notes(cfg: ModelConfig, tokenizer: Any) -> list[str]:
    return [
        "",
        "## Tokenizer: GPT-2's own",
        "",
        f"This run was trained on GPT-2's BPE vocabulary ({tokenizer.vocab_size:,} tokens, `<|endoftext|>` = "
        f"{tokenizer.eot_id}, declared as `eos_token_id`), so GPT-2's own tokenizer gives the right ids:",
        "",
        "```python",
        "from transformers import AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained("gpt2")  # or: tiktoken.get_encoding("gpt2")',
        'ids = tok("...", return_tensors="pt").input_ids',
        f"out = model.generate(ids, max_new_tokens={max(1, cfg.block_size // 2)}, do_sample=True)",
        "print(tok.decode(out[0]))",
        "```",
        "",
        f"Keep prompt + new tokens within the context of {cfg.block_size}. `{TOKENIZER_FILE}` names the encoding "
        "for TinyGPT Lab.",
        "",
        f"`{SOURCE_FILE}` holds the original TinyGPT Lab model config. Logits match the run's own model "
        "to within 1e-4 (float32).",
        "",
    ]


def export_model(
    model: GPT, out_dir: str | Path, tokenizer: Any | None = None, source: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (and its tokenizer, if given) as a GPT-2 folder; returns the folder."""
    cfg = model.config
    _require_exportable(cfg)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"Export target {out} is a file; give a folder path (it is created if missing).")
    out.mkdir(parents=True, exist_ok=True)
    source = dict(source or {})

    sd = hf_state_dict(model)
    # transformers checks the "format" metadata entry of a safetensors checkpoint.
    write_bytes_atomic(out / WEIGHTS_FILE, st_save(sd, metadata={"format": "pt"}))
    write_json_atomic(out / CONFIG_FILE, hf_config(cfg, tokenizer))
    write_json_atomic(out / SOURCE_FILE, {"model": cfg.to_dict(), "ablations": cfg.ablations(), **source})
    if tokenizer is not None:
        tokenizer.save(out / TOKENIZER_FILE)
    write_bytes_atomic(out / README_FILE, _readme(cfg, tokenizer, source).encode("utf-8"))
    return out


def export_hf(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "best") -> Path:
    """Export a run folder's ``checkpoint`` ("best" or "last") as a Hugging Face GPT-2 folder."""
    run_path, out = Path(run_dir).resolve(), Path(out_dir).resolve()
    if out == run_path or run_path in out.parents:
        # Our config.json / model.safetensors would overwrite the run's own files.
        raise ExportError(f"Export folder {out} is inside the run folder {run_path}; choose a folder outside it.")
    try:
        _require_exportable(read_config(run_path).model)  # refuse before loading weights
    except RunError:
        pass  # a broken folder: load_run says what is wrong with it, with the run's name
    run = load_run(run_path, checkpoint=checkpoint, device="cpu")
    _require_exportable(run.model.config)
    return export_model(
        run.model,
        out,
        tokenizer=run.tokenizer,
        source={"run": run_path.name, "checkpoint": run.checkpoint or checkpoint},
    )


def verify_export(
    model: GPT, out_dir: str | Path, *, batch: int = 2, seq_len: int | None = None, seed: int = 0
) -> float:
    """Load the export with transformers and return the max |logit difference| on random ids."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError as exc:  # pragma: no cover - transformers is optional for exporting
        raise ExportError("Checking an export needs the transformers package: pip install transformers.") from exc
    cfg = model.config
    T = seq_len or cfg.block_size
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (batch, T), generator=g)  # (B, T)
    hf = GPT2LMHeadModel.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours = model(idx.to(next(model.parameters()).device)).logits.float().cpu()
            theirs = hf(idx).logits.float()
    finally:
        model.train(was_training)
    return (ours - theirs).abs().max().item()
