"""The training loop: from a ``TrainSpec`` to a finished run folder, with a stream of events.

One function, ``train``, does everything a run needs, in nanoGPT's order: load the corpus, train the
tokenizer (on the whole corpus text: simpler, and a char/word vocabulary then covers the validation
text too), split the token ids into train/val, build the model and optimizer, then loop: LR
schedule, forward/backward over ``grad_accum`` micro-batches under autocast, NaN check, gradient
clipping, optimizer step; every ``eval_interval`` steps (and at the last) estimate train and val
loss, write a sample, and checkpoint.

Failures of *training* (NaN loss, out of memory, a stop request, a bug) never raise: they end the
run with a status and a message saying what to do. Failures of the *spec* (bad config, corpus too
short for the context) raise ``ConfigError``/``DataError`` before any folder is written.

Every random draw comes from a seeded source (torch's global RNG for init and dropout, a dedicated
generator for batches, fresh seeded generators for eval batches and samples), and all of them are
checkpointed, so the same seed gives the same CPU loss curve and a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TOKENIZER_KINDS, ModelConfig, TrainConfig, get_preset
from .data import Corpus, check_split, get_batch, load_corpus, split_ids
from .device import autocast, is_out_of_memory, resolve_device, resolve_precision
from .errors import ConfigError, DataError, RunError, TinyGPTError, TokenizerError
from .model import GPT
from .runs import (
    RunConfig,
    RunStore,
    RunWriter,
    _os_reason,
    load_checkpoint_state,
    read_config,
    read_status,
    utc_now_iso,
)

FLUSH_INTERVAL_S = 0.5  # metrics.csv is appended at most this often (and at every eval and the end)
HEARTBEAT_INTERVAL_S = 10.0  # status.json is refreshed at least this often while running
SAMPLE_TEMPERATURE = 0.8
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
    # eval:  {"train_loss", "val_loss", "best_val_loss", "best_step", "elapsed_s"}
    # sample: {"text"}
    # end:   {"status", "message", "elapsed_s"}
    # elapsed_s is the run's training time so far (a resumed run's earlier sessions included; an eval's
    # time counts to its step); at the end of a finished run it is what "Finished N steps in X s" says.


TrainCallback = Callable[[TrainEvent], None]  # called on the training thread; must be quick and must not raise


@dataclass
class _Prepared:
    """Corpus, tokenizer and token ids, computed once by ``TrainSpec.validate`` and reused by ``train``."""

    key: tuple
    corpus: Corpus
    tokenizer: Any
    ids: torch.Tensor  # (N,) int64, the whole corpus


@dataclass
class TrainSpec:
    """Everything needed to start a run."""

    corpus: str | Corpus  # "builtin:tiny", a path, or a Corpus (uploads)
    model: ModelConfig  # vocab_size is filled in from the tokenizer
    train: TrainConfig
    tokenizer: str = "char"  # char | word | bpe
    tokenizer_vocab_size: int | None = None
    name: str | None = None
    preset: str | None = None
    _prepared: _Prepared | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_preset(cls, preset: str, corpus: str | Corpus, **overrides: Any) -> TrainSpec:
        """A preset's spec; overrides may name ModelConfig or TrainConfig fields, tokenizer,
        tokenizer_vocab_size or name."""
        p = get_preset(preset)
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        spec_fields = {"tokenizer", "tokenizer_vocab_size", "name"}
        unknown = sorted(set(overrides) - model_fields - train_fields - spec_fields)
        if unknown:
            raise ConfigError(f"Unknown setting(s) {', '.join(unknown)} for preset {preset!r}.")
        model = p.model_config(**{k: v for k, v in overrides.items() if k in model_fields})
        train = p.train_config(**{k: v for k, v in overrides.items() if k in train_fields})
        return cls(
            corpus=corpus,
            model=model,
            train=train,
            tokenizer=overrides.get("tokenizer", p.tokenizer),
            tokenizer_vocab_size=overrides.get("tokenizer_vocab_size", p.tokenizer_vocab_size),
            name=overrides.get("name"),
            preset=p.name,
        )

    def validate(self) -> TrainSpec:
        """Check every setting and that the corpus splits into windows of the context; nothing is written.

        Loads the corpus and trains the tokenizer (cached on the spec for ``train``), because only
        then is it known whether both splits hold a full context. Raises ConfigError, DataError or
        TokenizerError with a message saying what to change.
        """
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ConfigError(f"tokenizer must be one of {', '.join(TOKENIZER_KINDS)}; got {self.tokenizer!r}.")
        vs = self.tokenizer_vocab_size
        if vs is not None and (not isinstance(vs, int) or isinstance(vs, bool) or vs < 1):
            raise ConfigError(f"tokenizer_vocab_size must be a whole number >= 1 or None, got {vs!r}.")
        if not isinstance(self.model, ModelConfig) or not isinstance(self.train, TrainConfig):
            raise ConfigError("TrainSpec.model must be a ModelConfig and TrainSpec.train a TrainConfig.")
        self.model.validate()
        self.train.validate()
        resolve_precision(self.train.precision, resolve_device(self.train.device))
        prep = self._prepare()
        train_ids, val_ids = split_ids(prep.ids, self.train.val_fraction)
        check_split(train_ids, val_ids, self.model.block_size)
        return self

    def _prepare(self) -> _Prepared:
        from .tokenizers import train_tokenizer

        corpus = self.corpus
        if isinstance(corpus, str):
            corpus_key: Any = ("source", corpus)
        elif isinstance(corpus, Corpus):
            corpus_key = ("text", corpus.sha256)
        else:
            raise DataError("The corpus must be 'builtin:NAME', the path of a UTF-8 text file, or a Corpus.")
        key = (corpus_key, self.tokenizer, self.tokenizer_vocab_size)
        if self._prepared is not None and self._prepared.key == key:
            return self._prepared
        if isinstance(corpus, str):
            corpus = load_corpus(corpus)
        tok = train_tokenizer(self.tokenizer, corpus.text, self.tokenizer_vocab_size)
        ids = torch.tensor(tok.encode(corpus.text), dtype=torch.long)
        self._prepared = _Prepared(key, corpus, tok, ids)
        return self._prepared


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
    spec: TrainSpec,
    run_dir: str | Path | None = None,
    *,
    store: RunStore | None = None,
    callbacks: Sequence[TrainCallback] = (),
    stop_event: threading.Event | None = None,
) -> TrainResult:
    """Train ``spec`` into ``run_dir`` (default: a new folder of ``store``) and return how it ended.

    Raises only for a bad spec (before any folder is created). Everything after that ends as a
    status: done, stopped (``stop_event`` set: checked every step, last checkpoint saved),
    diverged (NaN/inf loss), or error (out of memory, with advice; any other exception).
    """
    spec.validate()
    prep = spec._prepare()
    train_ids, val_ids = split_ids(prep.ids, spec.train.val_fraction)
    model_cfg = dataclasses.replace(spec.model, vocab_size=prep.tokenizer.vocab_size).validate()
    if run_dir is None:
        run_dir = (store or RunStore()).create(spec.name)
    run_dir = Path(run_dir)
    writer = RunWriter(run_dir)
    corpus = prep.corpus
    run_cfg = RunConfig(
        name=spec.name or run_dir.name,
        model=model_cfg,
        train=spec.train,
        tokenizer={"kind": prep.tokenizer.kind, "vocab_size": prep.tokenizer.vocab_size},
        corpus={"name": corpus.name, "source": corpus.source, "sha256": corpus.sha256, "chars": corpus.chars},
        preset=spec.preset,
        created_at=utc_now_iso(),
    )
    session = _Session(run_dir, writer, run_cfg, prep.tokenizer, train_ids, val_ids, callbacks, stop_event)

    def write_files() -> None:
        writer.write_config(run_cfg)
        writer.write_tokenizer(prep.tokenizer)
        if not corpus.source.startswith("builtin:"):
            # Uploads (and files that may change) are kept with the run so it can be resumed exactly.
            writer.write_text("corpus.txt", corpus.text)
        writer.append_metrics_rows([])  # header only: a fresh run already has a readable metrics.csv

    try:
        return session.run(setup_files=write_files)
    finally:
        spec._prepared = None  # the token ids can be large; a spec kept around by a job list should not pin them


def resume(
    run_dir: str | Path,
    *,
    max_iters: int | None = None,
    callbacks: Sequence[TrainCallback] = (),
    stop_event: threading.Event | None = None,
) -> TrainResult:
    """Continue a stopped, interrupted or finished run from last.safetensors and its optimizer state.

    The data generator, torch RNG and optimizer state are restored, so the loss curve continues as
    if the run had never stopped. ``max_iters`` extends the run (the cosine schedule is stretched to
    the new end). RunError when the run is still training, already at ``max_iters``, or damaged.
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
    try:
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    except TokenizerError as e:
        raise RunError(f"Cannot resume {run_dir.name}: tokenizer.json is invalid: {e}") from None
    text = _resume_corpus_text(run_dir, cfg.corpus)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = split_ids(ids, tcfg.val_fraction)
    check_split(train_ids, val_ids, cfg.model.block_size)
    cfg = dataclasses.replace(cfg, train=tcfg)
    writer = RunWriter(run_dir)

    def write_files() -> None:
        writer.write_config(cfg)  # max_iters may have changed
        writer.truncate_after(step)  # drop rows logged after the checkpoint by an interrupted process

    session = _Session(
        run_dir,
        writer,
        cfg,
        tokenizer,
        train_ids,
        val_ids,
        callbacks,
        stop_event,
        resume_state=(model_state, optim_state, extra),
    )
    return session.run(setup_files=write_files)


