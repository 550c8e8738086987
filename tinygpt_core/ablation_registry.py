"""The ablation registry: every way the lab can depart from the GPT-2 baseline, declared once.

An ``Ablation`` sets one ``ModelConfig`` field to one value. It carries everything the rest of the
lab needs to offer it, so nothing else keeps a list of ablations:

- ``name``: its label in the runs table (``ModelConfig.ablations()``) and in grids (``grid-<id>/<name>``);
- ``title`` and ``removes``: the Train page toggle and its one-line explanation;
- ``flag``: the ``train`` CLI flag that sets the field;
- ``grid``: whether an ablation grid may use it;
- ``export_as`` / ``export_refusal``: how a GPT-2 export writes it, or why GPT-2 cannot express it.

Three shapes cover the lab's ablations and read the same way in the table below:

- a **switch**: one field, one value (``no-layernorm`` sets ``use_layernorm=False``);
- a **choice**: several entries on one field, one per alternative to the baseline value
  (``pos-sinusoidal`` and ``pos-none`` on ``pos_encoding``; they share the flag ``--pos-encoding``,
  whose choices are the baseline value followed by theirs);
- a **parametric** one: ``{n}`` in its name stands for a whole number chosen by the user, and
  ``value`` is the default (``window-{n}``: ``attn_window=n``, labelled ``window-8``, ``window-64``, …).

What is generated from ``REGISTRY``: ``ModelConfig.ablations()`` (labels), the Train page's
toggles and their reverse mapping (``toggle_state`` / ``toggle_overrides``), the grid's choices and
``grid_specs`` (``grid_options`` / ``parse``), the CLI flags (``add_cli_flags``), the export checks
(``export_refusals``) and the ablation tests. Adding an ablation: a ``ModelConfig`` field (default =
the baseline), its effect in model.py, one entry below — see docs/ABLATIONS.md.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .config import ModelConfig
from .errors import ConfigError

PARAM = "{n}"  # in an ablation's name, title, removes or export text: the user's number


@dataclass(frozen=True)
class Ablation:
    """One departure from the GPT-2 baseline: ``field`` set to ``value`` (see the module docstring)."""

    name: str  # label in runs and grids; "{n}" makes it parametric ("window-{n}")
    field: str  # the ModelConfig field it changes
    value: Any  # the value it sets; for a parametric ablation the default n
    title: str  # Train page toggle
    removes: str  # one line: what it removes or changes (Train page, grid help, CLI help)
    flag: str  # `train` CLI flag
    grid: bool = True  # an ablation grid may use it
    export_as: str | None = None  # how the GPT-2 export expresses it (named in the export's README)
    export_refusal: str | None = None  # why GPT-2 cannot express it (the export error); None: exportable
    labelled: bool = True  # named by ModelConfig.ablations() when a config has it
    toggle: bool = True  # offered as a Train page toggle (False: another input already sets the field)
    flag_help: str | None = None  # CLI help when the flag is more than this ablation (e.g. --n-head)

    @property
    def parametric(self) -> bool:
        return PARAM in self.name

    @property
    def exportable(self) -> bool:
        return self.export_refusal is None

    @property
    def baseline(self) -> Any:
        """The field's value in the GPT-2 baseline (ModelConfig's default)."""
        return _DEFAULTS[self.field]

    @property
    def key(self) -> str:
        """A name-safe identifier: "no_layernorm", "window" (widget keys and the like)."""
        return re.sub(r"[^a-z0-9]+", "_", self.name.replace(PARAM, "")).strip("_")

    def label(self, n: int | None = None) -> str:
        """Its label; a parametric ablation's for the number n (default: its own default)."""
        return self.name.replace(PARAM, str(self._n(n))) if self.parametric else self.name

    def label_of(self, cfg: ModelConfig) -> str:
        """Its label as a config that has it reads ("window-64" for attn_window=64)."""
        return self.label(getattr(cfg, self.field)) if self.parametric else self.name

    def describe(self, n: int | None = None) -> str:
        return self.removes.replace(PARAM, str(self._n(n))) if self.parametric else self.removes

    def overrides(self, n: int | None = None) -> dict[str, Any]:
        """The ModelConfig change it makes (for a parametric one, with the number n)."""
        return {self.field: self._n(n) if self.parametric else self.value}

    def active(self, cfg: ModelConfig) -> bool:
        current = getattr(cfg, self.field)
        if self.parametric:
            return current is not None and current != self.baseline
        return current == self.value

    def refusal(self, cfg: ModelConfig) -> str:
        """The export refusal for a config that has this ablation."""
        text = self.export_refusal or ""
        return text.replace(PARAM, str(getattr(cfg, self.field))) if self.parametric else text

    def cli_args(self, n: int | None = None) -> list[str]:
        """The `train` arguments that select it: ["--no-layernorm"], ["--attn-window", "8"]."""
        if isinstance(self.baseline, bool):
            return [self.flag]
        return [self.flag, str(self.overrides(n)[self.field])]

    def _n(self, n: int | None) -> int:
        n = self.value if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"Ablation {self.name!r}: n must be a whole number, at least 1; got {n!r}.")
        return n


