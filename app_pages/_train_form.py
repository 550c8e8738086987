"""The Train page's setup form and the configs it stands for (not a page: the underscore keeps it out
of navigation).

The form's widgets hold their values in st.session_state under ``K + field``; this module turns a
preset into those values, the values into ``ModelConfig``/``TrainConfig`` overrides and a
``TrainSpec``, and counts a configuration's parameters through the core. No widgets are drawn here.
"""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from app_pages._ablation_widgets import ablation_overrides, ablation_widget_values, parametric_n_fields
from tinygpt_core.config import ModelConfig, check_field, get_preset, range_text
from tinygpt_core.data import Corpus
from tinygpt_core.errors import ConfigError
from tinygpt_core.gpt2_tokenizer import GPT2_VOCAB_SIZE
from tinygpt_core.model import count_params
from tinygpt_core.runs import RunStore
from tinygpt_core.training import TrainSpec

SIZED_TOKENIZERS = ("bpe", "word")  # the kinds whose vocabulary size the form sets
K = "train_"  # prefix of every widget key on the Train page (session_state is shared by all pages)
SOURCES = ("Built-in", "Upload a .txt file", "File on the server")
# Form fields a preset does not set, with their starting values.
OTHER_FIELDS: dict[str, Any] = {
    "source": SOURCES[0],
    "builtin": "tiny",
    "path": "",
    "name": "",
    "device": "auto",
    "precision": "auto",
    "compile": False,
    "tensorboard": False,  # also write TensorBoard events (into the run's own folder)
}
# The form's number fields: form key -> (label, the core setting whose allowed range applies, or None for a
# decimal number that the core's validation checks as a whole config). The inputs have no min/max of their
# own: a number out of range must reach the server, be named in an error and keep Start disabled. (With a
# min/max the browser only turns the field red and keeps sending the previous value, so Start trained that.)
NUMBER_FIELDS: dict[str, tuple[str, str | None]] = {
    "vocab": ("Vocabulary size", "tokenizer_vocab_size"),
    "n_layer": ("Layers", "n_layer"),
    "n_head": ("Heads", "n_head"),
    "n_embd": ("Width", "n_embd"),
    "block_size": ("Context", "block_size"),
    "ff_mult": ("MLP multiplier", "ff_mult"),
    "dropout": ("Dropout", None),
    "max_iters": ("Steps (max_iters)", "max_iters"),
    "batch_size": ("Batch size", "batch_size"),
    "lr": ("Learning rate", None),
    "eval_interval": ("Eval every (steps)", "eval_interval"),
    "seed": ("Seed", "seed"),
    "patience": ("Early-stop patience (0 = off)", "early_stop_patience"),
    "stop_val": ("Stop at val loss (0 = off)", None),
    "grad_clip": ("Grad clip (0 = off)", None),
    "warmup": ("Warm-up steps", "warmup_iters"),
}
OFF_WHEN_ZERO = ("patience", "stop_val", "grad_clip")  # 0 switches these off


def allowed(field: str) -> str:
    """The allowed values of a whole-number field in words, from the core's ranges ("1 to 48")."""
    setting = NUMBER_FIELDS[field][1]
    if setting is None:
        return ""
    return ("0 (off) or " if field in OFF_WHEN_ZERO else "") + range_text(setting)


def form_problems(f: dict[str, Any]) -> list[str]:
    """Every number of the form that is empty or out of its range, one sentence each naming the field and
    the allowed range (checked with the core's own ranges, config.INT_RANGES); [] when all are usable."""
    problems = []
    fields = {k: v for k, v in NUMBER_FIELDS.items() if k != "vocab" or f.get("tokenizer") in SIZED_TOKENIZERS}
    checks = [(f.get(k), label, setting, k in OFF_WHEN_ZERO) for k, (label, setting) in fields.items()]
    checks += [(f.get(k), label, setting, False) for k, label, setting in parametric_n_fields(f)]
    for value, label, setting, zero_is_off in checks:
        if value is None:
            what = f"a whole number from {range_text(setting)}" if setting else "a number"
            problems.append(f"**{label}** is empty: enter {what}.")
        elif setting is not None and not (zero_is_off and value == 0):
            try:
                check_field(setting, value)
            except ConfigError as exc:
                problems.append(f"**{label}**: {exc}")
    return problems


# Session keys that are not widgets (no page prefix, so they never look like form fields).
LAST_FORM = "trainpage_last_form"  # the last form submitted, restored when the setup view comes back


