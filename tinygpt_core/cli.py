"""The command line: ``python -m tinygpt_core train|resume|generate|export|runs|finetune|chat|presets|corpora``.

A thin layer over the core, like the app's pages: it turns flags into a ``TrainSpec`` or
``SamplingSettings``, calls one core function and prints the outcome. Every ``TinyGPTError`` becomes
one line ``error: <message>`` on stderr and exit code 2; a run that diverged or failed exits 1.

One subject, the command line: argument parsing and the commands' output; hence past 400 lines.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import chat_cli, limits
from .ablation_registry import REGISTRY as ABLATIONS
from .config import (
    DEVICES,
    KEEP_CHECKPOINTS,
    OPTIMIZERS,
    PRECISIONS,
    PRESETS,
    TOKENIZER_KINDS,
    ModelConfig,
    TrainConfig,
    get_preset,
)
from .errors import ConfigError, RunError, TinyGPTError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


# --- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tinygpt_core",
        description="TinyGPT Lab from the command line: train tiny GPTs, sample from them, export them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_resume(sub)
    _add_generate(sub)
    _add_export(sub)
    _add_runs(sub)
    chat_cli.add_commands(sub)  # finetune, chat
    sub.add_parser("presets", help="list the named presets with their descriptions").set_defaults(func=cmd_presets)
    corpora = sub.add_parser("corpora", help="list the built-in corpora, or download a well-known one")
    corpora.add_argument(
        "--download",
        metavar="NAME",
        help="fetch a well-known corpus (tinyshakespeare) into the local cache (needs internet once)",
    )
    corpora.add_argument("--url", help="download from this address instead of the known one (http, https or file)")
    corpora.set_defaults(func=cmd_corpora)
    return parser


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model and write a run folder",
        description="Train a GPT and write a run folder. Preset values are defaults; explicit flags override them.",
        epilog="Example: python -m tinygpt_core train --corpus builtin:tiny --preset tiny --out runs/demo",
    )
    # Every model/training flag defaults to None, meaning "keep the preset's value".
    data = p.add_argument_group("data")
    data.add_argument("--corpus", metavar="SOURCE", help="builtin:NAME (see `corpora`) or a path to a UTF-8 text file")
    data.add_argument("--tokenizer", choices=TOKENIZER_KINDS, help="tokenizer kind (default: the preset's)")
    data.add_argument(
        "--vocab-size",
        type=int,
        dest="tokenizer_vocab_size",
        metavar="N",
        help="target vocabulary size for bpe, cap for word",
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--out",
        type=Path,
        metavar="RUN_DIR",
        help="run folder to write (must not exist or be empty; parents are created); "
        "default: a new folder in the run store",
    )
    out.add_argument(
        "--runs-dir",
        type=Path,
        metavar="DIR",
        help="run store used when --out is not given (default: $TINYGPT_RUNS_DIR or ./runs)",
    )
    out.add_argument("--name", help="a name for the run (shown in the runs table)")
    out.add_argument(
        "--tensorboard",
        dest="tensorboard_dir",
        metavar="DIR",
        help="also write TensorBoard events (losses, lr, tokens/s, grad norm, attention images) at each eval "
        "to DIR/<run folder name>; view them with `tensorboard --logdir DIR`",
    )
    out.add_argument(
        "--grid",
        metavar="ABLATIONS",
        help="an ablation grid instead of one run: these settings as the baseline plus one run per "
        "comma-separated ablation (e.g. relu,no-bias,qk-norm), written to the run store; the runs train "
        "side by side, one per CPU core (TINYGPT_MAX_JOBS_PER_DEVICE), sharing the cores",
    )
    out.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue a stopped or interrupted run instead of starting one (only --max-iters applies)",
    )

    model = p.add_argument_group("model")
    model.add_argument(
        "--preset",
        default="tiny",
        help=f"named starting configuration: {', '.join(PRESETS)} (default: tiny; see `presets`)",
    )
    model.add_argument("--n-embd", type=int, metavar="N", help="width of the residual stream")
    model.add_argument("--block-size", type=int, metavar="N", help="context length in tokens")
    model.add_argument("--dropout", type=float, metavar="P", help="dropout probability in [0, 1)")
    model.add_argument("--ff-mult", type=int, metavar="N", help="MLP hidden width as a multiple of --n-embd")

    # One flag per ablation, from the registry (tinygpt_core.ablation_registry): --no-layernorm,
    # --pos-encoding, --attn-window N, --n-head N, --n-layer N, --activation, --qk-norm, --no-mlp, …
    abl = p.add_argument_group("ablations", "switch parts of the GPT-2 architecture off or change them")
    ABLATIONS.add_cli_flags(abl)

    tr = p.add_argument_group("training")
    tr.add_argument("--batch-size", type=int, metavar="N", help="sequences per micro-batch")
    tr.add_argument(
        "--lr", type=float, metavar="X", help="peak learning rate (the cosine floor follows at lr/10 unless --min-lr)"
    )
    tr.add_argument("--min-lr", type=float, metavar="X", help="learning rate at the end of the cosine decay")
    tr.add_argument("--max-iters", type=int, metavar="N", help="optimizer steps")
    tr.add_argument("--eval-interval", type=int, metavar="N", help="estimate train/val loss every N steps")
    tr.add_argument("--eval-iters", type=int, metavar="N", help="batches averaged per loss estimate")
    tr.add_argument("--warmup-iters", type=int, metavar="N", help="linear learning-rate warm-up steps")
    tr.add_argument("--grad-accum", type=int, metavar="N", help="micro-batches per optimizer step")
    tr.add_argument("--grad-clip", type=float, metavar="X", help="clip the gradient norm to X (0 disables)")
    tr.add_argument("--weight-decay", type=float, metavar="X", help="AdamW weight decay on matrices")
    tr.add_argument("--optimizer", choices=OPTIMIZERS, help="adamw, or muon for hidden matrices")
    tr.add_argument("--seed", type=int, metavar="N", help="random seed (same seed, same run on the same device)")
    tr.add_argument(
        "--early-stop-patience", type=int, metavar="N", help="stop after N evaluations without a better val loss"
    )
    tr.add_argument("--stop-at-val-loss", type=float, metavar="X", help="stop once val loss reaches X")
    tr.add_argument(
        "--keep-checkpoints",
        choices=KEEP_CHECKPOINTS,
        help="checkpoint history: log (steps 0, 1, 2, 4, 8, … and every evaluation; the default), evals, or "
        "last (only what resume needs); thinned to fit $TINYGPT_CHECKPOINT_BUDGET_MB (default 256) per run",
    )

    speed = p.add_argument_group("speed")
    speed.add_argument("--device", choices=DEVICES, help="where to train (default auto: cuda, then mps, then cpu)")
    speed.add_argument("--precision", choices=PRECISIONS, help="autocast precision (auto: bf16 on capable GPUs)")
    speed.add_argument("--compile", dest="compile", action="store_const", const=True, help="torch.compile the model")
    _add_threads(speed)
    speed.add_argument("--no-progress", action="store_true", help="no progress bar (plain lines at each eval)")
    speed.add_argument(
        "--runner",
        choices=("local", "ray"),
        default="local",
        help="where the job trains: local (this process, the default) or ray (a worker of the Ray cluster at "
        "$RAY_ADDRESS, else a local Ray instance; needs `pip install -r requirements-ray.txt`). With ray the "
        "run folder is written here as the worker streams it back; Ctrl-C stops the job on the cluster",
    )
    p.set_defaults(func=cmd_train)


def _add_threads(group) -> None:
    group.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: $TINYGPT_NUM_THREADS, else all cores but one, so a browser "
        "or the app watching keeps a core); 1 is often fastest for tiny models",
    )


def _add_resume(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "resume",
        help="continue a stopped or interrupted run",
        description="Continue a run from its last checkpoint, optimizer state included.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run folder to continue")
    p.add_argument("--max-iters", type=int, metavar="N", help="new total number of steps (default: the run's own)")
    _add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (plain lines at each eval)")
    p.set_defaults(func=cmd_resume)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a trained run",
        description="Print the prompt and its continuation by the run's model.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder")
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    p.add_argument("--strategy", choices=("greedy", "sample", "beam"), default="sample", help="decoding strategy")
    p.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="divide logits by T before sampling")
    p.add_argument("--top-k", type=int, metavar="K", help="keep only the K most likely tokens")
    p.add_argument(
        "--top-p", type=float, metavar="P", help="keep the smallest set of tokens with total probability >= P"
    )
    p.add_argument("--min-p", type=float, metavar="M", help="drop tokens less likely than M times the top token")
    p.add_argument("--num-beams", type=int, default=4, metavar="B", help="beams for --strategy beam")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        metavar="R",
        help="divide the logits of already seen tokens by R (>1 discourages repeats)",
    )
    p.add_argument("--seed", type=int, metavar="S", help="seed for sampling (same seed, same text)")
    p.add_argument(
        "--context-slide",
        type=int,
        default=1,
        metavar="S",
        help="past the model's context the window jumps S tokens at a time, reusing the KV cache in between "
        "(1 = exact: the model always sees the last block_size tokens; half the context is nearly 3x faster "
        "per token for long texts)",
    )
    p.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="weights to use: best validation loss or the last step",
    )
    p.add_argument("--device", choices=DEVICES, default="cpu", help="where to run the model")
    p.add_argument(
        "--show-probs",
        action="store_true",
        help="after the text, list each generated token with the model's probability and rank, and its "
        "probability after the strategy's filters",
    )
    p.set_defaults(func=cmd_generate)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a run as a Hugging Face GPT-2 folder",
        description="Write a folder that transformers.GPT2LMHeadModel.from_pretrained loads.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder")
    p.add_argument("--format", choices=("hf",), default="hf", help="export format (hf: Hugging Face GPT-2)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write (created if missing)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which weights to export")
    p.add_argument(
        "--verify",
        action="store_true",
        help="load the export with transformers and report the largest logit difference",
    )
    p.set_defaults(func=cmd_export)


def _add_runs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "runs",
        help="list, show or delete runs in the run store",
        description="The run store: list (default), show RUN, delete RUN.",
    )
    p.add_argument("action", nargs="?", choices=("list", "show", "delete"), default="list", help="what to do")
    p.add_argument("run", nargs="?", metavar="RUN", help="run id (folder name in the store) or run folder path")
    p.add_argument(
        "--runs-dir", type=Path, metavar="DIR", help="run store folder (default: $TINYGPT_RUNS_DIR or ./runs)"
    )
    p.add_argument("-y", "--yes", action="store_true", help="delete without asking")
    p.set_defaults(func=cmd_runs)


# --- train / resume -------------------------------------------------------------------------------


def spec_from_args(args: argparse.Namespace):
    """The TrainSpec the train flags describe: the preset's values, overridden by every flag given."""
    from .training import TrainSpec

    if not args.corpus:
        raise ConfigError("--corpus is required: builtin:NAME (see `python -m tinygpt_core corpora`) or a text file.")
    overrides = {
        name: value for name, value in vars(args).items() if name in _MODEL_FIELDS | _TRAIN_FIELDS and value is not None
    }
    if args.tensorboard_dir:  # absolute, so a resume from another folder logs to the same place
        overrides["tensorboard_dir"] = str(Path(args.tensorboard_dir).expanduser().resolve())
    if "lr" in overrides and "min_lr" not in overrides:
        overrides["min_lr"] = None  # follow the new lr (lr/10) rather than keep the preset's floor
    if args.tokenizer is not None:
        overrides["tokenizer"] = args.tokenizer
        if args.tokenizer != get_preset(args.preset).tokenizer:
            overrides["tokenizer_vocab_size"] = None  # the preset's size was meant for its own tokenizer kind
    if args.tokenizer_vocab_size is not None:
        overrides["tokenizer_vocab_size"] = args.tokenizer_vocab_size
    if args.name:
        overrides["name"] = args.name
    spec = TrainSpec.from_preset(args.preset, args.corpus, **overrides)
    return spec.validate()