def estimate_step_time(spec: TrainSpec, device: str = "auto", steps: int = 3) -> float:
    """Seconds per optimizer step of ``spec``'s model and batch, measured on random tokens.

    One unmeasured warm-up step first (allocation, kernel selection). The global RNG is left as it
    was, so calling this does not change a later seeded run.
    """
    dev = resolve_device(device)
    tcfg = spec.train
    precision = resolve_precision(tcfg.precision, dev)
    vocab = spec.model.vocab_size
    if spec.tokenizer == "bpe" and spec.tokenizer_vocab_size:
        vocab = spec.tokenizer_vocab_size
    cfg = dataclasses.replace(spec.model, vocab_size=vocab).validate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(cfg).to(dev)
        opt = _build_optimizer(model, tcfg, dev)
        gen = torch.Generator().manual_seed(0)
        data = torch.randint(vocab, (cfg.block_size * tcfg.batch_size + cfg.block_size + 1,), generator=gen)

        def one_step() -> None:
            for _ in range(tcfg.grad_accum):
                x, y = get_batch(data, cfg.block_size, tcfg.batch_size, gen, dev)
                with autocast(dev, precision):
                    loss = model(x, y).loss / tcfg.grad_accum
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        one_step()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(max(1, steps)):
            one_step()
        _sync(dev)
        return (time.perf_counter() - t0) / max(1, steps)


