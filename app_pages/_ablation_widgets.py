"""Ablation widgets, generated from the ablation registry (tinygpt_core.ablation_registry).

No page lists ablations itself. The Train page renders ``ablation_toggles`` and maps a config to
the toggles' values with ``ablation_widget_values`` (presets, a restored form) and back with
``ablation_overrides``; the Runs page's grid form renders ``grid_ablation_picker``. A new registry
entry appears in both without a change here.

Widget keys (after the caller's prefix): ``abl_<key>`` for a toggle, ``abl_<key>_n`` for the number
of a parametric ablation ("abl_window", "abl_window_n"); ``<key>`` is ``Ablation.key``.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from app_pages._common import kept
from tinygpt_core.ablation_registry import PARAM, REGISTRY, Ablation
from tinygpt_core.config import INT_RANGES, ModelConfig, range_text

MAX_N = INT_RANGES["block_size"][1]  # largest n the grid form's inputs offer (the longest context)


def _toggle_key(a: Ablation) -> str:
    return f"abl_{a.key}"


def _n_key(a: Ablation) -> str:
    return f"abl_{a.key}_n"


def _shown(a: Ablation) -> str:
    return a.name.replace(PARAM, "N")


def _described(a: Ablation, n: int | None = None) -> str:
    return a.describe(n) if n is not None or not a.parametric else a.removes.replace(PARAM, "N")


def ablation_widget_values(model: ModelConfig | dict[str, Any]) -> dict[str, Any]:
    """Config → the toggles' values (keys without the page prefix): which are on, and each parametric n."""
    cfg = model if isinstance(model, ModelConfig) else ModelConfig(**model)
    values: dict[str, Any] = {}
    for a, on in zip(REGISTRY.toggles(), REGISTRY.toggle_state(cfg).values(), strict=True):
        if a.parametric:
            values[_toggle_key(a)], values[_n_key(a)] = on is not None, int(on or a.value)
        else:
            values[_toggle_key(a)] = bool(on)
    return values


def ablation_overrides(values: dict[str, Any]) -> dict[str, Any]:
    """The toggles' values (keys without the page prefix) → ModelConfig overrides for every toggled field."""
    state: dict[str, Any] = {}
    for a in REGISTRY.toggles():
        on = bool(values.get(_toggle_key(a)))
        state[a.name] = (int(values.get(_n_key(a)) or a.value) if on else None) if a.parametric else on
    return REGISTRY.toggle_overrides(state)


def _only_one_per_field(key_prefix: str, a: Ablation) -> None:
    """on_change: toggles on one field (pos-sinusoidal, pos-none) are alternatives; switching one on
    switches the others off."""
    if st.session_state.get(key_prefix + _toggle_key(a)):
        for b in REGISTRY.toggles():
            if b is not a and b.field == a.field:
                st.session_state[key_prefix + _toggle_key(b)] = False


def parametric_n_fields(values: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key without prefix, label, the ModelConfig field whose range applies) of each parametric ablation
    that is switched on in ``values`` (the Train form's), so the form can check its n."""
    return [
        (_n_key(a), f"N for {_shown(a)}", a.field if a.field in INT_RANGES else None)
        for a in REGISTRY.toggles()
        if a.parametric and values.get(_toggle_key(a))
    ]


def _range_help(a: Ablation) -> str | None:
    return f"{range_text(a.field)}." if a.field in INT_RANGES else None


def ablation_toggles(key_prefix: str) -> dict[str, Any]:
    """One toggle per registered ablation with its explanation, two columns; returns the ModelConfig overrides.

    Values come from ``st.session_state`` only (no ``value=``): seed them with ``ablation_widget_values``
    so that a preset's on_change can overwrite them."""
    values: dict[str, Any] = {}
    cols = st.columns(2, gap="large")
    for i, a in enumerate(REGISTRY.toggles()):
        with cols[i % 2]:
            tkey = key_prefix + _toggle_key(a)
            st.session_state.setdefault(tkey, False)
            on = st.toggle(
                a.title, **kept(tkey), help=_described(a), on_change=_only_one_per_field, args=(key_prefix, a)
            )
            values[_toggle_key(a)] = on
            n = None
            if a.parametric:
                nkey = key_prefix + _n_key(a)
                st.session_state.setdefault(nkey, a.value)
                if on:  # no min/max: an n out of range reaches the form's check (parametric_n_fields)
                    n = st.number_input(f"N for {_shown(a)}", step=1, help=_range_help(a), **kept(nkey))
                    n = int(n) if n is not None else None
                values[_n_key(a)] = st.session_state[nkey]
            st.caption(_described(a, n))
    return ablation_overrides(values)


DEFAULT_GRID = ("no-layernorm", "pos-none")


def grid_ablation_picker(key_prefix: str = "grid_", default: tuple[str, ...] = DEFAULT_GRID) -> list[str]:
    """The grid form's ablations: a multiselect of the registry's grid options and a number per parametric one.

    Returns the labels to grid, each parametric one with the chosen n ("window-12"). Keys: ``<prefix>ablations``
    and ``<prefix><key>`` for each parametric ablation ("grid_window")."""
    options = REGISTRY.grid_options()
    parametric = {a.label(): a for a in REGISTRY if a.grid and a.parametric}
    left, right = st.columns([3, 1])
    chosen = left.multiselect(
        "Ablations",
        options,
        default=[d for d in default if d in options],
        key=key_prefix + "ablations",
        format_func=lambda k: f"{_shown(parametric[k])} ({parametric[k].title.lower()})" if k in parametric else k,
        help="\n".join(f"- **{_shown(a)}**: {_described(a)}" for a in REGISTRY if a.grid),
    )
    for a in parametric.values():
        right.number_input(
            f"N for {_shown(a)}", min_value=1, max_value=MAX_N, value=int(a.value), key=key_prefix + a.key
        )
    return grid_labels(key_prefix, chosen)


def grid_labels(key_prefix: str = "grid_", chosen: list[str] | None = None) -> list[str]:
    """The grid's ablation labels from the picker's state (each parametric one with its n: "window-12").

    Readable in a callback (the form's submitted values are in st.session_state before the next run draws)."""
    parametric = {a.label(): a for a in REGISTRY if a.grid and a.parametric}
    chosen = st.session_state.get(key_prefix + "ablations", []) if chosen is None else chosen
    return [
        parametric[k].label(int(st.session_state.get(key_prefix + parametric[k].key, parametric[k].value)))
        if k in parametric
        else k
        for k in chosen
    ]