def cmd_train(args: argparse.Namespace) -> int:
    from .runs import RunStore
    from .training import prepare, train

    if args.resume is not None:
        given = [
            n for n, v in vars(args).items() if v is not None and n in (_MODEL_FIELDS | _TRAIN_FIELDS) - {"max_iters"}
        ]
        if args.corpus or args.out or given:
            raise ConfigError(
                "--resume continues a run with its saved settings; only --max-iters can be given with it."
            )
        _set_threads(args.threads)
        if args.runner == "ray":
            return _on_ray(None, args.resume, args.max_iters, args.no_progress)
        return _resume(args.resume, args.max_iters, args.no_progress)

    _set_threads(args.threads)
    spec = spec_from_args(args)  # bad flags fail here, before any folder is created
    if args.grid is not None:
        return _train_grid(args, spec)
    prepared = prepare(spec)  # corpus, tokenizer, split and device, once; DataError before any folder
    # The operator's limits, where set (TINYGPT_READ_ONLY, _MAX_ITERS, _MAX_PARAMS; see limits.py).
    limits.check_spec(prepared, limits.current(explicit_only=True))
    run_dir = None
    if args.out is not None:
        run_dir = _prepare_out(args.out)
    store = RunStore(args.runs_dir) if args.runs_dir is not None else None
    if args.runner == "ray":
        return _on_ray(spec, run_dir, None, args.no_progress, store=store)
    with _Progress(enabled=not args.no_progress) as progress, _graceful_stop() as stop:
        result = train(prepared, run_dir, store=store, callbacks=[progress], stop_event=stop)
    return _report(result, progress)


