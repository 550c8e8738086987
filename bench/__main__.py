"""Run the whole benchmark suite: ``python -m bench`` (add ``--quick`` for a smoke run of a minute or two).

Each benchmark prints its table and appends it to bench/RESULTS.md (``--quick`` appends to
bench/out/RESULTS-quick.md instead: those figures only show that the scripts work). One failing
benchmark does not stop the others; the exit status says whether all of them ran.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback
from pathlib import Path

import torch

BENCHES = {  # name -> module, in the order
    "throughput": "bench.throughput",
    "convergence": "bench.convergence",
    "recipes": "bench.recipes",  # how baby-fast's recipe was chosen: variants on tuning seeds
    "grids": "bench.grids",  # an ablation grid one member after another vs side by side
    "generation": "bench.generation",
    "page_threads": "bench.page_threads",  # decoding on a page run's thread: the server's torch threads
    "live": "bench.live",
    "inspection": "bench.inspection",
    "app": "bench.app_startup",
    "ray": "bench.ray_runner",  # the Ray runner vs the local one (needs requirements-ray.txt)
    "profile": "bench.profile",  # evidence for RESULTS.md: where a step's time goes
    "watched": "bench.watched",  # training speed while browser tabs watch it (a real server and chromium)
    "dynamics": "bench.dynamics",  # the induction preset's phase change; scrubbing kept checkpoints
    "knockout": "bench.knockout",  # the Inspect page's head-knockout grid (issue 15), and its other views
    "health": "bench.health",  # network-health logging against training without it (issue 15)
    "chat": "bench.chat",  # the README's chat recipe: base run, fine-tune, held-out exact match (issue 16)
    "reproductions": "bench.reproductions",  # the seed projects' results (issue 17, docs/REPRODUCTIONS.md)
    "gpu": "bench.gpu",  # shakespeare-char to 1.47, step variants, tiny runs sharing one GPU ("not measured" without)
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny versions of every benchmark: checks the scripts")
    ap.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(BENCHES)}")
    ap.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--results", type=Path, metavar="FILE", help="append the tables here instead")
    ap.add_argument(
        "--nanogpt",
        type=Path,
        metavar="PATH",
        help="a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT): convergence runs its "
        "train.py side by side with ours; without it that comparison is skipped",
    )
    args = ap.parse_args(argv)
    names = list(BENCHES) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    failed = []
    for name in names:
        t0 = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        try:
            module = importlib.import_module(BENCHES[name])
            params = inspect.signature(module.run).parameters
            extra = {k: v for k, v in (("nanogpt", args.nanogpt), ("threads", args.threads)) if k in params}
            module.run(quick=args.quick, results=args.results, **extra)
        except Exception:  # noqa: BLE001 - report it and go on with the next benchmark
            traceback.print_exc()
            failed.append(name)
        finally:
            # A benchmark may change torch's threads for its own reasons (the Ray one fits a warm spare on
            # a small cluster); the next one starts from the suite's setting, as its header line says.
            torch.set_num_threads(threads)
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    if failed:
        print(f"\nFailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
