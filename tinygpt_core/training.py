"""The training loop: from a prepared spec to a finished run folder, with a stream of events.

``train`` takes a ``TrainSpec`` (prepared here with ``spec.prepare``) or an already ``PreparedRun``,
writes the run folder's files, and loops in nanoGPT's order: LR schedule (``optim.lr_at``), one
optimizer step (``TrainState.train_step``: forward/backward over ``grad_accum`` micro-batches under
autocast, NaN check, gradient clipping, update); every ``eval_interval`` steps (and at the last)
estimate train and val loss, write a sample (drawn with ``sampling``, the one sampler), and
checkpoint (``checkpoints``: atomic as a whole). ``resume`` continues a run from its last checkpoint.

Failures of *training* (NaN loss, out of memory, a stop request, a bug) never raise: they end the
run with a status and a message saying what to do. Failures of the *spec* (bad config, corpus too
short for the context) raise ``ConfigError``/``DataError`` before any folder is written.

Every random draw comes from a seeded source (see ``trainstate``) and a checkpoint keeps them all,
so the same seed gives the same CPU loss curve and a resumed run continues exactly. This module is
one subject, the loop and its two entry points, hence over 400 lines; the step itself is in
``trainstate``, the optimizer in ``optim``, the spec and its preparation in ``spec``.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoints, health, limits
from .checkpoints import load_checkpoint_state
from .data import check_split, load_corpus, split_ids
from .device import is_out_of_memory, resolve_device, resolve_precision
from .dynamics import eval_dynamics, val_windows
from .errors import DataError, RunError, TinyGPTError, TokenizerError
from .optim import lr_at
from .runs import RunConfig, RunStore, RunWriter, os_reason, read_config, read_status, utc_now_iso
from .spec import PreparedRun, TrainSpec, prepare
from .tensorboard_log import loggers_for
from .trainstate import TrainState, estimate_step_time

FLUSH_INTERVAL_S = 0.5  # metrics.csv is appended at most this often (and at every eval and the end)
HEARTBEAT_INTERVAL_S = 10.0  # status.json is refreshed at least this often while running
SAMPLE_TEMPERATURE = 0.8
PROBE_TOKENS = 32  # length of the attention probe in eval events (callbacks with wants_attention)
TPS_SMOOTHING = 0.1  # weight of the newest step in the tokens/s moving average


# ---------------------------------------------------------------------------------------------
# Public types


@dataclass
class TrainEvent:
    kind: str  # "start" | "step" | "eval" | "sample" | "end"
    step: int
    data: dict
    # start: {"params", "device", "precision", "max_iters", "run_dir", "tokens_per_step", "elapsed_s"}
    # step:  {"loss", "lr", "tokens_per_s", "elapsed_s"}   tokens_per_s: while computing the step (no evals)
    # eval:  {"train_loss", "val_loss", "best_val_loss", "best_step", "elapsed_s", "grad_norm", "induction_score",
    #         "icl_score"}
    #        grad_norm: the last step's, before clipping (None when clipping is off); "attention" too,
    #        (n_layer, n_head, T, T) over the first val tokens, when a callback has wants_attention;
    #        and the health columns "grad_norm_l0", "update_ratio_l0", "act_rms_l0", ... of
    #        runs.LAYER_METRICS (health.py)
    # sample: {"text"}
    # end:   {"status", "message", "elapsed_s"}
    # elapsed_s is the run's training time so far (a resumed run's earlier sessions included; an eval's
    # time counts to its step); at the end of a finished run it is what "Finished N steps in X s" says.


TrainCallback = Callable[[TrainEvent], None]  # called on the training thread; must be quick and must not raise


@dataclass
class TrainResult:
    status: str  # done | stopped | diverged | error | interrupted
    message: str
    run_dir: Path
    steps: int
    best_val_loss: float | None
    final_train_loss: float | None
    final_val_loss: float | None


# ---------------------------------------------------------------------------------------------
# Entry points


def train(
    spec: TrainSpec | PreparedRun,
    run_dir: str | Path | None = None,
    *,
    store: RunStore | None = None,
    callbacks: Sequence[TrainCallback] = (),
    stop_event: threading.Event | None = None,
) -> TrainResult:
    """Train ``spec`` into ``run_dir`` (default: a new folder of ``store``) and return how it ended.

    ``spec`` is a TrainSpec (prepared here) or the PreparedRun of ``prepare(spec)``, so a caller
    that prepared it to check limits does not load the corpus and train the tokenizer twice.
    Raises only for a bad spec (before any folder is created). Everything after that ends as a
    status: done, stopped (``stop_event`` set: checked every step, last checkpoint saved),
    diverged (NaN/inf loss), or error (out of memory, with advice; any other exception).
    """
    run = spec if isinstance(spec, PreparedRun) else prepare(spec)
    if run_dir is None:
        run_dir = (store or RunStore()).create(run.spec.name)
    run_dir = Path(run_dir)
    writer = RunWriter(run_dir)
    corpus = run.corpus
    run_cfg = RunConfig(
        name=run.spec.name or run_dir.name,
        model=run.model_config,
        train=run.spec.train,
        tokenizer={"kind": run.tokenizer.kind, "vocab_size": run.tokenizer.vocab_size},
        corpus={"name": corpus.name, "source": corpus.source, "sha256": corpus.sha256, "chars": corpus.chars},
        preset=run.spec.preset,
        created_at=utc_now_iso(),
        chat=run.chat.record if run.chat is not None else None,
    )

    def write_files() -> None:
        writer.write_config(run_cfg)
        writer.write_tokenizer(run.tokenizer)
        if not corpus.source.startswith("builtin:"):
            # Uploads (and files that may change) are kept with the run so it can be resumed exactly.
            writer.write_text("corpus.txt", corpus.text)
        writer.append_metrics_rows([], n_layer=run.model_config.n_layer)  # header only: readable from the start

    session = _Session(run_dir, writer, run_cfg, run.tokenizer, run.train_ids, run.val_ids, run.device, run.precision)
    session.chat, session.init_weights = run.chat, run.init_weights
    return session.run(write_files, [*callbacks, *loggers_for(run_cfg.train, run_dir)], stop_event)


def resume(
    run_dir: str | Path,
    *,
    max_iters: int | None = None,
    callbacks: Sequence[TrainCallback] = (),
    stop_event: threading.Event | None = None,
) -> TrainResult:
    """Continue a stopped, interrupted or finished run from its last checkpoint.

    The weights, optimizer state, data generator and torch RNG all come from that one checkpoint,
    so the loss curve continues as if the run had never stopped. ``max_iters`` extends the run (the
    cosine schedule is stretched to the new end). RunError when the run is still training, already
    at ``max_iters``, or damaged.
    """
    from .tokenizers import load_tokenizer

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    if read_status(run_dir).status == "running":
        raise RunError(f"Run {run_dir.name} is still training; stop it before resuming.")
    model_state, optim_state, extra = load_checkpoint_state(run_dir, "last")
    if optim_state is None or "step" not in extra:
        raise RunError(f"Run {run_dir.name} has no optimizer.safetensors, so it cannot be resumed exactly.")
    step = int(extra["step"])
    tcfg = cfg.train
    if max_iters is not None:
        tcfg = dataclasses.replace(tcfg, max_iters=max_iters).validate()
    if step >= tcfg.max_iters:
        raise RunError(
            f"Run {run_dir.name} is already at step {step} of {tcfg.max_iters}; "
            "give a larger max_iters to train further."
        )
    device = resolve_device(tcfg.device)
    precision = resolve_precision(tcfg.precision, device)
    try:
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    except TokenizerError as e:
        raise RunError(f"Cannot resume {run_dir.name}: tokenizer.json is invalid: {e}") from None
    chat = None
    if cfg.chat is not None:  # a chat fine-tune: its conversations again, encoded as before
        from .finetune import chat_inputs

        train_ids, val_ids, chat = chat_inputs(run_dir, cfg, tokenizer)
    else:
        text = _resume_corpus_text(run_dir, cfg.corpus)
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        train_ids, val_ids = split_ids(ids, tcfg.val_fraction)
        check_split(train_ids, val_ids, cfg.model.block_size)
    cfg = dataclasses.replace(cfg, train=tcfg)
    writer = RunWriter(run_dir)

    def write_files() -> None:
        writer.write_config(cfg)  # max_iters may have changed
        writer.truncate_after(step)  # drop rows logged after the checkpoint by an interrupted process
        checkpoints.drop_after(run_dir, step)  # history kept past it: rewritten (perhaps on a new schedule)

    session = _Session(run_dir, writer, cfg, tokenizer, train_ids, val_ids, device, precision)
    session.chat = chat
    callbacks = [*callbacks, *loggers_for(tcfg, run_dir)]
    return session.run(write_files, callbacks, stop_event, resume_state=(model_state, optim_state, extra))


# ---------------------------------------------------------------------------------------------
# Helpers


def _sample_text(model: torch.nn.Module, tokenizer: Any, first_id: int, n_tokens: int, seed: int) -> str:
    """A short sample for the run log, from the one sampler (``sampling``) at temperature 0.8.

    Draws come from a generator seeded per eval, so sampling never touches the RNG streams that
    drive training, and the same seed gives the same samples. Past the context the window jumps half
    the context at a time, reusing the KV cache in between: a preview needs no exact window, and a
    120-token sample at baby-fast size then takes 111 ms instead of 204 ms (2 threads, measured).
    """
    from .sampling import SamplingSettings, generate_ids, hidden_token_ids

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([[first_id]], dtype=torch.long, device=device)
    slide = max(1, model.config.block_size // 2)
    settings = SamplingSettings(strategy="sample", temperature=SAMPLE_TEMPERATURE, context_slide=slide)
    out = generate_ids(model, idx, n_tokens, settings, generator=gen, banned_ids=hidden_token_ids(tokenizer))
    return tokenizer.decode(out[0].tolist())


def _resume_corpus_text(run_dir: Path, corpus: dict) -> str:
    """The exact text a run was trained on: corpus.txt in the run, else its source, checked by sha256."""
    import hashlib

    path = run_dir / "corpus.txt"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        try:
            text = load_corpus(str(corpus.get("source", ""))).text
        except DataError as e:
            raise RunError(f"Cannot resume {run_dir.name}: its corpus cannot be loaded: {e}") from None
    sha = corpus.get("sha256")
    if sha and hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest() != sha:
        raise RunError(
            f"Cannot resume {run_dir.name}: its corpus {corpus.get('source')!r} has changed since "
            "the run was trained; start a new run instead."
        )
    return text


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


# ---------------------------------------------------------------------------------------------
# The loop


class _Session:
    """One training process over one run folder (a fresh run or a resumed one): events, files, evals.

    The trainable state and the step itself are ``TrainState``'s; this is the bookkeeping around it.
    """

    def __init__(
        self,
        run_dir: Path,
        writer: RunWriter,
        cfg: RunConfig,
        tokenizer: Any,
        train_ids: torch.Tensor,
        val_ids: torch.Tensor,
        device: torch.device,
        precision: str,
    ):
        self.run_dir, self.writer, self.cfg, self.tokenizer = run_dir, writer, cfg, tokenizer
        self.train_ids, self.val_ids = train_ids, val_ids
        self.device, self.precision = device, precision
        self.callbacks: list[TrainCallback] = []
        self.stop_event: threading.Event | None = None
        self.state: TrainState | None = None
        self.step = 0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.evals_since_best = 0
        self.last_train: float | None = None
        self.last_val: float | None = None
        self.elapsed_offset = 0.0
        self.tps: float | None = None
        self.last_row_elapsed: float | None = None  # elapsed_s of the newest metrics row (its eval included)
        self.rows: list[dict] = []
        self._callback_failed = False
        self.keep_steps: frozenset[int] = frozenset()  # the checkpoint history plan (checkpoints.history_plan)
        self._windows: tuple[torch.Tensor, torch.Tensor] | None = None  # fixed val windows for icl_score
        self.probe: health.StepProbe | None = None  # set on the step an evaluation follows
        self.health: dict[str, float] = {}  # that evaluation's health columns
        self.chat: Any = None  # a chat run's finetune.ChatEval: accuracy and answers at each eval
        self.init_weights: dict | None = None  # a fine-tune's starting weights (its parent's)

    @property
    def notes(self) -> list[str]:
        """Warnings appended to the final message (e.g. torch.compile skipped)."""
        return self.state.notes if self.state is not None else []

    # --- events and files ------------------------------------------------------------------------

    def emit(self, kind: str, data: dict) -> None:
        for cb in self.callbacks:
            try:
                cb(TrainEvent(kind, self.step, data))
            except Exception:  # noqa: BLE001 - a UI glitch must not end a training run
                self._callback_failed = True

    def flush(self) -> None:
        if self.rows:
            self.writer.append_metrics_rows(self.rows)
            self.rows = []
        self.last_flush = time.monotonic()

    def elapsed(self) -> float:
        return self.elapsed_offset + (time.perf_counter() - self.t0)

    def checkpoint(self, which: str) -> None:
        self.flush()  # a crash right after this checkpoint must not leave metrics.csv behind it
        extra: dict[str, Any] = {
            "step": self.step,
            "best_val_loss": self.best_val,
            "best_step": self.best_step,
            "evals_since_best": self.evals_since_best,
            "elapsed_s": self.elapsed(),
            "tokens_per_s": self.tps,
            "last_train_loss": self.last_train,
            "last_val_loss": self.last_val,
            **self.state.random_state(),
        }
        optimizer = self.state.optimizer if which == "last" else None
        self.writer.save_checkpoint(which, self.state.model, optimizer, extra, keep_steps=self.keep_steps)

    def plan_history(self) -> None:
        """Decide which steps to keep (within the disk budget), record the plan, and keep step 0."""
        tcfg = self.cfg.train
        plan = checkpoints.history_plan(
            tcfg.keep_checkpoints,
            tcfg.max_iters,
            tcfg.eval_interval,
            self.state.model.num_params(),
            limits.checkpoint_budget_bytes(),
        )
        checkpoints.write_history_plan(self.run_dir, plan)
        self.keep_steps = frozenset(plan.steps)
        if self.step == 0 and 0 in self.keep_steps:
            self.save_history()

    def save_history(self) -> None:
        """A weights-only checkpoint of this step, kept for the step slider (no optimizer: a third of the size)."""
        self.writer.save_checkpoint("history", self.state.model, None, {"step": self.step})

    def _restore_counters(self, extra: dict) -> None:
        self.step = int(extra["step"])
        self.best_val, self.best_step = extra.get("best_val_loss"), extra.get("best_step")
        self.evals_since_best = int(extra.get("evals_since_best") or 0)
        self.elapsed_offset = float(extra.get("elapsed_s") or 0.0)
        self.tps = extra.get("tokens_per_s")
        self.last_train, self.last_val = extra.get("last_train_loss"), extra.get("last_val_loss")

    # --- the run -----------------------------------------------------------------------------------

    def run(
        self,
        setup_files: Callable[[], None],
        callbacks: Sequence[TrainCallback] = (),
        stop_event: threading.Event | None = None,
        resume_state: tuple[dict, dict, dict] | None = None,
    ) -> TrainResult:
        tcfg = self.cfg.train
        self.callbacks, self.stop_event = list(callbacks), stop_event
        self.t0 = time.perf_counter()
        self.last_flush = self.last_beat = time.monotonic()
        if resume_state is not None:
            self.step = int(resume_state[2]["step"])
        status, message = "error", ""
        try:
            setup_files()
            self.writer.write_status("running", "Starting…", self.step)
            self.state = TrainState(
                self.cfg.model, tcfg, self.train_ids, self.device, self.precision, resume_state, self.init_weights
            )
            self.init_weights = None
            if resume_state is not None:
                self._restore_counters(resume_state[2])
            resume_state = None  # the weights and optimizer tensors now live in the model
            self.plan_history()
            self.emit(
                "start",
                {
                    "params": self.state.model.num_params(),
                    "device": str(self.device),
                    "precision": self.precision,
                    "max_iters": tcfg.max_iters,
                    "run_dir": str(self.run_dir),
                    "tokens_per_step": self.state.tokens_per_step,
                    "elapsed_s": self.elapsed_offset,  # a resumed run's earlier training time
                },
            )
            self.t0 = time.perf_counter()  # elapsed counts training, not setup
            status, message = self.loop()
        except KeyboardInterrupt:
            # Ctrl-C in the CLI: the weights may be mid-update, so no checkpoint; resume uses the last one.
            self._finish("interrupted", f"Interrupted at step {self.step}; resume continues from the last checkpoint.")
            raise
        except TinyGPTError as e:
            status, message = "error", str(e)
        except OSError as e:  # the run store is full or read-only; the last checkpoint on disk is intact
            status, message = (
                "error",
                (
                    f"Could not write the run folder at step {self.step}: {os_reason(e)} "
                    "The run resumes from its last checkpoint."
                ),
            )
        except Exception as e:  # noqa: BLE001 - every failure ends as a status with a message, never a crash
            if is_out_of_memory(e):
                status, message = "error", self._oom_message()
            else:
                status, message = "error", f"Training failed at step {self.step}: {type(e).__name__}: {e}"
        if status == "error" and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self._finish(status, message)

    def _oom_message(self) -> str:
        t, m = self.cfg.train, self.cfg.model
        where = "GPU memory" if self.device.type != "cpu" else "memory"
        return (
            f"Out of {where}: reduce batch size ({t.batch_size}), block size ({m.block_size}) "
            "or model size, then train again."
        )

    def _finish(self, status: str, message: str) -> TrainResult:
        if self.notes:
            message = f"{message} Note: {'; '.join(self.notes)}."
        if self._callback_failed:
            message = f"{message} (A progress callback raised an error; its updates may be incomplete.)"
        try:
            self.flush()
            self.writer.write_status(status, message, self.step)
        except OSError as e:
            message = f"{message} (The run folder could not be updated: {e.strerror or e}.)"
        # The run's training time as its metrics.csv ends (what "Finished N steps in X s" says) when it is done.
        done = status == "done" and self.last_row_elapsed is not None
        self.emit(
            "end",
            {"status": status, "message": message, "elapsed_s": self.last_row_elapsed if done else self.elapsed()},
        )
        return TrainResult(
            status=status,
            message=message,
            run_dir=self.run_dir,
            steps=self.step,
            best_val_loss=self.best_val,
            final_train_loss=self.last_train,
            final_val_loss=self.last_val,
        )

    def heartbeat(self) -> None:
        """Refresh status.json at most every HEARTBEAT_INTERVAL_S, so readers can tell a live run from a dead one."""
        now = time.monotonic()
        if now - self.last_beat >= HEARTBEAT_INTERVAL_S:
            self.writer.write_status("running", f"Step {self.step} of {self.cfg.train.max_iters}", self.step)
            self.last_beat = now

    def stop_requested(self) -> bool:
        return self.stop_event is not None and self.stop_event.is_set()

    def loop(self) -> tuple[str, str]:
        tcfg = self.cfg.train
        tokens_per_step = self.state.tokens_per_step
        while self.step < tcfg.max_iters:
            if self.stop_requested():
                return self._stopped()
            step = self.step + 1
            lr = lr_at(step, tcfg)
            t_step = time.perf_counter()
            evaluates = step % tcfg.eval_interval == 0 or step == tcfg.max_iters
            # Network health is measured on the step an evaluation follows (health.StepProbe), nowhere else.
            self.probe = health.StepProbe(self.state.model) if evaluates and health.LOG_HEALTH else None
            loss = self.state.train_step(lr, probe=self.probe)
            if not math.isfinite(loss):
                return self._diverged(step, loss)
            self.step = step
            dt = max(time.perf_counter() - t_step, 1e-9)
            self.tps = (
                tokens_per_step / dt
                if self.tps is None
                else ((1 - TPS_SMOOTHING) * self.tps + TPS_SMOOTHING * tokens_per_step / dt)
            )
            row = {
                "step": step,
                "loss": loss,
                "train_loss": None,
                "val_loss": None,
                "lr": lr,
                "tokens_per_s": self.tps,
                "elapsed_s": self.elapsed(),
            }
            self.emit("step", {"loss": loss, "lr": lr, "tokens_per_s": self.tps, "elapsed_s": row["elapsed_s"]})
            # Buffered before the eval: _evaluate fills in its losses, and every checkpoint flushes the
            # buffer first, so metrics.csv always reaches at least the step of the checkpoint on disk.
            self.rows.append(row)
            end: tuple[str, str] | None = None
            if evaluates:
                end = self._evaluate(row)
            elif step in self.keep_steps:
                self.save_history()
            self.last_row_elapsed = row["elapsed_s"]
            now = time.monotonic()
            if row["val_loss"] is not None or now - self.last_flush >= FLUSH_INTERVAL_S:
                self.flush()
            self.heartbeat()
            if end is not None:
                return end
        return "done", self._done_message()

    def _estimate(self) -> tuple[float, float] | None:
        """Mean train and val loss (``TrainState.estimate_losses``); None if a stop was requested meanwhile."""

        def before_batch() -> bool:
            self.heartbeat()  # a long eval on a CPU must not look like a dead run
            return self.stop_requested()

        with health.activation_rms(self.state.model) if health.LOG_HEALTH else nullcontext([]) as act_rms:
            out = self.state.estimate_losses((self.train_ids, self.val_ids), before_batch)
        self.health = health.values(self.probe, act_rms) if health.LOG_HEALTH else {}
        return None if out is None else (out[0], out[1])

    def _evaluate(self, row: dict) -> tuple[str, str] | None:
        """Eval, sample and checkpoints at an eval step; returns an end (status, message) or None to go on."""
        tcfg = self.cfg.train
        losses = self._estimate()
        if losses is None:
            return self._stopped()  # a stop was requested during the eval
        train_loss, val_loss = losses
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            return self._diverged(self.step, val_loss if not math.isfinite(val_loss) else train_loss)
        row["train_loss"], row["val_loss"] = train_loss, val_loss
        dynamics: dict[str, float] = {}
        if isinstance(self.val_ids, torch.Tensor):  # a chat run's val split is conversations, not a token stream
            if self._windows is None:
                self._windows = val_windows(self.val_ids, self.cfg.model.block_size)
            dynamics = eval_dynamics(self.state.model, self.tokenizer, self._windows)
        row.update(dynamics)
        row.update(self.health)
        answers = None
        if self.chat is not None:  # a chat run: exact-match accuracy on held-out prompts, and its answers
            row["chat_accuracy"], answers = self.chat.evaluate(self.state.model)
        row["elapsed_s"] = self.elapsed()  # the step's time includes its eval: the run's time agrees with its end
        self.last_train, self.last_val = train_loss, val_loss
        improved = self.best_val is None or val_loss < self.best_val
        if improved:
            self.best_val, self.best_step, self.evals_since_best = val_loss, self.step, 0
        else:
            self.evals_since_best += 1
        data = {
            "train_loss": train_loss,
            "val_loss": val_loss,
            "best_val_loss": self.best_val,
            "best_step": self.best_step,
            "elapsed_s": row["elapsed_s"],
            "grad_norm": None if self.state.grad_norm is None else float(self.state.grad_norm),
            **dynamics,
            **self.health,
        }
        if answers is not None:
            data["chat_accuracy"] = row["chat_accuracy"]
        if any(getattr(cb, "wants_attention", False) for cb in self.callbacks):
            data["attention"] = self._probe_attention()
        self.emit("eval", data)
        if answers is not None:
            self.writer.add_sample(self.step, answers)
            self.emit("sample", {"text": answers})
        elif tcfg.sample_tokens > 0:
            text = _sample_text(
                self.state.model, self.tokenizer, int(self.train_ids[0]), tcfg.sample_tokens, tcfg.seed + self.step
            )
            self.writer.add_sample(self.step, text)
            self.emit("sample", {"text": text})
        if improved:
            self.checkpoint("best")
        self.checkpoint("last")
        self.writer.write_status("running", f"Step {self.step} of {tcfg.max_iters}: val loss {val_loss:.4f}", self.step)
        self.last_beat = time.monotonic()
        if tcfg.stop_at_val_loss is not None and val_loss <= tcfg.stop_at_val_loss:
            return "done", (
                f"Reached val loss {val_loss:.4f} (target {tcfg.stop_at_val_loss}) at step "
                f"{self.step}; train loss {train_loss:.4f}."
            )
        if tcfg.early_stop_patience is not None and self.evals_since_best >= tcfg.early_stop_patience:
            return "done", (
                f"Early stop at step {self.step}: val loss has not improved for "
                f"{self.evals_since_best} evals (best {self.best_val:.4f} at step {self.best_step})."
            )
        return None

    def _probe_attention(self):
        """Attention over the first val tokens ((n_layer, n_head, T, T) numpy), for callbacks that ask."""
        from .inspection import attention_of_ids

        T = min(self.cfg.model.block_size, PROBE_TOKENS, len(self.val_ids))
        return attention_of_ids(self.state.model, self.val_ids[:T].to(self.device))

    def _done_message(self) -> str:
        took = self.last_row_elapsed if self.last_row_elapsed is not None else self.elapsed()
        msg = f"Finished {self.step} steps in {took:.1f} s"
        if _finite(self.last_val):
            msg += (
                f": train loss {self.last_train:.4f}, val loss {self.last_val:.4f} "
                f"(best {self.best_val:.4f} at step {self.best_step})"
            )
        return msg + "."

    def _ensure_best(self) -> None:
        """Give a run that ends before its first eval a model.safetensors, so it can still be opened."""
        if not (self.run_dir / "model.safetensors").exists():
            if all(torch.isfinite(p).all() for p in self.state.model.parameters()):
                self.checkpoint("best")

    def _stopped(self) -> tuple[str, str]:
        self.checkpoint("last")
        self._ensure_best()
        return "stopped", (f"Stopped at step {self.step} of {self.cfg.train.max_iters}; resume the run to continue.")

    def _diverged(self, step: int, loss: float) -> tuple[str, str]:
        tcfg = self.cfg.train
        what = "NaN" if math.isnan(loss) else "infinite"
        advice = f"lower the learning rate (now {tcfg.lr:g})"
        advice += (
            " or enable gradient clipping"
            if tcfg.grad_clip == 0
            else f" or lengthen the warm-up (now {tcfg.warmup_iters} steps)"
        )
        self._ensure_best()
        # self.step is the last step applied (the one a NaN step never reaches): name it, so the message
        # agrees with the run's step count ("Step 4 / 200"), whether the NaN came from a step or an eval.
        where = f"at step {step}" if step == self.step else f"in step {step}, so the run stopped at step {self.step}"
        return "diverged", f"Loss became {what} {where}: {advice}."


__all__ = [
    "PreparedRun",
    "TrainCallback",
    "TrainEvent",
    "TrainResult",
    "TrainSpec",
    "estimate_step_time",
    "lr_at",
    "prepare",
    "resume",
    "train",
]


def warm_up(device: str = "cpu") -> None:
    """Train a tiny model for two steps (an eval, a sample and a checkpoint included) in a scratch
    folder, so the next run in this process pays none of the first-use costs: torch's optimizer
    machinery is imported lazily on the first AdamW (2-5 s on a busy CPU), kernels and the allocator
    warm up on the first steps, CUDA makes its context on first use. Used by the warm spare training
    processes (a local runner's spare child, a Ray runner's spare actor); never raises."""
    import logging
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix="tinygpt-warm-")
    try:
        spec = TrainSpec.from_preset(
            "tiny", "builtin:tiny", max_iters=2, eval_interval=2, eval_iters=1, sample_tokens=4, device=device
        )
        train(spec, scratch)
    except Exception:  # noqa: BLE001 - a process that could not warm up still trains, only less quickly
        logging.getLogger(__name__).exception("the warm-up run failed")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
