"""The chat recipe, measured: a base run, then a chat fine-tune on builtin:chat (README "Chat").

Runs exactly the documented commands' core calls (``train`` of the base preset, then
``finetune``), timing each by wall clock, and reports the held-out exact-match accuracy of the
base model before fine-tuning and of the fine-tuned run after each evaluation, with the 1-minute
load next to the times (the machine may be shared), and the CPU time of the process: with one
torch thread, what the recipe takes on a core of its own however busy the others are.
``python -m bench.chat`` (``TINYGPT_NUM_THREADS`` sets the threads), or ``python -m bench --only chat``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Report, load_average
from tinygpt_core.finetune import evaluate_run, finetune_spec
from tinygpt_core.runs import read_metrics
from tinygpt_core.spec import TrainSpec, prepare
from tinygpt_core.training import train

# The recipe in the README: keep the two in step. The base states its learning rate and warm-up: a base
# trained at baby-fast's own (lr 1.4e-2, chosen for Tiny Shakespeare) fine-tunes to 79% held-out exact
# match against 98% from lr 5e-3 (2026-12-02, measured side by side, bench/RESULTS.md).
BASE = dict(preset="baby-fast", corpus="builtin:pystdlib", max_iters=200, lr=5e-3, warmup_iters=50)
FINETUNE = dict(max_iters=600)
QUICK = dict(base_iters=10, ft_iters=10, ft_eval_interval=5)  # a smoke run: the scripts work, no figure


def recipe(
    *,
    base_preset: str = BASE["preset"],
    base_corpus: str = BASE["corpus"],
    base_iters: int = BASE["max_iters"],
    base_lr: float = BASE["lr"],
    base_warmup: int = BASE["warmup_iters"],
    ft_iters: int = FINETUNE["max_iters"],
    ft_lr: float | None = None,
    ft_eval_interval: int | None = None,
    keep: Path | None = None,
    quick: bool = False,
) -> Report:
    """Train the base run, score it, fine-tune it on builtin:chat and score each evaluation."""
    report = Report("Chat recipe: base run, then a chat fine-tune on builtin:chat", quick=quick)
    root = keep or Path(tempfile.mkdtemp(prefix="chat-bench-"))
    try:
        loads = [load_average()]
        c0 = time.process_time()  # CPU seconds of this process: what the recipe costs a core of its own
        t0 = time.perf_counter()
        spec = TrainSpec.from_preset(
            base_preset, base_corpus, max_iters=base_iters, lr=base_lr, warmup_iters=min(base_warmup, base_iters)
        )
        base = train(prepare(spec), root / "base")
        t_base, cpu_base = time.perf_counter() - t0, time.process_time() - c0
        loads.append(load_average())
        acc_base = evaluate_run(root / "base")
        t1, c1 = time.perf_counter(), time.process_time()
        fs = finetune_spec(root / "base", "builtin:chat", max_iters=ft_iters, lr=ft_lr, eval_interval=ft_eval_interval)
        ft = train(prepare(fs), root / "chat")
        t_ft, cpu_ft = time.perf_counter() - t1, time.process_time() - c1
        loads.append(load_average())
        m = read_metrics(root / "chat").dropna(subset=["chat_accuracy"])
        curve = ", ".join(f"{int(s)}: {a:.0%}" for s, a in zip(m["step"], m["chat_accuracy"], strict=True))
        final = float(m["chat_accuracy"].iloc[-1])
        report.add_table(
            ["stage", "command", "wall time", "CPU time", "held-out exact match"],
            [
                [
                    "base",
                    f"`train --corpus {base_corpus} --preset {base_preset} --max-iters {base_iters} "
                    f"--lr {base_lr:g} --warmup-iters {base_warmup}`",
                    f"{t_base:.0f} s ({base.status})",
                    f"{cpu_base:.0f} s",
                    f"{acc_base:.1%} (before fine-tuning)",
                ],
                [
                    "fine-tune",
                    f"`finetune BASE --chat builtin:chat --max-iters {ft_iters}`",
                    f"{t_ft:.0f} s ({ft.status})",
                    f"{cpu_ft:.0f} s",
                    f"{final:.1%}",
                ],
                ["total", "", f"{t_base + t_ft:.0f} s", f"{cpu_base + cpu_ft:.0f} s", ""],
            ],
        )
        report.add(f"Accuracy at each evaluation (step: accuracy): {curve}.")
        report.add(
            f"{torch.get_num_threads()} torch thread(s); 1-min load "
            + ", ".join("–" if x is None else f"{x:.1f}" for x in loads)
            + " (start, after base, end). CPU time is this process's: on a shared machine, closer than the "
            "wall clock to what the recipe takes on a free one."
        )
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return report


def run(quick: bool = False, results: Path | None = None) -> None:
    """The suite's entry (``python -m bench --only chat``): the README's recipe, or a smoke run of it."""
    from tinygpt_core.device import configure_threads

    configure_threads()
    recipe(**(QUICK if quick else {}), quick=quick).emit(results)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-preset", default=BASE["preset"])
    ap.add_argument("--base-corpus", default=BASE["corpus"])
    ap.add_argument("--base-iters", type=int, default=BASE["max_iters"])
    ap.add_argument("--base-lr", type=float, default=BASE["lr"])
    ap.add_argument("--base-warmup", type=int, default=BASE["warmup_iters"])
    ap.add_argument("--ft-iters", type=int, default=FINETUNE["max_iters"])
    ap.add_argument("--ft-lr", type=float, default=None)
    ap.add_argument("--ft-eval-interval", type=int, default=None)
    ap.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    ap.add_argument("--keep", type=Path, default=None, help="keep the two runs in this folder")
    ap.add_argument("--results", type=Path, help="append the table here instead of bench/RESULTS.md")
    args = ap.parse_args(argv)
    from tinygpt_core.device import configure_threads

    configure_threads()
    report = recipe(
        base_preset=args.base_preset,
        base_corpus=args.base_corpus,
        base_iters=args.base_iters,
        base_lr=args.base_lr,
        base_warmup=args.base_warmup,
        ft_iters=args.ft_iters,
        ft_lr=args.ft_lr,
        ft_eval_interval=args.ft_eval_interval,
        keep=args.keep,
    )
    if args.no_write:
        print(report.text())
    else:
        report.emit(args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
