"""Where a training step's time goes: torch.profiler tables of our ``baby`` step in fp32 and the default mode.

The evidence behind RESULTS.md's explanations (which operators a missed target is spent in), so
a gap is explained by a measurement rather than a guess.
"""

from __future__ import annotations

import argparse

from torch.profiler import ProfilerActivity, profile

from bench.common import Report
from bench.steps import our_step
from bench.throughput import load_ids
from tinygpt_core.config import get_preset

ROWS = 14


def profile_table(
    preset: str = "baby",
    precision: str = "auto",
    steps: int = 20,
    optimizer: str | None = None,
    batch_size: int | None = None,
) -> tuple[str, str, float]:
    """(resolved precision, profiler table, ms per step under the profiler)."""
    ids, vocab = load_ids()
    p = get_preset(preset)
    overrides = {k: v for k, v in dict(optimizer=optimizer, batch_size=batch_size).items() if v is not None}
    stepper = our_step(
        p.model_config(vocab_size=vocab), p.train_config(device="cpu", **overrides), ids, precision=precision
    )
    for _ in range(3):
        stepper.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            stepper.step()
    avg = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in avg)
    return stepper.precision, avg.table(sort_by="self_cpu_time_total", row_limit=ROWS), total_us / steps / 1e3


def decode_profile(new_tokens: int = 256) -> tuple[str, float]:
    """Profiler table of greedy KV-cache decoding on the baby sizes (the generation bench's first row)."""
    import torch

    from tinygpt_core.model import GPT
    from tinygpt_core.sampling import SamplingSettings, generate_ids

    torch.manual_seed(0)
    model = GPT(get_preset("baby").model_config(vocab_size=65, block_size=16 + new_tokens)).eval()
    ids = torch.randint(0, 65, (1, 16))
    greedy = SamplingSettings(strategy="greedy", max_new_tokens=new_tokens)
    generate_ids(model, ids, new_tokens, greedy)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate_ids(model, ids, new_tokens, greedy)
    avg = prof.key_averages()
    ms = sum(e.self_cpu_time_total for e in avg) / new_tokens / 1e3
    return avg.table(sort_by="self_cpu_time_total", row_limit=ROWS), ms


def run(quick: bool = False, results=None) -> dict:
    steps = 3 if quick else 20
    report = Report("Profile: where a training step's time goes (torch.profiler, self CPU time)", quick=quick)
    out = {}
    for label, kw in [
        ("baby fp32 AdamW", dict(preset="baby", precision="fp32")),
        ("baby auto AdamW", dict(preset="baby", precision="auto")),
        ("baby-fast auto Muon", dict(preset="baby-fast", precision="auto")),
    ]:
        precision, text, ms = profile_table(steps=steps, **kw)
        report.add(
            f"**{label}** (resolved precision {precision}; {steps} steps, {ms:.1f} ms/step under the "
            "profiler)\n\n```\n" + text.strip() + "\n```"
        )
        out[label] = ms
    text, ms = decode_profile(new_tokens=32 if quick else 256)
    report.add(
        f"**Generation, baby sizes, KV cache, one token at a time** ({ms:.2f} ms per token under the "
        "profiler)\n\n```\n" + text.strip() + "\n```"
    )
    out["decode"] = ms
    report.emit(results)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    run(args.quick)


if __name__ == "__main__":
    main()