def _train_grid(args: argparse.Namespace, spec: Any) -> int:
    """Train ``spec`` and one copy per ablation of ``--grid`` through the local job runner (each in its own
    process, as many at once as it has slots), printing each run's end; exit 1 if any did not finish well."""
    from . import state
    from .jobs import LocalJobRunner
    from .runs import RunStore
    from .worker import grid_plan

    if args.out is not None or args.runner != "local":
        raise ConfigError(
            "--grid writes one run per member into the run store (--runs-dir) on the local runner; "
            "drop --out and --runner."
        )
    labels = [x.strip() for x in args.grid.split(",") if x.strip()]
    if args.threads is not None:  # the members' training processes take their threads from here
        import os

        os.environ["TINYGPT_NUM_THREADS"] = str(args.threads)
    runner = LocalJobRunner(RunStore(args.runs_dir) if args.runs_dir is not None else None)
    try:
        launch = state.launch_grid(runner, spec, labels)
        at_once, threads = grid_plan(len(launch.job_ids), runner.max_jobs_per_device)
        print(
            f"Grid {launch.grid_id}: {len(launch.job_ids)} runs in {runner.store.root}, {at_once} at a time "
            f"with {threads} torch thread{'s' if threads != 1 else ''} each.",
            flush=True,
        )
        pending, failed, stopping = list(launch.job_ids), 0, False
        with _graceful_stop() as stop:
            while pending:
                if stop.is_set() and not stopping:  # Ctrl-C: every member saves and ends, the queued never start
                    stopping = True
                    for job_id in pending:
                        runner.stop(job_id)
                time.sleep(0.2)
                for job_id in list(pending):
                    snap = runner.snapshot(job_id)
                    if snap.finished:
                        pending.remove(job_id)
                        failed += snap.status != "done"
                        print(f"{snap.run_id}: {snap.status}. {snap.message}", flush=True)
    finally:
        runner.shutdown()
    return EXIT_FAILED if failed else EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    return _resume(args.run_dir, args.max_iters, args.no_progress)


