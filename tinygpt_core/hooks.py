"""Hook points: named places in the model's forward pass where inspection reads or replaces activations.

The model (``model.py``) passes three kinds of activation through a ``HookPoint``, an identity module:

    hook_embed                  (B, T, C)       token + position embeddings: the residual stream before block 0
    blocks.{i}.attn.hook_z      (B, nh, T, hs)  each head's output, before the output projection mixes the heads
    blocks.{i}.hook_resid_post  (B, T, C)       the residual stream after block i

``run_with_hooks(model, {name: fn})`` calls ``fn(tensor)`` at those points for as long as the ``with``
block lasts; ``fn`` returns a replacement tensor (knockout) or None to leave it as it is (the logit
lens and the health probe only read). The functions live in a context variable, not on the model:
a model loaded once and shared by every visitor of the app (``st.cache_resource``) can be knocked
about by one visitor's script thread while another thread runs it untouched. Without an active
``run_with_hooks`` a hook point costs a module call and one context-variable read; a compiled graph
(``torch.compile`` in training) skips it altogether.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn as nn

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]

# Active hooks of this thread (contextvars: each thread starts with none): HookPoint -> its functions, in order.
_ACTIVE: contextvars.ContextVar[dict[nn.Module, tuple[HookFn, ...]] | None] = contextvars.ContextVar(
    "tinygpt_hooks", default=None
)


class HookPoint(nn.Module):
    """An identity in the forward pass that ``run_with_hooks`` can read or replace, by its ``name``."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""  # set by name_hook_points once the model is built

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # constant under tracing: a compiled graph has no hook branch
            return x
        active = _ACTIVE.get()
        if active is None:
            return x
        for fn in active.get(self, ()):
            out = fn(x)
            if out is not None:
                x = out
        return x


def name_hook_points(model: nn.Module) -> None:
    """Give every HookPoint of ``model`` its dotted module name (``blocks.0.attn.hook_z``)."""
    for name, module in model.named_modules():
        if isinstance(module, HookPoint):
            module.name = name


def hook_names(model: nn.Module) -> list[str]:
    """Every hook point of ``model``, in forward order."""
    return [name for name, m in model.named_modules() if isinstance(m, HookPoint)]


def hooks_active() -> bool:
    """Whether a ``run_with_hooks`` block is open in this thread (fast paths that skip hook points ask)."""
    return bool(_ACTIVE.get())


@contextlib.contextmanager
def run_with_hooks(model: nn.Module, fns: Mapping[str, HookFn]) -> Iterator[None]:
    """Call ``fns[name](activation)`` at the named hook points of ``model`` inside the ``with`` block,
    in this thread only. Nested blocks add to the outer ones (outer functions run first).
    ValueError names an unknown hook point and lists the known ones."""
    points = dict(model.named_modules())
    added: dict[nn.Module, tuple[HookFn, ...]] = {}
    for name, fn in fns.items():
        point = points.get(name)
        if not isinstance(point, HookPoint):
            known = ", ".join(hook_names(model)[:8])
            raise ValueError(f"{name!r} is not a hook point of this model; hook points are named like {known}, …")
        added[point] = added.get(point, ()) + (fn,)
    outer = _ACTIVE.get() or {}
    merged = dict(outer)
    for point, more in added.items():
        merged[point] = merged.get(point, ()) + more
    token = _ACTIVE.set(merged)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


__all__ = ["HookFn", "HookPoint", "hook_names", "name_hook_points", "run_with_hooks"]
