"""Bench 10: training dynamics: the `induction` preset's phase change, and scrubbing through kept steps.

1. Trains the ``induction`` preset on ``builtin:induction`` (the CLI's defaults: CPU, checkpoint
   history "log") and reports its wall time, the step where the best head's induction score jumps
   (``dynamics.induction_jump``: the middle of the rise), and the middles of the falls of the
   in-context-learning score and of the validation loss (``dynamics.halfway_step``): the three agree.
2. Scrubbing at ``baby`` size: a short run keeps steps 0, 1, 2, 4, 8; for each kept step, the
   Attention page's work when the slider moves there (the model at that step, every layer's and
   head's attention for a 64-token prompt, head statistics, induction scores, the grid figures),
   cold (weights read from disk) and warm (the model from ``dynamics.model_at``'s cache).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import plotly.io as pio
import torch

from bench.common import Report, load_average, median, quick_main
from tinygpt_core import dynamics, inspection, viz
from tinygpt_core.checkpoints import checkpoint_steps
from tinygpt_core.runs import load_run, read_metrics
from tinygpt_core.training import TrainSpec, train

SCRUB_TARGET_S = 1.0
PRESET_TARGET_S = 60.0


def _ms(times: list[float]) -> list[str]:
    return [f"{median(times) * 1e3:.0f}", f"{max(times) * 1e3:.0f}"]


def phase_change(quick: bool, workdir: Path) -> dict:
    overrides = dict(max_iters=60, eval_interval=20) if quick else {}
    spec = TrainSpec.from_preset("induction", "builtin:induction", device="cpu", **overrides)
    load_before = load_average()
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(spec, workdir / "induction")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    m = read_metrics(result.run_dir)
    ev = m.dropna(subset=["val_loss"])
    return dict(
        wall_s=wall,
        cpu_s=cpu,
        threads=torch.get_num_threads(),
        steps=result.steps,
        jump=dynamics.induction_jump(m),
        icl_fall=dynamics.halfway_step(m, "icl_score", rising=False),
        loss_fall=dynamics.halfway_step(m, "val_loss", rising=False),
        induction=(float(ev["induction_score"].iloc[0]), float(ev["induction_score"].max())),
        icl=(float(ev["icl_score"].iloc[0]), float(ev["icl_score"].min())),
        val=(float(ev["val_loss"].iloc[0]), float(ev["val_loss"].iloc[-1])),
        load=(load_before, load_average()),
    )


def scrub(quick: bool, workdir: Path) -> dict:
    spec = TrainSpec.from_preset(
        "baby", "builtin:tiny", max_iters=8, eval_interval=4, eval_iters=1, sample_tokens=0, device="cpu"
    )
    result = train(spec, workdir / "baby")
    run = load_run(result.run_dir)
    prompt = run.tokenizer.decode(
        run.tokenizer.encode("The keeper climbed the steps at dusk and lit the lamp. " * 2)[:64]
    )

    def core(step: int):
        model = dynamics.model_at(result.run_dir, step)
        maps = inspection.attention_maps(model, run.tokenizer, prompt)
        inspection.head_stats(maps)
        dynamics.best_induction_score(model, run.tokenizer)
        return maps

    def figures(maps) -> None:
        for layer in range(run.config.model.n_layer):
            fig = viz.attention_grid_figure(maps, layer)
            pio.to_json(fig.to_dict(), validate=False)  # what st.plotly_chart does with it before sending

    steps = checkpoint_steps(result.run_dir)
    cold, warm, figs = [], [], []
    for _ in range(1 if quick else 3):
        dynamics._MODELS.clear()  # cold: every step read from disk again
        for timings in (cold, warm):  # then warm: the same steps again, models from the cache
            for s in steps:
                t0 = time.perf_counter()
                maps = core(s)
                t1 = time.perf_counter()
                figures(maps)
                t2 = time.perf_counter()
                timings.append(t1 - t0)
                figs.append(t2 - t1)
    return dict(
        steps=steps, cold=cold, warm=warm, figures=figs, layers=run.config.model.n_layer, heads=run.config.model.n_head
    )


def run(quick: bool = False, results=None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        pc = phase_change(quick, Path(tmp))
        sc = scrub(quick, Path(tmp))
    report = Report("10. Training dynamics: the induction phase change, and scrubbing kept steps", quick=quick)
    report.add(
        f"`induction` preset on `builtin:induction`, CPU, {pc['threads']} torch thread(s): {pc['steps']} steps in "
        f"{pc['wall_s']:.1f} s wall, {pc['cpu_s']:.1f} s of CPU time (what it takes on idle cores; target < "
        f"{PRESET_TARGET_S:.0f} s on 2 cores; 1-min load {pc['load'][0]:.1f} before, {pc['load'][1]:.1f} after)."
    )
    report.add_table(
        ["what", "step", "from → to"],
        [
            [
                "best head's induction score jumps (middle of the rise)",
                pc["jump"],
                f"{pc['induction'][0]:.3f} → {pc['induction'][1]:.3f}",
            ],
            [
                "in-context-learning score falls (middle of the fall)",
                pc["icl_fall"],
                f"{pc['icl'][0]:+.3f} → {pc['icl'][1]:+.3f}",
            ],
            ["val loss falls (mid-fall)", pc["loss_fall"], f"{pc['val'][0]:.3f} → {pc['val'][1]:.3f}"],
        ],
    )
    report.add(
        f"Scrubbing at `baby` size ({sc['layers']} layers × {sc['heads']} heads, 64-token prompt): moving the slider "
        f"to a kept step ({', '.join(map(str, sc['steps']))}) = model at that step + attention maps + head "
        "statistics + induction scores + every layer's grid figure."
    )
    fig_ms = median(sc["figures"]) * 1e3
    report.add_table(
        ["scrub to a kept step", "median ms", "max ms"],
        [
            ["model + maps + statistics + induction, cold (weights read from disk)", *_ms(sc["cold"])],
            ["model + maps + statistics + induction, warm (model cached per step)", *_ms(sc["warm"])],
            [
                f"every layer's grid figure ({sc['layers']} × viz.attention_grid_figure + its JSON)",
                *_ms(sc["figures"]),
            ],
        ],
    )
    total = median(sc["cold"]) * 1e3 + fig_ms
    report.add(
        f"A scrub to a step not seen before: {total:.0f} ms (target under {SCRUB_TARGET_S * 1e3:.0f} ms), "
        f"of which {fig_ms:.0f} ms is building the plotly figures. 1-min load now: {load_average():.1f}."
    )
    report.emit(results)
    return dict(phase_change=pc, scrub=sc)


def main(argv: list[str] | None = None) -> None:
    quick_main(run, __doc__, "a 60-step run and one scrub round: checks the script", argv)


if __name__ == "__main__":
    main()