def _resume(run_dir: Path, max_iters: int | None, no_progress: bool) -> int:
    from .training import resume

    lim = limits.current(explicit_only=True)
    limits.check_writable("resuming runs", lim)
    if max_iters is not None:
        limits.check_max_iters(max_iters, lim)
    if not run_dir.is_dir():
        raise RunError(f"Run folder {run_dir} does not exist; pass the folder a training run wrote.")
    with _Progress(enabled=not no_progress) as progress, _graceful_stop() as stop:
        result = resume(run_dir, max_iters=max_iters, callbacks=[progress], stop_event=stop)
    return _report(result, progress)


def _on_ray(spec, run_dir: Path | None, max_iters: int | None, no_progress: bool, store=None) -> int:
    """Train ``spec`` into ``run_dir`` (or resume ``run_dir`` when ``spec`` is None) on the Ray cluster,
    following it with the same progress bar; Ctrl-C stops the job there (it saves and ends as stopped)."""
    from .jobs import make_runner
    from .runs import RunStore
    from .training import TrainResult

    if spec is None:
        limits.check_writable("resuming runs", limits.current(explicit_only=True))
        if not run_dir.is_dir():
            raise RunError(f"Run folder {run_dir} does not exist; pass the folder a training run wrote.")
        run_dir = run_dir.resolve()
        store = RunStore(run_dir.parent)
    elif run_dir is not None:
        store = RunStore(Path(run_dir).resolve().parent)
    # One job, no warm spares; ConfigError without Ray, JobError when the cluster is unreachable.
    runner = make_runner("ray", store, reattach=False, spares=0)
    with _Progress(enabled=not no_progress) as progress, _graceful_stop() as stop:
        if spec is None:
            job_id = runner.resume(run_dir.name, max_iters, callbacks=[progress])
        else:
            job_id = runner.submit(spec, run_dir=run_dir, callbacks=[progress])
        print(f"Submitted to {runner.describe()}.", file=sys.stderr, flush=True)
        stopping = False
        while True:
            snap = runner.wait(job_id, timeout=0.2)
            if snap.finished:
                break
            if stop.is_set() and not stopping:
                runner.stop(job_id)
                stopping = True
    metrics = snap.metrics
    last_eval = next((r for r in reversed(metrics) if not math.isnan(r["val_loss"])), None)
    result = TrainResult(
        status=snap.status,
        message=snap.message,
        run_dir=snap.run_dir,
        steps=snap.step,
        best_val_loss=snap.best_val_loss,
        final_train_loss=None if last_eval is None else last_eval["train_loss"],
        final_val_loss=None if last_eval is None else last_eval["val_loss"],
    )
    return _report(result, progress)