class Registry:
    """The ordered ablations, and everything generated from them."""

    def __init__(self, ablations: Iterable[Ablation]):
        self._all = tuple(ablations)
        _check(self._all)

    def __iter__(self) -> Iterator[Ablation]:
        return iter(self._all)

    def __len__(self) -> int:
        return len(self._all)

    def get(self, name: str) -> Ablation:
        """An ablation by its declared name ("no-layernorm", "window-{n}")."""
        for a in self._all:
            if a.name == name:
                return a
        raise ConfigError(f"No ablation named {name!r}.")

    # --- labels and grids ---------------------------------------------------------------------------

    def labels(self, cfg: ModelConfig) -> list[str]:
        """Labels of every labelled ablation a config has, in registry order (ModelConfig.ablations())."""
        return [a.label_of(cfg) for a in self._all if a.labelled and a.active(cfg)]

    def grid_options(self) -> list[str]:
        """Labels a grid may use, each parametric one at its default n ("window-8")."""
        return [a.label() for a in self._all if a.grid]

    def parse(self, label: str) -> tuple[Ablation, dict[str, Any]]:
        """(ablation, ModelConfig overrides) for a label, including any n of a parametric one ("window-12")."""
        for a in self._all:
            if not a.parametric and a.name == label:
                return a, a.overrides()
            if a.parametric:
                prefix, _, suffix = a.name.partition(PARAM)
                m = re.fullmatch(re.escape(prefix) + r"(-?\d+)" + re.escape(suffix), label)
                if m:
                    return a, a.overrides(int(m.group(1)))
        choices = ", ".join(a.name.replace(PARAM, "<N>") for a in self._all)
        raise ConfigError(f"Unknown ablation {label!r}. Choose from: {choices}.")

    def order(self, label: str) -> int:
        """Position of a label's ablation in the registry (unknown labels last), to sort grid members."""
        try:
            return self._all.index(self.parse(label)[0])
        except ConfigError:
            return len(self._all)

    # --- export -------------------------------------------------------------------------------------

    def export_refusals(self, cfg: ModelConfig) -> list[str]:
        """Why GPT-2 cannot express this config: one reason per unexportable ablation it has."""
        return [a.refusal(cfg) for a in self._all if not a.exportable and a.active(cfg)]

    # --- Train page toggles -------------------------------------------------------------------------

    def toggles(self) -> list[Ablation]:
        return [a for a in self._all if a.toggle]

    def toggle_state(self, cfg: ModelConfig) -> dict[str, Any]:
        """Config → toggles: {name: on?} for each toggle; a parametric one maps to its n, or None when off."""
        state: dict[str, Any] = {}
        for a in self.toggles():
            if a.parametric:
                state[a.name] = getattr(cfg, a.field) if a.active(cfg) else None
            else:
                state[a.name] = a.active(cfg)
        return state

    def toggle_overrides(self, state: dict[str, Any]) -> dict[str, Any]:
        """Toggles → config: every toggled field at its baseline, then each toggle that is on.

        Toggles sharing a field (pos-sinusoidal, pos-none) are alternatives; the last one on wins.
        """
        out: dict[str, Any] = {}
        for a in self.toggles():
            out.setdefault(a.field, a.baseline)
            on = state.get(a.name)
            if a.parametric and on is not None and on is not False:
                out[a.field] = a.overrides(int(on))[a.field]
            elif not a.parametric and on:
                out[a.field] = a.value
        return out

    # --- CLI ----------------------------------------------------------------------------------------

    def add_cli_flags(self, group: Any) -> None:
        """Add one `train` flag per distinct ``flag`` to an argparse parser or group.

        Each flag stores into the ModelConfig field (default None: keep the preset's value). A bool
        field gets a bare switch; a text field a choice of its baseline and every registered value; a
        number field takes N.
        """
        by_flag: dict[str, list[Ablation]] = {}
        for a in self._all:
            by_flag.setdefault(a.flag, []).append(a)
        for flag, entries in by_flag.items():
            first = entries[0]
            help_text = first.flag_help
            if isinstance(first.baseline, bool):
                group.add_argument(
                    flag,
                    dest=first.field,
                    action="store_const",
                    const=first.value,
                    help=help_text or _lower_first(first.removes),
                )
            elif isinstance(first.value, str):
                choices = list(dict.fromkeys([first.baseline, *(a.value for a in entries)]))
                default_help = f"{first.baseline} is GPT-2's; " + "; ".join(
                    f"{a.value}: {_lower_first(a.removes)}" for a in entries
                )
                group.add_argument(flag, dest=first.field, choices=choices, help=help_text or default_help)
            else:
                group.add_argument(
                    flag,
                    dest=first.field,
                    type=int,
                    metavar="N",
                    help=help_text or _lower_first(first.removes.replace(PARAM, "N")),
                )


