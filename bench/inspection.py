"""Bench 5: the Attention page's work: every layer's and head's attention for a 64-token prompt, and head statistics.

Times ``inspection.attention_maps`` (the explicit attention path of the model) and
``inspection.head_stats`` on the ``baby`` model sizes, separately and together, plus the plotly
grid figure the page draws from them (``viz``), median of interleaved runs.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import Report, corpus_source, interleaved, median
from tinygpt_core import inspection, viz
from tinygpt_core.config import get_preset
from tinygpt_core.data import load_corpus
from tinygpt_core.model import GPT
from tinygpt_core.tokenizers import train_tokenizer

PROMPT_TOKENS = 64
TARGET_MS = 250.0


def run(quick: bool = False, results=None) -> dict:
    text = load_corpus(corpus_source()).text
    tok = train_tokenizer("char", text)
    prompt = text[1000 : 1000 + PROMPT_TOKENS]
    torch.manual_seed(0)
    model = GPT(get_preset("baby").model_config(vocab_size=tok.vocab_size)).eval()
    maps = inspection.attention_maps(model, tok, prompt)
    assert maps.weights.shape[-1] == PROMPT_TOKENS

    def both():
        m = inspection.attention_maps(model, tok, prompt)
        inspection.head_stats(m)

    fns = {
        "attention_maps (all layers and heads)": lambda: inspection.attention_maps(model, tok, prompt),
        "head_stats": lambda: inspection.head_stats(maps),
        "both (the computation the target counts)": both,
    }
    fns["viz.attention_grid_figure (the page's plotly grid, one layer)"] = lambda: viz.attention_grid_figure(maps, 0)
    fns["viz.head_stats_figure (one statistic)"] = lambda: viz.head_stats_figure(inspection.head_stats(maps), "entropy")
    rounds = 3 if quick else 15
    times = interleaved(fns, rounds=rounds, warmup=1)
    ms = {k: median(v) * 1e3 for k, v in times.items()}
    total = ms["both (the computation the target counts)"]
    report = Report(f"5. Inspection: attention grid and head statistics, {PROMPT_TOKENS}-token prompt", quick=quick)
    report.add(
        f"`baby` model sizes ({model.config.n_layer} layers × {model.config.n_head} heads), "
        f"median of {rounds} interleaved runs."
    )
    report.add_table(["computation", "ms"], [[k, f"{v:.1f}"] for k, v in ms.items()])
    report.add(f"Attention grid + head statistics: {total:.1f} ms (target < {TARGET_MS:.0f} ms).")
    report.emit(results)
    return dict(ms=ms, total_ms=total)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds: checks the script")
    args = ap.parse_args(argv)
    run(args.quick)


if __name__ == "__main__":
    main()