def _set_threads(n: int | None) -> None:
    """--threads, else the runner's own choice (worker.threads_per_job: $TINYGPT_NUM_THREADS, else the cores
    but one). Torch's default (every core) collapses as soon as anything else wants a core: on 2 cores a
    watching browser tab cut a CLI run to 29% of its rate, and a busy machine to a fifth (issue 10's
    measurements, in the git history of bench/RESULTS.md)."""
    if n is None:
        from .worker import threads_per_job

        n = threads_per_job()
    if n < 1:
        raise ConfigError(f"--threads must be a whole number >= 1, got {n}.")
    import torch

    torch.set_num_threads(n)


def _prepare_out(out: Path) -> Path:
    if out.exists():
        if not out.is_dir():
            raise RunError(f"--out {out} is a file; give a folder that does not exist yet (or is empty).")
        if any(out.iterdir()):
            raise RunError(
                f"--out {out} is not empty; choose a new folder, or use --resume {out} to continue that run."
            )
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def _graceful_stop():
    """Ctrl-C sets a stop event (the trainer saves and ends as "stopped"); a second Ctrl-C aborts."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals only work on the main thread
        yield stop
        return

    def on_sigint(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nStopping after this step and saving… (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


class _Progress:
    """A TrainCallback drawing a tqdm bar (loss, val loss, tokens/s) and printing the start line."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.val_loss: float | None = None
        self.loss: float | None = None
        self.tokens_per_s: float | None = None
        self.started = time.monotonic()
        self.params: int | None = None

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __call__(self, event) -> None:
        kind, step, data = event.kind, event.step, event.data
        if kind == "start":
            self.params = data.get("params")
            self.started = time.monotonic()
            print(
                f"Training on {data.get('device')} ({data.get('precision')}), "
                f"{_fmt_int(self.params)} parameters, {data.get('max_iters')} steps → {data.get('run_dir')}",
                flush=True,
            )
            if self.enabled:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=data.get("max_iters"), initial=step, unit="step", dynamic_ncols=True, file=sys.stderr
                )
        elif kind == "step":
            self.loss, self.tokens_per_s = data.get("loss"), data.get("tokens_per_s")
            if self.bar is not None:
                self.bar.update(max(0, step - self.bar.n))
                self.bar.set_postfix_str(self._postfix(), refresh=False)
        elif kind == "eval":
            self.val_loss = data.get("val_loss")
            line = (
                f"step {step}: train loss {_fmt(data.get('train_loss'))}, val loss {_fmt(self.val_loss)} "
                f"(best {_fmt(data.get('best_val_loss'))} at step {data.get('best_step')})"
            )
            if self.bar is not None:
                self.bar.set_postfix_str(self._postfix())
            else:
                print(line, flush=True)

    def _postfix(self) -> str:
        tps = "–" if self.tokens_per_s is None else f"{self.tokens_per_s:,.0f}"
        return f"loss {_fmt(self.loss)}, val {_fmt(self.val_loss)}, {tps} tok/s"