def _lower_first(s: str) -> str:
    """A sentence as a help fragment: no final full stop, first letter lower-case unless an acronym."""
    s = s.rstrip(".")
    first = s.split(" ", 1)[0]
    return s if any(c.isupper() for c in first[1:]) else s[:1].lower() + s[1:]


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def _check(ablations: tuple[Ablation, ...]) -> None:
    """Declaration mistakes fail at import, with the entry's name."""
    seen: set[str] = set()
    flags: dict[str, str] = {}
    for a in ablations:
        where = f"Ablation {a.name!r}"
        if a.name in seen:
            raise ValueError(f"{where} is declared twice.")
        seen.add(a.name)
        if a.field not in _DEFAULTS:
            raise ValueError(f"{where}: ModelConfig has no field {a.field!r}.")
        if flags.setdefault(a.flag, a.field) != a.field:
            raise ValueError(f"{where}: flag {a.flag} already sets {flags[a.flag]!r}.")
        if a.export_as and a.export_refusal:
            raise ValueError(f"{where}: give export_as or export_refusal, not both.")
        if not a.parametric and a.value == a.baseline:
            raise ValueError(f"{where}: value {a.value!r} is already the baseline.")


REGISTRY = Registry(
    [
        Ablation(
            "no-layernorm",
            field="use_layernorm",
            value=False,
            title="No LayerNorm",
            removes="Every LayerNorm becomes the identity: nothing keeps activations in range; "
            "expect slower or unstable training.",
            flag="--no-layernorm",
            export_refusal="GPT-2 always has LayerNorm layers; this run has no LayerNorm",
        ),
        Ablation(
            "no-residual",
            field="use_residual",
            value=False,
            title="No residual connections",
            removes="No skip paths around attention and MLP: each block computes x = f(x) and must carry "
            "everything forward; deep models stall.",
            flag="--no-residual",
            export_refusal="GPT-2 always adds residual connections; this run has no residual connections",
        ),
        Ablation(
            "no-mlp",
            field="use_mlp",
            value=False,
            title="No MLP",
            removes="No feed-forward network in the blocks: attention alone, so nothing transforms each "
            "token's vector on its own.",
            flag="--no-mlp",
            export_refusal="GPT-2 always has an MLP in each block; this run has none",
        ),
        Ablation(
            "pos-sinusoidal",
            field="pos_encoding",
            value="sinusoidal",
            title="Sinusoidal positions",
            removes="Fixed sine/cosine position waves (original Transformer) instead of learned ones: "
            "nothing to learn.",
            flag="--pos-encoding",
            export_as="the fixed sinusoidal table is written into `wpe` (it becomes trainable if you fine-tune)",
        ),
        Ablation(
            "pos-none",
            field="pos_encoding",
            value="none",
            title="No positions",
            removes="No position information at all: only the causal mask tells tokens apart by order.",
            flag="--pos-encoding",
            export_as="`wpe` is all zeros (it becomes trainable if you fine-tune)",
        ),
        Ablation(
            "post-norm",
            field="norm_position",
            value="post",
            title="Post-norm (original Transformer)",
            removes="LayerNorm after adding each branch (original Transformer) instead of before it; "
            "less stable without warm-up.",
            flag="--norm-position",
            export_refusal="GPT-2 applies LayerNorm before each sub-layer; this run uses post-norm",
        ),
        Ablation(
            "swap-qk",
            field="swap_qk",
            value=True,
            title="Swap Q and K",
            removes="Queries use the key projection and keys the query projection.",
            flag="--swap-qk",
            export_as="the query and key blocks of each `c_attn` weight and bias are swapped",
        ),
        Ablation(
            "window-{n}",
            field="attn_window",
            value=8,
            title="Local attention window",
            removes="Local attention: each token sees at most {n} tokens (itself included); "
            "longer-range patterns cannot be learned.",
            flag="--attn-window",
            export_refusal="GPT-2 lets every token attend to all earlier tokens; "
            "this run uses an attention window of {n} tokens",
        ),
        Ablation(
            "relu",
            field="activation",
            value="relu",
            title="ReLU instead of GELU",
            removes="The MLP uses the older, sharper ReLU non-linearity instead of GELU.",
            flag="--activation",
            export_as="`activation_function: relu`",
        ),
        Ablation(
            "untied",
            field="tie_weights",
            value=False,
            title="Untied embeddings",
            removes="The output head gets its own matrix instead of sharing the token embeddings: more parameters.",
            flag="--untie-weights",
            export_as="`tie_word_embeddings: false` with its own `lm_head.weight`",
        ),
        Ablation(
            "no-bias",
            field="bias",
            value=False,
            title="No biases",
            removes="No bias terms in any Linear or LayerNorm layer (as in many modern LLMs).",
            flag="--no-bias",
            export_as="all biases (Linear and LayerNorm) are zeros",
        ),
        Ablation(
            "qk-norm",
            field="qk_norm",
            value=True,
            title="QK-norm",
            removes="RMSNorm on each head's queries and keys before their dot product (as in fast modern "
            "GPT recipes): attention logits stay bounded, so higher learning rates stay stable.",
            flag="--qk-norm",
            export_refusal="GPT-2 does not normalise queries and keys; this run uses QK-norm",
        ),
        Ablation(
            "one-head",
            field="n_head",
            value=1,
            title="One attention head",
            removes="A single attention head of full width (n_head = 1).",
            flag="--n-head",
            flag_help="attention heads per block (must divide --n-embd); 1 is the one-head ablation",
            labelled=False,  # a size rather than a departure from GPT-2: runs never carried this label
            toggle=False,  # the Train page's Heads input sets n_head
        ),
        Ablation(
            "bigram",
            field="n_layer",
            value=0,
            title="Bigram model",
            removes="No transformer blocks and no positions: the token embedding goes straight to the output "
            "head, so each prediction sees only the current token.",
            flag="--n-layer",
            flag_help="transformer blocks; 0 is the bigram model (token embedding → output head)",
            export_refusal="GPT-2 always has position embeddings and a final LayerNorm; "
            "this run is a bigram model (n_layer 0) with neither",
            toggle=False,  # the Train page's Layers input sets n_layer
        ),
    ]
)
