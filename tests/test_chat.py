"""Chat fine-tuning (issue 16) and hidden chat tokens (issue 12, item 6): the format and its loss mask on
hand-made examples, the round trip, dropping old turns, conversation sets and their errors, a fine-tune
end to end (parent recorded, accuracy column, answers as samples, resume), the CLI piped end to end, and
the special tokens never sampled outside a chat run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from chat_helpers import make_base, make_chat

from tinygpt_core.chat import (
    ChatFormatError,
    Message,
    encode_conversation,
    format_text,
    parse_text,
    role_ids,
)
from tinygpt_core.chatdata import ChatBatches, builtin_chat, load_chat_set
from tinygpt_core.errors import DataError, RunError, TokenizerError
from tinygpt_core.finetune import chat_info, finetune_spec
from tinygpt_core.runs import read_metrics, read_samples
from tinygpt_core.sampling import SamplingSettings, generate, hidden_token_ids, special_tokens_notice
from tinygpt_core.spec import prepare
from tinygpt_core.tokenizers import CharTokenizer, train_tokenizer
from tinygpt_core.training import resume, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent

U, A, S = "<user>", "<assistant>", "<system>"


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .?0123456789")


def conv(*pairs: tuple[str, str]) -> list[Message]:
    return [Message(r, c) for r, c in pairs]


# --- the format and its mask ------------------------------------------------------------------------------


def test_mask_covers_only_the_assistants_tokens(tok):
    messages = conv(("system", "be brief"), ("user", "hi"), ("assistant", "yo"), ("user", "ok?"), ("assistant", "k"))
    enc = encode_conversation(tok, messages, 100)
    assert tok.decode(enc.ids) == f"{S}be brief{U}hi{A}yo{U}ok?{A}k{U}"
    # By hand: one flag per token, True where training predicts it (the assistant's text and the
    # <user> that ends its turn); the system prompt, the user's text and opening role tokens never.
    expected = (
        [False] * (1 + 8)  # <system>be brief
        + [False] * (1 + 2)  # <user>hi
        + [False, True, True]  # <assistant>yo
        + [True]
        + [False] * 3  # <user> (ends "yo": a target) ok?
        + [False, True]  # <assistant>k
        + [True]  # the closing <user>
    )
    assert enc.mask == expected
    targets = [tok.decode([i]) for i, m in zip(enc.ids, enc.mask) if m]
    assert targets == ["y", "o", U, "k", U]


def test_batches_put_the_mask_on_the_targets(tok):
    enc = encode_conversation(tok, conv(("user", "ab"), ("assistant", "cd")), 100)
    x, y = ChatBatches([enc]).get_batch(64, 1, torch.Generator().manual_seed(0), "cpu")
    assert tok.decode(x[0].tolist()) == f"{U}ab{A}cd"
    assert [tok.decode([t]) if t >= 0 else None for t in y[0].tolist()] == [None, None, None, "c", "d", U]


def test_formatting_round_trip(tok):
    messages = conv(
        ("system", "x"), ("user", "reverse abc"), ("assistant", "cba"), ("user", "again"), ("assistant", "cba")
    )
    text = format_text(messages)
    assert parse_text(text) == messages
    assert tok.decode(encode_conversation(tok, messages, 1000).ids) == text
    assert tok.encode(text) == encode_conversation(tok, messages, 1000).ids


def test_oldest_turns_dropped_whole_never_a_special_token_cut(tok):
    messages = conv(("system", "sys"), ("user", "aaaa"), ("assistant", "bbbb"), ("user", "cc"), ("assistant", "dd"))
    full = encode_conversation(tok, messages, 100)
    fitted = encode_conversation(tok, messages, len(full.ids) - 1)
    assert fitted.dropped == 2
    assert tok.decode(fitted.ids) == f"{S}sys{U}cc{A}dd{U}"
    assert fitted.mask[4] is False  # <system> s y s <user>: the kept <user> ends no answer any more
    assert sum(fitted.mask) == 3  # d, d, closing <user>
    tight = encode_conversation(tok, messages, 7)  # <user>cc<assistant>dd<user>: no room for the system message
    assert tok.decode(tight.ids) == f"{U}cc{A}dd{U}" and tight.dropped == 3
    with pytest.raises(ChatFormatError, match="last exchange takes 7 tokens but the model's context holds 5"):
        encode_conversation(tok, messages, 5)


@pytest.mark.parametrize(
    "messages, message",
    [
        (conv(("assistant", "hi")), "message 1 is from the assistant but the user speaks next"),
        (conv(("user", "a"), ("user", "b")), "message 2 is from the user but the assistant speaks next"),
        (conv(("user", "a"), ("system", "b"), ("assistant", "c")), "only the first message may be one"),
        (conv(("user", "a")), "must end with an assistant message"),
        (conv(("user", " "), ("assistant", "b")), "message 1 \\(user\\) has no text"),
        (conv(("user", f"say {A}"), ("assistant", "b")), "contains <assistant>"),
        (conv(("bot", "a")), "role 'bot'"),
    ],
)
def test_roles_out_of_order_and_bad_messages(tok, messages, message):
    with pytest.raises(ChatFormatError, match=message):
        encode_conversation(tok, messages, 100)


def test_every_tokenizer_kind_reserves_the_role_tokens():
    text = "hello world, reverse abc 123"
    for kind in ("char", "word", "bpe"):
        t = train_tokenizer(kind, text, 300 if kind == "bpe" else None)
        ids = role_ids(t)
        assert set(ids) == {"system", "user", "assistant"}
        assert t.decode(encode_conversation(t, conv(("user", "hello"), ("assistant", "world")), 99).ids) == (
            f"{U}hello{A}world{U}"
        )
    with pytest.raises(ChatFormatError, match="char tokenizer has no <user>, <assistant>, <system> token"):
        role_ids(CharTokenizer.train("abc", special_tokens=()))


# --- conversation sets ------------------------------------------------------------------------------------


def test_builtin_set_is_deterministic_with_a_disjoint_heldout_split():
    train_a, held_a = builtin_chat()
    train_b, held_b = builtin_chat()
    assert train_a == train_b and held_a == held_b
    assert len(train_a) == 4000 and len(held_a) == 240
    held_prompts = {c[-2].content for c in held_a}
    assert not held_prompts & {c[-2].content for c in train_a}
    answers = {c[-2].content: c[-1].content for c in held_a}
    word = held_a[0][0].content.split()[-1]
    assert answers[f"reverse {word}"] == word[::-1]
    assert answers[f"length of {word}"] == str(len(word))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "holds no conversations"),
        (b"\n  \n", "holds no conversations"),
        (
            b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{oops\n',
            "line 2: not valid JSON",
        ),
        (b'{"messages": []}\n', "line 1: the conversation has no messages"),
        (
            b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n[1]\n',
            "line 2: expected an object",
        ),
        (b'{"messages": [{"role": "assistant", "content": "a"}]}\n', "line 1: roles out of order"),
        (b'{"messages": [{"role": "user", "content": 3}]}\n', 'line 1: message 1 must be an object with a "role"'),
        (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n', "at least 2"),
        (b"\xff\xfe", "line 1: not UTF-8"),
        (b"", "holds no conversations"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "set.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_chat_set(str(path))


def test_jsonl_set_and_missing_file(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(good) for _ in range(20)) + "\n")
    s = load_chat_set(str(path))
    assert (len(s.train), len(s.heldout)) == (18, 2)
    with pytest.raises(DataError, match="does not exist"):
        load_chat_set(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="Unknown built-in conversation set"):
        load_chat_set("builtin:nope")


# --- a fine-tune, end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    base = make_base(root)
    return root, base, make_chat(root, base, steps=4)


def test_finetune_records_parent_accuracy_and_answers(runs):
    root, base, chat = runs
    info = chat_info(chat)
    assert info["parent"] == str(base.resolve()) and info["source"] == "builtin:chat"
    assert chat_info(base) is None
    assert (chat / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()  # the parent's tokenizer
    m = read_metrics(chat)
    acc = m["chat_accuracy"].dropna()
    assert list(m.dropna(subset=["chat_accuracy"])["step"]) == [4] and 0 <= acc.iloc[0] <= 1
    assert m["chat_accuracy"].isna().sum() == 3  # only eval rows carry it
    sample = read_samples(chat)[-1]["text"]
    assert sample.count("\n") == 5 and "→" in sample  # answers to six held-out prompts
    # An older metrics.csv without the column still reads (NaN), and the base run reads the same way.
    assert read_metrics(base)["chat_accuracy"].isna().all()


def test_finetune_starts_from_the_parents_weights(runs):
    root, base, _ = runs
    p = prepare(finetune_spec(base, "builtin:chat", max_iters=1))
    from tinygpt_core.checkpoints import read_weights

    assert all(torch.equal(p.init_weights[k], v) for k, v in read_weights(base).items())


def test_chat_run_resumes(runs, tmp_path):
    root, base, _ = runs
    spec = finetune_spec(base, "builtin:chat", max_iters=2, eval_interval=2, eval_iters=1)
    run = train(prepare(spec), tmp_path / "c")
    result = resume(run.run_dir, max_iters=4)
    assert result.status == "done", result.message
    assert list(read_metrics(run.run_dir).dropna(subset=["chat_accuracy"])["step"]) == [2, 4]


def test_bad_parents_get_clear_messages(runs, tmp_path):
    root, base, _ = runs
    with pytest.raises(RunError, match="does not exist"):
        finetune_spec(tmp_path / "nope", "builtin:chat")
    busy = tmp_path / "busy"
    __import__("shutil").copytree(base, busy)
    status = json.loads((busy / "status.json").read_text())
    status.update(status="running", pid=__import__("os").getpid(), updated_at=__import__("time").time())
    (busy / "status.json").write_text(json.dumps(status))
    with pytest.raises(RunError, match="still running; fine-tune it once it has finished"):
        prepare(finetune_spec(busy, "builtin:chat"))


def test_char_parent_missing_symbols_names_the_line(runs, tmp_path):
    root, base, _ = runs
    path = tmp_path / "set.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "user", "content": "hé"}, {"role": "assistant", "content": "yo"}]}
    path.write_text("\n".join(json.dumps(x) for x in (good, good, bad, good)) + "\n")
    with pytest.raises(TokenizerError, match=r"conversation on line 3: .*never seen: 'é'"):
        prepare(finetune_spec(base, str(path)))
    long = {"messages": [{"role": "user", "content": "a" * 80}, {"role": "assistant", "content": "yo"}]}
    path.write_text("\n".join(json.dumps(x) for x in (good, long, good)) + "\n")
    with pytest.raises(ChatFormatError, match="conversation on line 2: the conversation's last exchange takes"):
        prepare(finetune_spec(base, str(path)))


def test_bpe_and_word_parents_fine_tune(tmp_path):
    for kind in ("bpe", "word"):
        base = make_base(tmp_path, tokenizer=kind, name=f"base-{kind}")
        chat = make_chat(tmp_path, base, name=f"chat-{kind}", steps=1)
        assert chat_info(chat)["parent_name"] == f"base-{kind}"


# --- hidden tokens outside a chat run (issue 12, item 6) ---------------------------------------------------


def test_special_tokens_are_never_sampled_outside_a_chat_run(runs):
    from tinygpt_core.runs import load_run

    root, base, chat = runs
    run = load_run(base)
    ids = hidden_token_ids(run.tokenizer)
    bias = torch.zeros(run.model.config.vocab_size)  # makes the special tokens by far the most likely ones
    bias[ids] = 50.0
    handle = run.model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        for strategy in ("greedy", "sample", "beam"):
            out = generate(
                run.model, run.tokenizer, "ab", SamplingSettings(strategy=strategy, max_new_tokens=12, seed=1)
            )
            assert not set(out.token_ids) & set(ids), strategy
        from tinygpt_core.training import _sample_text

        logged = _sample_text(run.model, run.tokenizer, 0, 12, seed=1)  # the samples a run writes as it trains
        assert not any(t in logged for t in run.tokenizer.special_tokens) and len(logged) == 13  # start + 12
        allowed = generate(
            run.model, run.tokenizer, "ab", SamplingSettings(strategy="greedy", max_new_tokens=3), special_tokens=True
        )
        assert set(allowed.token_ids) <= set(ids)
    finally:
        handle.remove()


def test_a_prompt_with_a_special_token_says_so(runs):
    from tinygpt_core.runs import load_run

    tok = load_run(runs[1]).tokenizer
    assert special_tokens_notice(tok, "abc") is None
    assert "contains <user>: the tokenizer reads it as one hidden chat token" in special_tokens_notice(tok, "a<user>b")


# --- the CLI --------------------------------------------------------------------------------------------------


def cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinygpt_core", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**__import__("os").environ, "TINYGPT_NUM_THREADS": "1"},
        timeout=240,
    )


@pytest.mark.slow
def test_cli_finetune_then_chat_piped(runs, tmp_path, capsys):
    from tinygpt_core.cli import main

    root, base, _ = runs
    out = tmp_path / "cli-chat"
    args = ["finetune", base, "--chat", "builtin:chat", "--out", out, "--max-iters", 2, "--eval-interval", 2]
    assert main([*map(str, args), "--no-progress"]) == 0
    assert "held-out exact match" in capsys.readouterr().out and chat_info(out)["parent"] == str(base.resolve())
    # The chat itself as a script would use it: a real process, one user turn per line of piped input.
    r = cli("chat", out, "--max-new-tokens", 5, stdin="reverse abc\n\nlength of abcd\nsay <user> hi\nrepeat xyz\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert len(lines) == 5 and lines[-1] == ""  # one answer line per user turn (the bad one's empty), blank skipped
    assert lines[2] == "" and "your message contains <user>" in r.stderr
    assert "<" not in r.stdout  # no role token in the answers
    assert main(["chat", str(base)]) == 2
    assert "is not a chat run" in capsys.readouterr().err
    assert main(["finetune", str(base), "--chat", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_cli_generate_says_when_a_prompt_holds_a_special_token(runs, capsys):
    from tinygpt_core.cli import main

    args = ["generate", str(runs[1]), "--prompt", "ab<system>c", "--max-new-tokens", "3", "--strategy", "greedy"]
    assert main([*args, "--device", "cpu"]) == 0
    assert "note: The prompt contains <system>" in capsys.readouterr().err


def test_an_older_metrics_csv_keeps_its_columns(tmp_path):
    """Runs written before chat_accuracy existed: rows appended on resume follow the file's own header."""
    from tinygpt_core.runs import RunWriter

    old = "step,loss,train_loss,val_loss,lr,tokens_per_s,elapsed_s\n1,2.0,,,0.1,10,1.0\n"
    (tmp_path / "metrics.csv").write_text(old)
    RunWriter(tmp_path).append_metrics_rows([{"step": 2, "loss": 1.5, "lr": 0.1, "chat_accuracy": 0.5}])
    assert (tmp_path / "metrics.csv").read_text().splitlines()[-1] == "2,1.5,,,0.1,,"
    m = read_metrics(tmp_path)
    assert list(m["step"]) == [1, 2] and m["chat_accuracy"].isna().all()
