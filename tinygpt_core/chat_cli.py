"""The command line's chat commands: ``finetune RUN_DIR --chat SOURCE --out NEW_RUN`` and ``chat RUN_DIR``.

Kept apart from cli.py (which registers them) because they are one subject, conversations, and
use the same helpers as the train command (progress bar, Ctrl-C to stop and save, report).

``chat`` is interactive on a terminal (a ``you>`` prompt, the answer streaming as it is written;
``/new`` starts a new conversation, ``/quit`` or Ctrl-D ends) and scriptable with piped input:
each input line is one user turn, and each answer is printed on one line of its own, in order.
A bad line (a role token typed in it, a symbol the tokenizer does not know) prints an error on
stderr and the conversation goes on without it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ConfigError, RunError, TinyGPTError

NEW, QUIT = "/new", "/quit"


def add_commands(sub: argparse._SubParsersAction) -> None:
    from . import cli
    from .config import DEVICES
    from .sampling import STRATEGIES

    p = sub.add_parser(
        "finetune",
        help="fine-tune a trained run on conversations (a chat run)",
        description=(
            "Start a new run from RUN_DIR's weights and tokenizer and train it on conversations marked with "
            "<system>, <user> and <assistant> tokens (loss on the assistant's tokens only). At each evaluation it "
            "answers held-out prompts: their exact-match accuracy is the chat_accuracy column of metrics.csv."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the trained run to start from (its parent)")
    p.add_argument(
        "--chat", required=True, metavar="SOURCE", help='builtin:chat, or a JSONL file of {"messages": [...]} lines'
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="NEW_RUN",
        help="folder for the new run (default: a new folder of the run store)",
    )
    p.add_argument("--name", default=None, help="the new run's name (default: the parent's name + -chat)")
    p.add_argument("--max-iters", type=int, default=None, help="optimizer steps (default 600)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the parent's)")
    p.add_argument(
        "--eval-interval", type=int, default=None, help="evaluate (and answer held-out prompts) every N steps"
    )
    p.add_argument("--batch-size", type=int, default=None, help="conversations per step (default 32)")
    p.add_argument("--seed", type=int, default=None, help="seed of the batches' order (default: the parent's)")
    p.add_argument("--device", choices=DEVICES, default=None, help="default: the parent's setting")
    p.add_argument("--runs-dir", type=Path, default=None, help="run store for the new run when --out is not given")
    p.add_argument("--no-progress", action="store_true", help="print one line per evaluation instead of a progress bar")
    cli._add_threads(p)
    p.set_defaults(func=cmd_finetune)

    c = sub.add_parser(
        "chat",
        help="talk to a chat run (interactive, or one user turn per line of piped input)",
        description=(
            "Talk to a run fine-tuned with `finetune`. On a terminal: type a message, the answer streams back; "
            "/new starts a new conversation, /quit or Ctrl-D ends. Piped: each input line is one user turn and "
            "each answer is printed on its own line."
        ),
    )
    c.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run made by `finetune`")
    c.add_argument("--system", default=None, help="a system message to open every conversation with")
    c.add_argument(
        "--strategy",
        choices=[s for s in STRATEGIES if s != "beam"],
        default="greedy",
        help="greedy (default: the same answer every time) or sample (beam search cannot stream)",
    )
    c.add_argument("--temperature", type=float, default=1.0, help="sample: < 1 sharpens, > 1 flattens")
    c.add_argument("--top-k", type=int, default=None, help="sample: keep the k most likely tokens")
    c.add_argument("--top-p", type=float, default=None, help="sample: keep the most likely tokens holding p")
    c.add_argument("--min-p", type=float, default=None, help="sample: drop tokens below min-p x the top one")
    c.add_argument("--max-new-tokens", type=int, default=40, help="the longest answer, in tokens")
    c.add_argument("--seed", type=int, default=None, help="sample: the same seed gives the same answers")
    c.add_argument("--show-special", action="store_true", help="also print the token that ends each answer")
    c.add_argument("--any-run", action="store_true", help="talk to a run that was not fine-tuned for chat (to compare)")
    c.add_argument("--device", choices=DEVICES, default="auto", help="where the model runs (default auto)")
    c.set_defaults(func=cmd_chat)


def cmd_finetune(args: argparse.Namespace) -> int:
    from . import cli, limits
    from .finetune import finetune_spec
    from .runs import RunStore
    from .training import prepare, train

    cli._set_threads(args.threads)
    if not args.run_dir.is_dir():
        raise RunError(f"Run folder {args.run_dir} does not exist; pass the folder of a trained run.")
    overrides = {
        "max_iters": args.max_iters,
        "lr": args.lr,
        "eval_interval": args.eval_interval,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "device": args.device,
    }
    spec = finetune_spec(args.run_dir, args.chat, name=args.name, **overrides)
    prepared = prepare(spec)  # the parent, its tokenizer and every conversation checked before any folder
    limits.check_spec(prepared, limits.current(explicit_only=True))
    run_dir = cli._prepare_out(args.out) if args.out is not None else None
    store = RunStore(args.runs_dir) if args.runs_dir is not None else None
    print(
        f"Fine-tuning {args.run_dir} on {args.chat}: {len(prepared.train_ids):,} conversations, "
        f"{len(prepared.chat.items)} held-out prompts.",
        flush=True,
    )
    with cli._Progress(enabled=not args.no_progress) as progress, cli._graceful_stop() as stop:

        def accuracy(event) -> None:
            if event.kind == "eval" and event.data.get("chat_accuracy") is not None:
                line = f"step {event.step}: held-out exact match {event.data['chat_accuracy']:.1%}"
                if progress.bar is not None:
                    progress.bar.write(line, file=sys.stderr)
                else:
                    print(line, flush=True)

        result = train(prepared, run_dir, store=store, callbacks=[progress, accuracy], stop_event=stop)
    return cli._report(result, progress)


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import Message, check_user_text
    from .chatbot import Reply, stream_reply
    from .device import resolve_device
    from .finetune import chat_info
    from .runs import load_run
    from .sampling import SamplingSettings

    settings = SamplingSettings(
        strategy=args.strategy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    ).validate()
    if not args.run_dir.is_dir():
        raise RunError(f"Run folder {args.run_dir} does not exist; pass the folder of a chat run.")
    if chat_info(args.run_dir) is None and not args.any_run:
        raise ConfigError(
            f"{args.run_dir} is not a chat run: it was never fine-tuned on conversations, so it only continues text. "
            f"Fine-tune it first (python -m tinygpt_core finetune {args.run_dir} --chat builtin:chat --out NEW_RUN), "
            "or pass --any-run to talk to it anyway."
        )
    run = load_run(args.run_dir, device=str(resolve_device(args.device)))
    interactive = sys.stdin.isatty()
    opening = [Message("system", args.system)] if args.system else []
    history: list[Message] = list(opening)
    if interactive:
        print(f"Chatting with {run.config.name or args.run_dir.name}. {NEW} starts over, {QUIT} or Ctrl-D ends.")
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return 0
        else:
            raw = sys.stdin.readline()
            if not raw:
                return 0
            line = raw.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == QUIT:
            return 0
        if line.strip() == NEW:
            history = list(opening)
            if interactive:
                print("(new conversation)")
            continue
        turn = [*history, Message("user", line)]
        reply = Reply()
        try:
            check_user_text(line)
            if interactive:
                print("assistant> ", end="", flush=True)
            pieces = []
            for piece in stream_reply(
                run.model, run.tokenizer, turn, settings, show_special=args.show_special, reply=reply
            ):
                pieces.append(piece)
                if interactive:
                    print(piece, end="", flush=True)
            if interactive:
                print(flush=True)
            else:
                print("".join(pieces).replace("\n", " "), flush=True)  # one answer per line
        except TinyGPTError as e:  # this line only: the conversation goes on without it
            if interactive:
                print()
            print(f"error: {e}", file=sys.stderr, flush=True)
            if not interactive:
                print(flush=True)  # the answer's line stays, empty, so answers and input lines still pair up
            continue
        if reply.dropped and interactive:
            print(f"(the {reply.dropped} oldest messages no longer fit the context and were left out)")
        if reply.text.strip():  # an empty answer cannot be a message: the exchange is not kept
            history = [*turn, Message("assistant", reply.text)]
