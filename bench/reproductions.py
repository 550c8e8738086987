"""The seed projects' results, measured here: the overfit demo, the bigram-to-transformer ladder, GPTiny's
val loss on Tiny Shakespeare and Mini-GPT's per-epoch table (issue 17; docs/REPRODUCTIONS.md quotes them).

``python -m bench.reproductions [--only overfit,ladder,gptiny,minigpt] [--steps N] [--threads N]``

Every run is an ordinary lab run (``training.train``) in a temporary folder; a shortened run says so in
its table. Each part appends its own section to bench/RESULTS.md, with the machine, date and load.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from bench.common import Report, corpus_source, fmt, load_average, median
from bench.convergence import whole_split_loss
from tinygpt_core.ablations import metrics_summary
from tinygpt_core.data import load_corpus
from tinygpt_core.ladder import ladder_specs, ladder_table
from tinygpt_core.runs import load_run, read_metrics
from tinygpt_core.spec import prepare
from tinygpt_core.training import TrainSpec, train

PARTS = ("overfit", "ladder", "gptiny", "minigpt")


def _train(spec: TrainSpec, root: Path, name: str) -> tuple[pd.DataFrame, float, str]:
    t0 = time.perf_counter()
    result = train(spec, root / name)
    return read_metrics(root / name), time.perf_counter() - t0, result.status


def _cpu_s() -> float:
    """CPU seconds used by this process so far: on a busy shared machine, closer than the wall clock to
    what the same run takes on an idle one (at one thread; cache contention still inflates it a little)."""
    return time.process_time()


def overfit(root: Path, steps: int | None = None) -> Report:
    report = Report("Reproductions: the overfit demo (`overfit` preset, word-level builtin:tiny)")
    spec = TrainSpec.from_preset("overfit", "builtin:tiny", device="cpu", **({"max_iters": steps} if steps else {}))
    load, cpu0 = load_average(), _cpu_s()
    m, wall, status = _train(spec, root, "overfit")
    cpu = _cpu_s() - cpu0
    s = metrics_summary(m)
    rise = s["final_val_loss"] - s["best_val_loss"]
    first = m.dropna(subset=["val_loss"]).iloc[0]
    report.add_table(
        ["steps", "wall s", "CPU s", "threads", "first eval train / val", "final train", "min val (step)", "final val"]
        + ["val rise", "load"],
        [
            [
                s["steps"],
                fmt(wall),
                fmt(cpu),
                torch.get_num_threads(),
                f"{first['train_loss']:.2f} / {first['val_loss']:.2f}",
                fmt(s["final_train_loss"], 3),
                f"{s['best_val_loss']:.3f} ({s['best_step']})",
                fmt(s["final_val_loss"], 3),
                f"{rise:+.2f}",
                fmt(load, 1),
            ]
        ],
    )
    report.add(f"Status {status}; wall time includes evaluations and checkpoints.")
    return report


def ladder(root: Path, steps: int, seeds: int = 1) -> Report:
    """Every rung trained once per seed (same data order within a seed), scored on the whole validation
    split from its final weights; the table gives the median over seeds and the gain of the medians."""
    report = Report(
        f"Reproductions: the ladder at `baby` size, {steps} steps a rung, {seeds} seed(s) (Tiny Shakespeare, char)"
    )
    base = TrainSpec.from_preset(
        "baby", corpus_source(), device="cpu", max_iters=steps, eval_interval=steps, sample_tokens=0
    )
    val_ids = prepare(base).val_ids
    load = load_average()
    whole: dict[str, list[float]] = {}
    estimate: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for k in range(seeds):
        seeded = dataclasses.replace(base, train=dataclasses.replace(base.train, seed=base.train.seed + k))
        for spec in ladder_specs(seeded, grid_id=f"bench{k}"):
            name = spec.name.replace("/", "_")
            m, _, _ = _train(spec, root, name)
            rung = spec.name.rsplit("/", 1)[-1]
            run = load_run(root / name, checkpoint="last")
            whole.setdefault(rung, []).append(whole_split_loss(run.model, val_ids, run.config.model.block_size))
            estimate.setdefault(rung, []).append(metrics_summary(m)["final_val_loss"])
    rows = [{"name": f"grid-bench/{r}", "status": "done", "final_val_loss": median(v)} for r, v in whole.items()]
    table = ladder_table(rows)
    report.add_table(
        ["rung", "adds", "whole-split val loss (median)", "seeds", "gain"],
        [
            [
                r.rung,
                r.adds,
                fmt(r.val_loss, 3),
                " / ".join(f"{x:.3f}" for x in whole[r.rung]),
                "–" if math.isnan(r.gain) else f"{r.gain:+.3f}",
            ]
            for r in table.itertuples()
        ],
    )
    shortened = f"{steps} steps instead of 2000" if steps != 2000 else "baby's 2000 steps"
    report.add(
        f"baby preset (4 layers, 4 heads, 128 dims, context 64, batch 12), untied head, dropout 0.2 on the top "
        f"rung; {shortened}; seeds {base.train.seed}..{base.train.seed + seeds - 1}, each rung of a seed with "
        f"the same seed and data order. Val loss: every token of the validation split ({len(val_ids):,} tokens, "
        f"windows of 64) from the rung's final weights; the gain is between medians (> 0: the rung helps). The "
        f"runs' own end-of-run estimates ({base.train.eval_iters} batches) agree to within "
        f"{max(abs(median(estimate[r]) - median(whole[r])) for r in whole):.3f}. "
        f"{fmt(time.perf_counter() - t0)} s in all; 1-min load {fmt(load, 1)} at the start."
    )
    return report


def gptiny(root: Path, steps: int, batch: int, block_size: int | None = None) -> Report:
    report = Report(f"Reproductions: GPTiny on Tiny Shakespeare at reduced steps ({steps} steps, batch {batch})")
    spec = TrainSpec.from_preset(
        "gptiny",
        corpus_source(),
        device="cpu",
        max_iters=steps,
        batch_size=batch,
        warmup_iters=min(100, steps // 6),  # the preset's 100-step warm-up would fill a shortened run
        eval_interval=max(1, steps // 2),
        eval_iters=10,  # 10 batches a split: on a CPU budget the preset's 100 would cost more than the steps
        sample_tokens=0,
        **({"block_size": block_size} if block_size else {}),  # --quick, on a corpus shorter than 256 tokens
    )
    load = load_average()
    m, wall, status = _train(spec, root, "gptiny")
    evals = m.dropna(subset=["val_loss"])
    report.add_table(
        ["step", "train loss", "val loss"],
        [[int(r.step), fmt(r.train_loss, 3), fmt(r.val_loss, 3)] for r in evals.itertuples()],
    )
    report.add(
        f"gptiny preset (3 layers, 4 heads, 384 dims, context {spec.model.block_size}, dropout 0.2, lr 3e-4) "
        f"with batch {batch} "
        f"instead of 64, {steps} steps instead of 5000 and a {spec.train.warmup_iters}-step warm-up, on a CPU: "
        f"{fmt(wall)} s, status {status}, "
        f"1-min load {fmt(load, 1)}."
    )
    return report


def minigpt(root: Path, epochs: int, chars: int | None, block_size: int | None = None) -> Report:
    source = corpus_source()
    what = "Tiny Shakespeare" if "shakespeare" in source.lower() else source
    if chars:  # a CPU budget: the first `chars` characters, written beside the temporary runs (never kept)
        text = load_corpus(source).text[:chars]
        source = str(root / "minigpt-corpus.txt")
        Path(source).write_text(text, encoding="utf-8")
        what = f"the first {len(text):,} characters of {what}"
    # On a slice, 10 eval batches already cover the held-out tenth several times over (the preset's 50 would
    # cost as much as the training steps).
    spec = TrainSpec.from_preset(
        "mini-gpt",
        source,
        device="cpu",
        sample_tokens=0,
        **({"eval_iters": 10} if chars else {}),
        **({"block_size": block_size} if block_size else {}),  # --quick, on a corpus shorter than 512 tokens
    )
    prepared = prepare(spec)
    tokens_per_step = spec.train.batch_size * spec.model.block_size
    per_epoch = max(1, math.ceil(len(prepared.train_ids) / tokens_per_step))  # steps that see the split once
    spec.train.max_iters, spec.train.eval_interval = per_epoch * epochs, per_epoch
    spec.train.warmup_iters = min(spec.train.warmup_iters, spec.train.max_iters // 6)  # see gptiny
    report = Report(f"Reproductions: Mini-GPT, per-epoch loss and perplexity ({epochs} epochs, {what})")
    load = load_average()
    m, wall, status = _train(prepare(spec), root, "minigpt")
    evals = m.dropna(subset=["val_loss"])
    report.add_table(
        ["epoch", "train loss", "train ppl", "val loss", "val ppl"],
        [
            [
                k + 1,
                fmt(r.train_loss, 4),
                fmt(math.exp(r.train_loss), 2),
                fmt(r.val_loss, 4),
                fmt(math.exp(r.val_loss), 2),
            ]
            for k, r in enumerate(evals.itertuples())
        ],
    )
    report.add(
        f"mini-gpt preset (2 layers, 4 heads, 128 dims, FFN 512, context {spec.model.block_size}, dropout 0.1), "
        f"char-level; an epoch is "
        f"{per_epoch} steps of {tokens_per_step:,} tokens (one pass over the {len(prepared.train_ids):,} training "
        f"tokens, windows drawn at random); losses are estimates over {spec.train.eval_iters} batches. "
        f"{fmt(wall)} s, status {status}, 1-min load {fmt(load, 1)}."
    )
    return report


def _ppl(loss: float) -> float:
    return math.exp(loss)  # perplexity: e to the mean cross-entropy in nats


# The sizes each part runs at (main()'s defaults), and the smoke sizes of ``--quick``: a few steps each,
# with contexts short enough for the built-in corpus the test suite uses.
SIZES = dict(
    overfit_steps=None, ladder_steps=2000, ladder_seeds=3, gptiny_steps=200, gptiny_batch=16, epochs=2,
    minigpt_chars=None, block_size=None,
)  # fmt: skip
QUICK = dict(
    overfit_steps=20, ladder_steps=3, ladder_seeds=1, gptiny_steps=2, gptiny_batch=2, epochs=1,
    minigpt_chars=None, block_size=32,
)  # fmt: skip


def measure(parts: list[str], sizes: dict, quick: bool = False, results: Path | None = None) -> None:
    """Run ``parts`` at ``sizes`` (keys of SIZES) in a temporary folder, emitting one section each."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    z = sizes
    with tempfile.TemporaryDirectory(prefix="tinygpt-repro-") as tmp:
        root = Path(tmp)
        for part in parts:
            if part == "overfit":
                report = overfit(root, z["overfit_steps"])
            elif part == "ladder":
                report = ladder(root, z["ladder_steps"], z["ladder_seeds"])
            elif part == "gptiny":
                report = gptiny(root, z["gptiny_steps"], z["gptiny_batch"], z["block_size"])
            else:
                report = minigpt(root, z["epochs"], z["minigpt_chars"], z["block_size"])
            report.quick = quick
            report.emit(results)


def run(quick: bool = False, results: Path | None = None) -> None:
    """The suite's entry (``python -m bench --only reproductions``): every part at SIZES, or (``--quick``)
    at QUICK, which only shows that the scripts work."""
    measure(list(PARTS), QUICK if quick else SIZES, quick, results)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of: {', '.join(PARTS)}")
    ap.add_argument("--ladder-steps", type=int, default=SIZES["ladder_steps"], help="steps per ladder rung")
    ap.add_argument("--ladder-seeds", type=int, default=SIZES["ladder_seeds"], help="seeds (median and each)")
    ap.add_argument("--gptiny-steps", type=int, default=SIZES["gptiny_steps"])
    ap.add_argument("--gptiny-batch", type=int, default=SIZES["gptiny_batch"])
    ap.add_argument("--epochs", type=int, default=SIZES["epochs"], help="Mini-GPT epochs")
    ap.add_argument("--minigpt-chars", type=int, help="train Mini-GPT on only the corpus's first N characters")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {**SIZES, **{k: getattr(args, k) for k in SIZES if hasattr(args, k)}}
    measure([p.strip() for p in args.only.split(",") if p.strip()], sizes)


if __name__ == "__main__":
    main()