# ---------------------------------------------------------------------------------------------
# Helpers


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warm-up, then cosine to min_lr at max_iters."""
    if cfg.warmup_iters > 0 and step <= cfg.warmup_iters:
        return cfg.lr * step / cfg.warmup_iters
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_iters - cfg.warmup_iters)
    ratio = min(1.0, max(0.0, (step - cfg.warmup_iters) / span))
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.resolved_min_lr + coeff * (cfg.lr - cfg.resolved_min_lr)


class _OptimizerSet:
    """Several torch optimizers behind one object (Muon for hidden matrices + AdamW for the rest)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        states = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise RunError("optimizer.safetensors does not match this run's optimizer")
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)


def _build_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> _OptimizerSet:
    """AdamW (decay on matrices only; fused on CUDA and CPU), or Muon on 2-D hidden matrices + AdamW on the rest."""
    adam_kw: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if device.type in ("cuda", "cpu"):
        # One kernel for all parameters instead of a loop of small ops: ~10% of a baby step on a CPU.
        adam_kw["fused"] = True
    if cfg.optimizer == "adamw":
        return _OptimizerSet([torch.optim.AdamW(model.optimizer_groups(cfg.weight_decay), **adam_kw)])
    # Muon orthogonalises whole-matrix updates, which suits the blocks' Linear weights; embeddings
    # and the output head (tied to wte) are lookups rather than linear maps and stay with AdamW.
    hidden = [p for n, p in model.blocks.named_parameters() if p.dim() == 2]
    hidden_ids = {id(p) for p in hidden}
    groups = [
        {"params": [p for p in g["params"] if id(p) not in hidden_ids], "weight_decay": g["weight_decay"]}
        for g in model.optimizer_groups(cfg.weight_decay)
    ]
    # "match_rms_adamw" scales Muon's update to AdamW's RMS so the same lr and decay carry over.
    muon = torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
    return _OptimizerSet([muon, torch.optim.AdamW([g for g in groups if g["params"]], **adam_kw)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()
def _sample_text(model: GPT, tokenizer: Any, first_id: int, n_tokens: int, seed: int, device: torch.device) -> str:
    """A short sample for the run log: multinomial sampling at temperature 0.8, context cropped to block_size.

    Deliberately tiny and independent of the sampling module. Draws come from a CPU generator
    seeded per eval, so sampling never touches the RNG streams that drive training.
    """
    gen = torch.Generator().manual_seed(seed)
    block = model.config.block_size
    idx = torch.tensor([[first_id]], dtype=torch.long, device=device)  # (1, T)
    for _ in range(n_tokens):
        logits = model(idx[:, -block:]).logits[:, -1, :].float()  # (1, V)
        probs = torch.softmax(logits / SAMPLE_TEMPERATURE, dim=-1).cpu()
        nxt = torch.multinomial(probs, 1, generator=gen).to(device)  # (1, 1)
        idx = torch.cat([idx, nxt], dim=1)
    return tokenizer.decode(idx[0].tolist())


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


class _Stop(Exception):
    """Raised inside the loop to end the run with a status other than an error."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _Session:
    """One training process over one run folder (a fresh run or a resumed one)."""

    def __init__(
        self,
        run_dir: Path,
        writer: RunWriter,
        cfg: RunConfig,
        tokenizer: Any,
        train_ids: torch.Tensor,
        val_ids: torch.Tensor,
        callbacks: Sequence[TrainCallback],
        stop_event: threading.Event | None,
        resume_state: tuple | None = None,
    ):
        self.run_dir, self.writer, self.cfg, self.tokenizer = run_dir, writer, cfg, tokenizer
        self.train_ids, self.val_ids = train_ids, val_ids
        self.callbacks, self.stop_event, self.resume_state = list(callbacks), stop_event, resume_state
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
        self.notes: list[str] = []  # warnings appended to the final message (e.g. compile skipped)
        self._callback_failed = False

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
            "data_rng": self.data_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            extra["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.scaler.is_enabled():
            extra["scaler"] = self.scaler.state_dict()
        self.writer.save_checkpoint(which, self.model, self.optimizer if which == "last" else None, extra)

    # --- setup -------------------------------------------------------------------------------------

    def setup(self) -> None:
        tcfg = self.cfg.train
        self.device = resolve_device(tcfg.device)
        self.precision = resolve_precision(tcfg.precision, self.device)
        # Seed everything that draws: torch's global RNG (init, dropout) and the batch generator.
        torch.manual_seed(tcfg.seed)
        self.model = GPT(self.cfg.model).to(self.device)
        self.optimizer = _build_optimizer(self.model, tcfg, self.device)
        self.data_gen = torch.Generator().manual_seed(tcfg.seed)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        if self.resume_state is not None:
            self._restore(*self.resume_state)
        self.fwd_model: torch.nn.Module = self.model
        if tcfg.compile:
            try:
                self.fwd_model = torch.compile(self.model)
            except Exception as e:  # noqa: BLE001 - compile is an optimisation, never a requirement
                self.notes.append(f"torch.compile was skipped ({type(e).__name__}: {e})")

    def _restore(self, model_state: dict, optim_state: dict, extra: dict) -> None:
        from .runs import _load_model_state

        _load_model_state(self.model, model_state)
        self.model.to(self.device)
        try:
            self.optimizer.load_state_dict(optim_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise RunError(f"optimizer.safetensors does not match this run: {e}") from None
        self.step = int(extra["step"])
        self.best_val, self.best_step = extra.get("best_val_loss"), extra.get("best_step")
        self.evals_since_best = int(extra.get("evals_since_best") or 0)
        self.elapsed_offset = float(extra.get("elapsed_s") or 0.0)
        self.tps = extra.get("tokens_per_s")
        self.last_train, self.last_val = extra.get("last_train_loss"), extra.get("last_val_loss")
        if isinstance(extra.get("data_rng"), torch.Tensor):
            self.data_gen.set_state(extra["data_rng"])
        if isinstance(extra.get("torch_rng"), torch.Tensor):
            torch.set_rng_state(extra["torch_rng"])
        if self.device.type == "cuda" and isinstance(extra.get("cuda_rng"), torch.Tensor):
            torch.cuda.set_rng_state(extra["cuda_rng"], self.device)
        if self.scaler.is_enabled() and isinstance(extra.get("scaler"), dict):
            self.scaler.load_state_dict(extra["scaler"])

    # --- the run -----------------------------------------------------------------------------------

    def run(self, setup_files: Callable[[], None]) -> TrainResult:
        tcfg = self.cfg.train
        self.t0 = time.perf_counter()
        self.last_flush = self.last_beat = time.monotonic()
        status, message = "error", ""
        try:
            setup_files()
            self.writer.write_status("running", "Starting…", self.step)
            self.setup()
            self.emit(
                "start",
                {
                    "params": self.model.num_params(),
                    "device": str(self.device),
                    "precision": self.precision,
                    "max_iters": tcfg.max_iters,
                    "run_dir": str(self.run_dir),
                    "tokens_per_step": tcfg.batch_size * tcfg.grad_accum * self.cfg.model.block_size,
                    "elapsed_s": self.elapsed_offset,  # a resumed run's earlier training time
                },
            )
            self.t0 = time.perf_counter()  # elapsed counts training, not setup
            status, message = self.loop()
        except _Stop as s:
            status, message = s.status, s.message
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
                    f"Could not write the run folder at step {self.step}: {_os_reason(e)} "
                    "The run resumes from its last checkpoint."
                ),
            )
        except Exception as e:  # noqa: BLE001 - every failure ends as a status with a message, never a crash
            if is_out_of_memory(e):
                status, message = "error", self._oom_message()
            else:
                status, message = "error", f"Training failed at step {self.step}: {type(e).__name__}: {e}"
        if status == "error" and getattr(self, "device", None) is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self._finish(status, message)

    def _oom_message(self) -> str:
        t, m = self.cfg.train, self.cfg.model
        where = "GPU memory" if getattr(self, "device", torch.device("cpu")).type != "cpu" else "memory"
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
        tcfg, mcfg = self.cfg.train, self.cfg.model
        tokens_per_step = tcfg.batch_size * tcfg.grad_accum * mcfg.block_size
        self.model.train()
        while self.step < tcfg.max_iters:
            if self.stop_requested():
                return self._stopped()
            step = self.step + 1
            lr = lr_at(step, tcfg)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            t_step = time.perf_counter()
            loss = self._train_step(step)
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
            if step % tcfg.eval_interval == 0 or step == tcfg.max_iters:
                end = self._evaluate(row)
            self.last_row_elapsed = row["elapsed_s"]
            now = time.monotonic()
            if row["val_loss"] is not None or now - self.last_flush >= FLUSH_INTERVAL_S:
                self.flush()
            self.heartbeat()
            if end is not None:
                return end
        return "done", self._done_message()

    def _train_step(self, step: int) -> float:
        """Forward/backward over grad_accum micro-batches and one optimizer update; returns the mean loss.

        The update is skipped when the loss is not finite, so the weights stay those of the last good step.
        """
        tcfg = self.cfg.train
        compiled = self.fwd_model is not self.model
        data_state = self.data_gen.get_state() if compiled else None
        try:
            loss_sum = self._forward_backward(self.fwd_model)
        except Exception as e:  # noqa: BLE001
            if not compiled or is_out_of_memory(e):
                raise
            # torch.compile fails lazily at the first call: fall back to eager and redo the step.
            self.notes.append(f"torch.compile was skipped ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            self.fwd_model = self.model
            self.optimizer.zero_grad(set_to_none=True)
            self.data_gen.set_state(data_state)
            loss_sum = self._forward_backward(self.model)
        loss = loss_sum.item()  # the one host sync per step: needed for the NaN check and the log
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return loss
        if tcfg.grad_clip > 0:
            for o in self.optimizer.optimizers:
                self.scaler.unscale_(o)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip)
        for o in self.optimizer.optimizers:
            self.scaler.step(o)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _forward_backward(self, model: torch.nn.Module) -> torch.Tensor:
        tcfg, mcfg = self.cfg.train, self.cfg.model
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(tcfg.grad_accum):
            x, y = get_batch(self.train_ids, mcfg.block_size, tcfg.batch_size, self.data_gen, self.device)
            with autocast(self.device, self.precision):
                loss = model(x, y).loss / tcfg.grad_accum  # mean over the whole accumulated batch
            loss_sum += loss.detach().float()
            self.scaler.scale(loss).backward()
        return loss_sum

    @torch.no_grad()
    def _estimate(self) -> tuple[float, float] | None:
        """Mean train and val loss over eval_iters batches each; None if a stop was requested meanwhile.

        The batches come from a generator seeded the same at every eval: the estimate never moves
        the training data stream, and successive evals are measured on the same windows.
        """
        tcfg, mcfg = self.cfg.train, self.cfg.model
        gen = torch.Generator().manual_seed(tcfg.seed + 1)
        self.model.eval()
        try:
            out = []
            for data in (self.train_ids, self.val_ids):
                total = torch.zeros((), device=self.device)
                for _ in range(tcfg.eval_iters):
                    if self.stop_requested():
                        return None
                    self.heartbeat()  # a long eval on a CPU must not look like a dead run
                    x, y = get_batch(data, mcfg.block_size, tcfg.batch_size, gen, self.device)
                    with autocast(self.device, self.precision):
                        total += self.model(x, y).loss.float()
                out.append((total / tcfg.eval_iters).item())
            return out[0], out[1]
        finally:
            self.model.train()

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
        row["elapsed_s"] = self.elapsed()  # the step's time includes its eval: the run's time agrees with its end
        self.last_train, self.last_val = train_loss, val_loss
        improved = self.best_val is None or val_loss < self.best_val
        if improved:
            self.best_val, self.best_step, self.evals_since_best = val_loss, self.step, 0
        else:
            self.evals_since_best += 1
        self.emit(
            "eval",
            {
                "train_loss": train_loss,
                "val_loss": val_loss,
                "best_val_loss": self.best_val,
                "best_step": self.best_step,
                "elapsed_s": row["elapsed_s"],
            },
        )
        if tcfg.sample_tokens > 0:
            self.model.eval()
            try:
                text = _sample_text(
                    self.model,
                    self.tokenizer,
                    int(self.train_ids[0]),
                    tcfg.sample_tokens,
                    tcfg.seed + self.step,
                    self.device,
                )
            finally:
                self.model.train()
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
            if all(torch.isfinite(p).all() for p in self.model.parameters()):
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
