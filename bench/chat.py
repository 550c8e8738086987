"""The chat recipe, measured: a base run, then a chat fine-tune on builtin:chat (README "Chat").

Runs exactly the documented commands' core calls (``train`` of the base preset, then
``finetune``), timing each by wall clock, and reports the held-out exact-match accuracy of the
base model before fine-tuning and of the fine-tuned run after each evaluation, with the 1-minute
load next to the times (the machine may be shared), and the CPU time of the process: with one
torch thread, what the recipe takes on a core of its own however busy the others are.
``python -m bench.chat`` (``TINYGPT_NUM_THREADS`` sets the threads).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tinygpt_core.finetune import evaluate_run, finetune_spec
from tinygpt_core.runs import read_metrics
from tinygpt_core.spec import TrainSpec, prepare
from tinygpt_core.training import train

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
# The recipe in the README: keep the two in step.
BASE = dict(preset="baby-fast", corpus="builtin:pystdlib", max_iters=200)
FINETUNE = dict(max_iters=600)


def load() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base-preset", default=BASE["preset"])
    ap.add_argument("--base-corpus", default=BASE["corpus"])
    ap.add_argument("--base-iters", type=int, default=BASE["max_iters"])
    ap.add_argument("--ft-iters", type=int, default=FINETUNE["max_iters"])
    ap.add_argument("--ft-lr", type=float, default=None)
    ap.add_argument("--ft-eval-interval", type=int, default=None)
    ap.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    ap.add_argument("--keep", type=Path, default=None, help="keep the two runs in this folder")
    args = ap.parse_args(argv)
    from tinygpt_core.device import configure_threads

    configure_threads()
    root = args.keep or Path(tempfile.mkdtemp(prefix="chat-bench-"))
    try:
        loads = [load()]
        c0 = time.process_time()  # CPU seconds of this process: what the recipe costs a core of its own
        t0 = time.perf_counter()
        spec = TrainSpec.from_preset(args.base_preset, args.base_corpus, max_iters=args.base_iters)
        base = train(prepare(spec), root / "base")
        t_base = time.perf_counter() - t0
        cpu_base = time.process_time() - c0
        loads.append(load())
        acc_base = evaluate_run(root / "base")
        t1, c1 = time.perf_counter(), time.process_time()
        fs = finetune_spec(
            root / "base", "builtin:chat", max_iters=args.ft_iters, lr=args.ft_lr, eval_interval=args.ft_eval_interval
        )
        ft = train(prepare(fs), root / "chat")
        t_ft, cpu_ft = time.perf_counter() - t1, time.process_time() - c1
        loads.append(load())
        m = read_metrics(root / "chat").dropna(subset=["chat_accuracy"])
        curve = ", ".join(f"{int(s)}: {a:.0%}" for s, a in zip(m["step"], m["chat_accuracy"]))
        final = float(m["chat_accuracy"].iloc[-1])
        lines = [
            f"### Chat recipe — {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC, "
            f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s), "
            f"1-min load {', '.join(f'{x:.1f}' for x in loads)} (start, after base, end)",
            "",
            "| stage | command | wall time | CPU time | held-out exact match |",
            "|---|---|---|---|---|",
            f"| base | `train --corpus {args.base_corpus} --preset {args.base_preset} --max-iters {args.base_iters}` "
            f"| {t_base:.0f} s ({base.status}) | {cpu_base:.0f} s | {acc_base:.1%} (before fine-tuning) |",
            f"| fine-tune | `finetune BASE --chat builtin:chat --max-iters {args.ft_iters}` "
            f"| {t_ft:.0f} s ({ft.status}) | {cpu_ft:.0f} s | {final:.1%} |",
            f"| total | | {t_base + t_ft:.0f} s | {cpu_base + cpu_ft:.0f} s | |",
            "",
            f"Accuracy at each evaluation (step: accuracy): {curve}.",
            "",
        ]
        print("\n".join(lines))
        if not args.no_write:
            with open(RESULTS, "a", encoding="utf-8") as f:
                f.write("\n" + "\n".join(lines))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
