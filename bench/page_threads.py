"""Bench 3b: decoding on a page run's thread, with the server's torch threads at 2 and at 1.

Streamlit runs every page run on a thread of its own, and with OpenMP each thread that runs a
parallel torch op gets its own team of workers. This times what the Sampling page does in a page
run, greedy decoding of 80 tokens after a 16-token prompt at ``baby`` sizes, on a fresh thread:
alone, and while another page run's thread that has computed something is still alive (another
visitor's page, still rendering). Median of interleaved rounds, for each torch thread count. The
app's server default (``device.SERVER_THREADS``) rests on this table.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from bench.common import Report, median, quick_main
from tinygpt_core.config import get_preset
from tinygpt_core.model import GPT
from tinygpt_core.sampling import SamplingSettings, generate_ids

PROMPT_TOKENS, NEW_TOKENS = 16, 80
THREAD_COUNTS = (2, 1)  # the server's default before and after this bench


def _on_new_thread(fn: Callable[[], float]) -> float:
    out: list[float] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def _timed_decode(model: GPT, ids: torch.Tensor, n: int) -> Callable[[], float]:
    settings = SamplingSettings(strategy="greedy", max_new_tokens=n)

    def decode() -> float:
        t0 = time.perf_counter()
        generate_ids(model, ids, n, settings)
        return time.perf_counter() - t0

    return decode


def _beside_a_live_page_run(fn: Callable[[], float]) -> float:
    """``fn`` on a fresh thread while another thread, which has run a torch op, waits (alive)."""
    ready, release = threading.Event(), threading.Event()

    def other_page_run() -> None:
        torch.layer_norm(torch.randn(64, 128), (128,))  # its OpenMP team now exists
        ready.set()
        release.wait()

    other = threading.Thread(target=other_page_run)
    other.start()
    ready.wait()
    try:
        return _on_new_thread(fn)
    finally:
        release.set()
        other.join()


def run(quick: bool = False, results=None) -> dict:
    torch.manual_seed(0)
    model = GPT(get_preset("baby").model_config(vocab_size=65)).eval()
    ids = torch.randint(0, 65, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    n = 16 if quick else NEW_TOKENS
    rounds = 2 if quick else 9
    decode = _timed_decode(model, ids, n)
    before = torch.get_num_threads()
    times: dict[tuple[int, str], list[float]] = {}
    try:
        for _ in range(rounds):  # in turns, so a busy moment lands on every row
            for threads in THREAD_COUNTS:
                torch.set_num_threads(threads)
                _on_new_thread(decode)  # warm-up: the step's weight copies, first-call costs
                times.setdefault((threads, "alone"), []).append(_on_new_thread(decode))
                times.setdefault((threads, "beside"), []).append(_beside_a_live_page_run(decode))
    finally:
        torch.set_num_threads(before)
    ms = {k: 1e3 * median(v) for k, v in times.items()}
    rows = [
        [
            str(t),
            f"{ms[(t, 'alone')]:.1f}",
            f"{ms[(t, 'beside')]:.1f}",
            f"{ms[(t, 'beside')] / ms[(t, 'alone')]:.2f}×",
        ]
        for t in THREAD_COUNTS
    ]
    report = Report("3b. Decoding on a page run's thread: the server's torch threads", quick=quick)
    report.add(
        f"`baby` sizes, greedy, {PROMPT_TOKENS} + {n} tokens, each call on a fresh thread (as a page run is); "
        f'median of {rounds} interleaved rounds. "Beside": another thread that has run a torch op is alive.'
    )
    report.add_table(["torch threads", "alone, ms", "beside a live page run, ms", "beside / alone"], rows)
    two, one = ms[(2, "beside")], ms[(1, "beside")]
    alone_two, alone_one = ms[(2, "alone")], ms[(1, "alone")]
    report.add(
        f"Beside another page run, one thread decodes in {one:.1f} ms against {two:.1f} ms on two "
        f"({two / one:.2f}×); alone, two threads take {alone_two:.1f} ms and one {alone_one:.1f} ms."
    )
    report.emit(results)
    return {"ms": {f"{t} threads, {k}": v for (t, k), v in ms.items()}}


def main(argv: list[str] | None = None) -> None:
    quick_main(run, __doc__, "2 rounds of 16 tokens: checks the script", argv)


if __name__ == "__main__":
    main()