def _history_line(run_dir: Path) -> str:
    """How many checkpoints the run kept, their size and budget (checkpoints.history; imports torch)."""
    from .checkpoints import history

    return history(run_dir).summary()


def _report(result, progress: _Progress) -> int:
    elapsed = time.monotonic() - progress.started
    lines = [
        f"status:     {result.status}" + (f" ({result.message})" if result.message else ""),
        f"steps:      {result.steps}",
        f"best val:   {_fmt(result.best_val_loss)}",
        f"final loss: train {_fmt(result.final_train_loss)}, val {_fmt(result.final_val_loss)}",
        f"time:       {elapsed:.1f} s",
        f"history:    {_history_line(result.run_dir)}",
        f"run dir:    {result.run_dir}",
    ]
    print("\n".join(lines), flush=True)
    return EXIT_OK if result.status in ("done", "stopped") else EXIT_FAILED


# --- generate -------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from .device import resolve_device
    from .runs import load_run
    from .sampling import SamplingSettings, generate, special_tokens_notice

    settings = SamplingSettings(
        strategy=args.strategy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        context_slide=args.context_slide,
    )
    settings.validate()  # bad settings fail before the model is loaded
    device = resolve_device(args.device)
    run = load_run(args.run_dir, checkpoint=args.checkpoint, device=str(device))
    notice = special_tokens_notice(run.tokenizer, args.prompt)
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    chat_run = run.config.chat is not None  # only a chat run may write its special tokens
    result = generate(run.model, run.tokenizer, args.prompt, settings, device=device, special_tokens=chat_run)
    print(result.full_text)  # prompt + continuation
    if args.show_probs:
        print()
        _print_probs(result)
    return EXIT_OK


def _print_probs(result) -> None:
    if result.beams:
        print("beams (score, continuation), best first:")
        for text, score in result.beams:
            print(f"  {score:9.4f}  {text!r}")
    if result.steps:
        # prob, rank and alternatives: the model's own distribution; filtered: where the strategy picked it
        print(f"{'token':>12}  {'prob':>7}  {'rank':>4}  {'filtered':>8}  top alternatives")
        for s in result.steps:
            top = ", ".join(f"{tok!r} {p:.2f}" for tok, p in s.top[:3])
            print(f"{s.token!r:>12}  {s.prob:7.3f}  {s.rank:>4}  {s.filtered_prob:8.3f}  {top}")


# --- export ---------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_hf

    out = export_hf(args.run_dir, args.out, checkpoint=args.checkpoint)
    print(f"Exported {args.run_dir} ({args.checkpoint} checkpoint) as Hugging Face GPT-2 to {out}")
    if args.verify:
        from .export import verify_export
        from .runs import load_run

        run = load_run(args.run_dir, checkpoint=args.checkpoint, device="cpu")
        diff = verify_export(run.model, out)
        print(f"transformers.GPT2LMHeadModel logits match: max |difference| = {diff:.2e}")
        if not diff < 1e-4:
            return EXIT_FAILED
    return EXIT_OK


# --- runs / presets / corpora ---------------------------------------------------------------------


def cmd_runs(args: argparse.Namespace) -> int:
    from .runs import RunStore

    store = RunStore(args.runs_dir) if args.runs_dir is not None else RunStore()
    if args.action == "list":
        if args.run:
            raise ConfigError("`runs list` takes no run; use `runs show RUN`.")
        print(_runs_table(store.list(), store.root))
        return EXIT_OK
    if not args.run:
        raise ConfigError(f"`runs {args.action}` needs a run id; `runs list` shows them.")
    store, run_id = _locate_run(store, args.run)
    if args.action == "show":
        print(_run_details(store, run_id))
        return EXIT_OK
    path = store.path(run_id)
    limits.check_writable("deleting runs")  # before asking, not after
    if not args.yes and sys.stdin.isatty():
        answer = input(f"Delete run {run_id} ({path})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Not deleted.")
            return EXIT_OK
    store.delete(run_id)
    print(f"Deleted {path}")
    return EXIT_OK