def preset_defaults(name: str) -> dict[str, Any]:
    """The widget values a preset stands for (keys without the page prefix)."""
    p = get_preset(name)
    m, t = p.model_config(), p.train_config()
    return {
        "tokenizer": p.tokenizer,
        "vocab": p.tokenizer_vocab_size or 512,
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "n_embd": m.n_embd,
        "block_size": m.block_size,
        "ff_mult": m.ff_mult,
        "dropout": float(m.dropout),
        **ablation_widget_values(m),  # one toggle per registered ablation
        "max_iters": t.max_iters,
        "batch_size": t.batch_size,
        "lr": float(t.lr),
        "eval_interval": t.eval_interval,
        "seed": t.seed,
        "patience": t.early_stop_patience or 0,
        "stop_val": float(t.stop_at_val_loss or 0.0),
        "grad_clip": float(t.grad_clip),
        "warmup": t.warmup_iters,
    }


def apply_preset() -> None:
    """on_change of the preset box: every setting the preset defines takes the preset's value."""
    for k, v in preset_defaults(st.session_state[K + "preset"]).items():
        st.session_state[K + k] = v


def init_form() -> None:
    """Give each widget its starting value once (from the last submitted form, else the preset).

    Widgets get their value only through session_state (no value= argument), so the preset's
    on_change can overwrite them."""
    last = st.session_state.get(LAST_FORM, {})
    st.session_state.setdefault(K + "preset", last.get("preset", "tiny"))
    for k, v in preset_defaults(st.session_state[K + "preset"]).items():
        st.session_state.setdefault(K + k, last.get(k, v))
    for k, v in OTHER_FIELDS.items():
        st.session_state.setdefault(K + k, last.get(k, v))


def form_values() -> dict[str, Any]:
    """The setup form as a plain dict (keys without the page prefix)."""
    keys = [*preset_defaults("tiny"), *OTHER_FIELDS, "preset"]
    return {k: st.session_state.get(K + k) for k in keys}


def model_overrides(f: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields from the form (vocab_size is filled in from the tokenizer at training time)."""
    return dict(
        n_layer=int(f["n_layer"]),
        n_head=int(f["n_head"]),
        n_embd=int(f["n_embd"]),
        block_size=int(f["block_size"]),
        ff_mult=int(f["ff_mult"]),
        dropout=float(f["dropout"]),
        **ablation_overrides(f),
    )


def train_overrides(f: dict[str, Any]) -> dict[str, Any]:
    return dict(
        max_iters=int(f["max_iters"]),
        batch_size=int(f["batch_size"]),
        lr=float(f["lr"]),
        eval_interval=int(f["eval_interval"]),
        seed=int(f["seed"]),
        early_stop_patience=int(f["patience"]) or None,
        stop_at_val_loss=float(f["stop_val"]) or None,
        grad_clip=float(f["grad_clip"]),
        warmup_iters=int(f["warmup"]),
        device=f["device"],
        precision=f["precision"],
        compile=bool(f["compile"]),
        # The run store's root: each run's events land in its own folder (tensorboard_log.log_dir_for).
        tensorboard_dir=str(RunStore().root) if f.get("tensorboard") else None,
    )


def build_spec(f: dict[str, Any], corpus: Corpus | str) -> TrainSpec:
    preset = get_preset(f["preset"])
    return TrainSpec(
        corpus=corpus,
        model=preset.model_config(**model_overrides(f)),
        train=preset.train_config(**train_overrides(f)),
        tokenizer=f["tokenizer"],
        tokenizer_vocab_size=int(f["vocab"]) if f["tokenizer"] in SIZED_TOKENIZERS else None,
        name=(f.get("name") or "").strip() or None,
        preset=f["preset"],
    )


@st.cache_data(max_entries=64, show_spinner=False)
def _param_count(model_json: str) -> int:
    return count_params(ModelConfig.from_dict(json.loads(model_json)))


def form_vocab_size(f: dict[str, Any], cfg: ModelConfig) -> int:
    """The vocabulary the form's tokenizer will have, for counting parameters before it exists: the
    size typed for bpe/word, GPT-2's fixed one for gpt2, the config's (the corpus decides) for char."""
    if f["tokenizer"] in SIZED_TOKENIZERS:
        return int(f["vocab"])
    return GPT2_VOCAB_SIZE if f["tokenizer"] == "gpt2" else cfg.vocab_size


def param_count(cfg: ModelConfig, vocab_size: int | None = None) -> int:
    """Parameters of ``cfg`` (with ``vocab_size`` when given), counted by the core without allocating them."""
    d = cfg.to_dict()
    if vocab_size is not None:
        d["vocab_size"] = vocab_size
    return _param_count(json.dumps(d, sort_keys=True))