def _locate_run(store, run: str):
    """A run id in ``store``, or a path to a run folder (then its parent is the store)."""
    from .runs import RunStore

    candidate = Path(run)
    if (len(candidate.parts) > 1 or run in (".", "..")) and candidate.is_dir():
        folder = candidate.resolve()
        return RunStore(folder.parent), folder.name
    return store, run


def _runs_table(runs: list, root: Path) -> str:
    if not runs:
        return f"No runs in {root}."
    header = ("id", "name", "status", "preset", "ablations", "params", "best val", "steps")
    rows = [
        (
            r.id,
            _clip(r.name or "–", 40),
            r.status,
            r.preset or "–",
            ",".join(r.ablations) or "–",
            _fmt_int(r.params),
            _fmt(r.best_val_loss),
            f"{r.steps}/{r.max_iters}" if r.max_iters else str(r.steps),
        )
        for r in runs
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    broken = [r for r in runs if r.broken_reason]
    lines += [f"{r.id}: {r.broken_reason}" for r in broken]
    return "\n".join(line.rstrip() for line in lines)


def _clip(text: str, width: int) -> str:
    """One table cell: at most ``width`` characters, an ellipsis where it was cut (``runs show`` has it whole)."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _run_details(store, run_id: str) -> str:
    r = store.summary(run_id)
    lines = [
        f"id:          {r.id}",
        f"path:        {r.path}",
        f"name:        {r.name}",
        f"status:      {r.status}" + (f" ({r.message})" if r.message else ""),
        f"created:     {r.created_at}",
    ]
    if r.broken_reason:
        lines.append(f"broken:      {r.broken_reason}")
        return "\n".join(lines)
    lines += [
        f"preset:      {r.preset or '–'}",
        f"ablations:   {', '.join(r.ablations) or 'none'}",
        f"corpus:      {r.corpus or '–'}",
        f"tokenizer:   {r.tokenizer or '–'}",
        f"params:      {_fmt_int(r.params)}",
        f"steps:       {r.steps}" + (f" of {r.max_iters}" if r.max_iters else ""),
        f"best val:    {_fmt(r.best_val_loss)}" + (f" at step {r.best_step}" if r.best_step is not None else ""),
        f"final loss:  train {_fmt(r.final_train_loss)}, val {_fmt(r.final_val_loss)}",
        f"time:        {'–' if r.elapsed_s is None else f'{r.elapsed_s:.1f} s'}",
        f"history:     {_history_line(r.path)}",
    ]
    with contextlib.suppress(TinyGPTError, OSError, ValueError):
        import json

        cfg = json.loads((r.path / "config.json").read_text(encoding="utf-8"))
        lines.append("model:       " + _kv(cfg.get("model", {})))
        lines.append("train:       " + _kv(cfg.get("train", {})))
    return "\n".join(lines)


def cmd_presets(args: argparse.Namespace) -> int:
    width = max(len(name) for name in PRESETS)
    for name, preset in PRESETS.items():
        print(f"{name:<{width}}  {preset.description}")
    return EXIT_OK


def cmd_corpora(args: argparse.Namespace) -> int:
    from .data import download_corpus, list_builtin_corpora

    if args.download:
        path = download_corpus(args.download, url=args.url)
        print(f"{args.download} is cached at {path}; train on it with --corpus {path}")
        return EXIT_OK
    corpora = list_builtin_corpora()
    width = max((len(f"builtin:{name}") for name, _ in corpora), default=0)
    for name, description in corpora:
        print(f"{'builtin:' + name:<{width}}  {description}")
    return EXIT_OK


# --- helpers --------------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _fmt_int(x: int | None) -> str:
    return "–" if x is None else f"{x:,}"


def _kv(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit code (0 ok, 1 run failed, 2 bad input)."""
    args = build_parser().parse_args(argv)  # argparse itself exits 2 with usage on malformed flags
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except TinyGPTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("Aborted.", file=sys.stderr)
        return 130
