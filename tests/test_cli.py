"""The command line contract: train writes a run, generate/export/runs read it, bad input exits 2 cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tinygpt_core import checkpoints, cli
from tinygpt_core.runs import RunStore, load_run

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--corpus",
    "builtin:tiny",
    "--preset",
    "tiny",
    "--max-iters",
    "20",
    "--eval-interval",
    "10",
    "--eval-iters",
    "2",
    "--n-layer",
    "1",
    "--n-embd",
    "32",
    "--block-size",
    "16",
    "--batch-size",
    "8",
    "--device",
    "cpu",
    "--seed",
    "1",
]
ABLATION_FLAGS = [
    "--no-layernorm",
    "--no-residual",
    "--swap-qk",
    "--pos-encoding",
    "--norm-position",
    "--attn-window",
    "--no-bias",
    "--untie-weights",
]


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m tinygpt_core ARGS`` in a fresh process, as a user would run it."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tinygpt_core", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or REPO,
        timeout=300,
    )


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny run written by the CLI in a subprocess, shared by the read-only tests below."""
    store = tmp_path_factory.mktemp("store")
    run_dir = store / "cli-run"
    proc = run_cli("train", *TINY, "--out", str(run_dir), "--no-progress", "--name", "cli test")
    assert proc.returncode == 0, proc.stderr
    assert "status:     done" in proc.stdout and str(run_dir) in proc.stdout
    assert "parameters" in proc.stdout  # the start line: device and parameter count
    return run_dir


# --- train ----------------------------------------------------------------------------------------


def test_train_writes_a_run_that_load_run_opens(trained):
    run = load_run(trained)
    assert run.metrics["step"].max() == 20
    assert run.config.name == "cli test" and run.config.preset == "tiny"
    assert (run.config.model.n_layer, run.config.model.n_embd, run.config.model.block_size) == (1, 32, 16)
    assert run.config.model.n_head == 2  # not given: the preset's value
    assert run.config.train.max_iters == 20 and run.config.train.seed == 1
    assert run.status.status == "done"


def test_train_flags_override_the_preset_and_ablations_reach_the_config(tmp_path, capsys):
    out = tmp_path / "nested" / "abl"
    code = cli.main(
        [
            "train",
            *TINY,
            "--max-iters",
            "4",
            "--eval-interval",
            "2",
            "--out",
            str(out),
            "--no-progress",
            "--no-layernorm",
            "--swap-qk",
            "--pos-encoding",
            "sinusoidal",
            "--attn-window",
            "4",
            "--no-bias",
            "--untie-weights",
            "--activation",
            "relu",
            "--lr",
            "1e-2",
            "--tokenizer",
            "word",
        ]
    )
    assert code == 0, capsys.readouterr().err
    cfg = load_run(out).config
    assert cfg.model.ablations() == [
        "no-layernorm",
        "pos-sinusoidal",
        "swap-qk",
        "window-4",
        "relu",
        "untied",
        "no-bias",
    ]
    assert cfg.train.lr == 1e-2 and cfg.train.resolved_min_lr == pytest.approx(1e-3)  # the floor follows --lr
    assert cfg.tokenizer["kind"] == "word"


def test_train_without_out_writes_into_the_run_store(tmp_path, capsys):
    code = cli.main(
        [
            "train",
            *TINY,
            "--max-iters",
            "2",
            "--eval-interval",
            "2",
            "--runs-dir",
            str(tmp_path),
            "--no-progress",
            "--name",
            "in store",
        ]
    )
    assert code == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert run_dir.name.startswith("in-store-")
    assert str(run_dir) in capsys.readouterr().out


def test_train_grid_runs_every_member_side_by_side_into_the_store(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TINYGPT_JOB_EXECUTION", "thread")  # the members train in this process: fast
    monkeypatch.setenv("TINYGPT_MAX_JOBS_PER_DEVICE", "2")
    argv = ["train", *TINY, "--max-iters", "2", "--eval-interval", "2", "--runs-dir", str(tmp_path)]
    assert cli.main([*argv, "--grid", "relu,no-bias"]) == 0
    out = capsys.readouterr().out
    assert "3 runs" in out and "2 at a time" in out
    runs = RunStore(tmp_path).list()
    assert sorted(r.name.rsplit("/", 1)[-1] for r in runs) == ["baseline", "no-bias", "relu"]
    assert {r.status for r in runs} == {"done"}
    # A grid is not one run folder: --out is refused with a clear message, before anything is written.
    code = cli.main([*argv, "--grid", "relu", "--out", str(tmp_path / "x")])
    assert_clean_error(code, capsys.readouterr().err, "--grid")
    assert len(RunStore(tmp_path).list()) == 3


def test_train_refuses_a_non_empty_out_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    code = cli.main(["train", *TINY, "--out", str(tmp_path)])
    assert_clean_error(code, capsys.readouterr().err, "not empty")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_resume_continues_a_run(tmp_path, capsys):
    out = tmp_path / "r"
    assert (
        cli.main(["train", *TINY, "--max-iters", "6", "--eval-interval", "3", "--out", str(out), "--no-progress"]) == 0
    )
    assert cli.main(["resume", str(out), "--max-iters", "10", "--no-progress"]) == 0
    assert load_run(out).metrics["step"].max() == 10
    assert cli.main(["train", "--resume", str(out), "--max-iters", "12", "--no-progress"]) == 0
    assert load_run(out).metrics["step"].max() == 12


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["train", "--corpus", "/nonexistent/corpus.txt"], ["/nonexistent/corpus.txt"]),
        (["train", "--corpus", "builtin:tiny", "--n-embd", "30", "--n-head", "4"], ["divisible"]),
        (["train", "--corpus", "builtin:tiny", "--preset", "huge"], ["huge", "tiny"]),
        (["train", "--corpus", "builtin:nope"], ["nope"]),
        (["train", "--preset", "tiny"], ["--corpus"]),
        (["train", "--corpus", "builtin:tiny", "--lr", "5"], ["lr"]),
        (["train", "--corpus", "builtin:tiny", "--threads", "0"], ["--threads"]),
    ],
)
def test_bad_train_input_exits_2_with_one_line(tmp_path, capsys, argv, fragments):
    out = tmp_path / "never"
    code = cli.main([*argv, "--out", str(out)])
    assert_clean_error(code, capsys.readouterr().err, *fragments)
    assert not out.exists()  # nothing written for bad input


def test_missing_corpus_file_in_a_real_process(tmp_path):
    proc = run_cli("train", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r"))
    assert_clean_error(proc.returncode, proc.stderr, "missing.txt")


def test_ctrl_c_stops_gracefully_and_saves(tmp_path):
    out = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tinygpt_core",
            "train",
            *TINY,
            "--max-iters",
            "1000000",
            "--eval-interval",
            "1000000",
            "--out",
            str(out),
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        first_line = proc.stdout.readline()  # the start line: training has begun
        assert "parameters" in first_line, proc.stderr.read() if proc.poll() is not None else first_line
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "status:     stopped" in stdout and "Traceback" not in stderr
    run = load_run(out, checkpoint="last")
    assert run.status.status == "stopped" and checkpoints.can_resume(out)


def test_run_failure_exit_code():
    class Result:
        status, message, run_dir, steps = "diverged", "loss became NaN", Path("x"), 3
        best_val_loss = final_train_loss = final_val_loss = None

    assert cli._report(Result(), cli._Progress(enabled=False)) == cli.EXIT_FAILED
    Result.status = "stopped"
    assert cli._report(Result(), cli._Progress(enabled=False)) == cli.EXIT_OK


# --- generate -------------------------------------------------------------------------------------


def test_generate_greedy_prints_prompt_and_continuation(trained, capsys):
    argv = ["generate", str(trained), "--prompt", "the", "--strategy", "greedy", "--max-new-tokens", "15"]
    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.rstrip("\n")
    assert text.startswith("the") and len(text) > len("the")
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == proc.stdout  # greedy is deterministic


def test_generate_sample_is_reproducible_with_a_seed(trained, capsys):
    def sample(seed: str) -> str:
        assert (
            cli.main(
                [
                    "generate",
                    str(trained),
                    "--prompt",
                    "a",
                    "--strategy",
                    "sample",
                    "--seed",
                    seed,
                    "--temperature",
                    "1.5",
                    "--max-new-tokens",
                    "40",
                ]
            )
            == 0
        )
        return capsys.readouterr().out

    first = sample("7")
    assert first.startswith("a") and first == sample("7")
    assert any(sample(str(s)) != first for s in (8, 9, 10))  # the seed matters


def test_generate_beam_and_show_probs(trained, capsys):
    assert (
        cli.main(
            [
                "generate",
                str(trained),
                "--prompt",
                "the",
                "--strategy",
                "beam",
                "--num-beams",
                "3",
                "--max-new-tokens",
                "10",
                "--show-probs",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("the") and "beams" in out
    assert (
        cli.main(
            [
                "generate",
                str(trained),
                "--prompt",
                "the",
                "--strategy",
                "greedy",
                "--max-new-tokens",
                "5",
                "--show-probs",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert "prob" in lines[2] and len(lines) == 3 + 5  # text, blank, header, one row per token


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--top-p", "1.5"], ["top_p"]),
        (["--temperature", "0"], ["temperature"]),
        (["--prompt", "日本"], ["日"]),
        (["--checkpoint", "last", "--max-new-tokens", "0"], ["max_new_tokens"]),
    ],
)
def test_bad_generate_input_exits_2_with_one_line(trained, capsys, extra, fragments):
    code = cli.main(["generate", str(trained), "--prompt", "the", *extra])
    assert_clean_error(code, capsys.readouterr().err, *fragments)


def test_generate_from_a_folder_that_is_not_a_run(tmp_path, capsys):
    code = cli.main(["generate", str(tmp_path), "--prompt", "x"])
    assert_clean_error(code, capsys.readouterr().err)


# --- export / runs / presets / corpora / help -------------------------------------------------------


def test_export_writes_a_hugging_face_folder(trained, tmp_path):
    out = tmp_path / "hf"
    proc = run_cli("export", str(trained), "--format", "hf", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert str(out) in proc.stdout


def test_export_of_an_inexpressible_architecture_is_a_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "post"
    assert (
        cli.main(
            [
                "train",
                *TINY,
                "--max-iters",
                "2",
                "--eval-interval",
                "2",
                "--out",
                str(run_dir),
                "--norm-position",
                "post",
                "--no-progress",
            ]
        )
        == 0
    )
    code = cli.main(["export", str(run_dir), "--out", str(tmp_path / "hf")])
    assert_clean_error(code, capsys.readouterr().err, "post-norm")


def test_runs_list_shows_the_run(trained):
    proc = run_cli("runs", "list", "--runs-dir", str(trained.parent))
    assert proc.returncode == 0, proc.stderr
    header, _, row = proc.stdout.splitlines()[:3]
    for column in ("id", "name", "status", "preset", "ablations", "params", "best val", "steps"):
        assert column in header
    assert row.split()[0] == "cli-run" and " done " in row and " tiny " in row and "20/20" in row


def test_runs_list_names_each_run_and_clips_long_names(tmp_path):
    from tinygpt_core.training import TrainSpec, train

    long_name = "a rather long and descriptive name for this run, " * 3
    for name in ("grid-241201-101500-ab12/no-layernorm", long_name):
        spec = TrainSpec.from_preset("tiny", "builtin:tiny", max_iters=2, eval_interval=2, eval_iters=1, name=name)
        train(spec, store=RunStore(tmp_path))
    proc = run_cli("runs", "list", "--runs-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "grid-241201-101500-ab12/no-layernorm" in proc.stdout  # which grid and which ablation
    assert long_name[:39] + "…" in proc.stdout and long_name[:41] not in proc.stdout


def test_runs_show_and_delete(tmp_path, capsys):
    run_dir = tmp_path / "one"
    assert (
        cli.main(
            [
                "train",
                *TINY,
                "--max-iters",
                "2",
                "--eval-interval",
                "2",
                "--out",
                str(run_dir),
                "--no-progress",
                "--swap-qk",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["runs", "show", "one", "--runs-dir", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "swap-qk" in shown and "status:      done" in shown
    assert cli.main(["runs", "show", str(run_dir)]) == 0  # a path works too
    capsys.readouterr()
    assert_clean_error(
        cli.main(["runs", "show", "ghost", "--runs-dir", str(tmp_path)]), capsys.readouterr().err, "ghost"
    )
    assert cli.main(["runs", "delete", "one", "--runs-dir", str(tmp_path), "--yes"]) == 0
    assert not run_dir.exists()
    assert cli.main(["runs", "--runs-dir", str(tmp_path)]) == 0
    assert "No runs" in capsys.readouterr().out


def test_presets_and_corpora_are_listed(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    from tinygpt_core.config import PRESETS

    for name, preset in PRESETS.items():
        assert any(line.startswith(name) and preset.description in line for line in out.splitlines())
    assert cli.main(["corpora"]) == 0
    assert "builtin:tiny" in capsys.readouterr().out


def test_corpora_download_caches_a_file_and_reports_its_path(tmp_path, monkeypatch, capsys):
    # A file:// address stands in for the network; the cache is a temp folder.
    source = tmp_path / "input.txt"
    source.write_text("First line of a corpus.\n" * 50, encoding="utf-8")
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["corpora", "--download", "tinyshakespeare", "--url", source.as_uri()]) == 0
    cached = tmp_path / "cache" / "tinyshakespeare.txt"
    assert cached.read_text(encoding="utf-8") == source.read_text(encoding="utf-8")
    assert str(cached) in capsys.readouterr().out
    # An address that cannot be reached is a clean error, not a traceback.
    code = cli.main(["corpora", "--download", "other", "--url", (tmp_path / "missing.txt").as_uri()])
    assert_clean_error(code, capsys.readouterr().err, "Could not download")


def test_help_documents_every_flag_in_groups(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ABLATION_FLAGS + [
        "--tokenizer",
        "--vocab-size",
        "--preset",
        "--n-layer",
        "--n-head",
        "--n-embd",
        "--block-size",
        "--dropout",
        "--ff-mult",
        "--activation",
        "--batch-size",
        "--lr",
        "--max-iters",
        "--eval-interval",
        "--eval-iters",
        "--warmup-iters",
        "--grad-accum",
        "--grad-clip",
        "--weight-decay",
        "--seed",
        "--early-stop-patience",
        "--stop-at-val-loss",
        "--device",
        "--precision",
        "--compile",
        "--optimizer",
        "--name",
        "--out",
        "--resume",
        "--threads",
    ]:
        assert flag in text, flag
    for group in ("data:", "model:", "ablations:", "training:", "speed:"):
        assert group in text
    # Every option of every subcommand carries help text.
    parser = cli.build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            assert action.help, f"{sub.prog} {action.option_strings or action.dest} has no help"


def test_generate_context_slide_matches_the_core_and_bad_slides_get_one_line(trained, capsys):
    from tinygpt_core.runs import load_run
    from tinygpt_core.sampling import SamplingSettings, generate

    run = load_run(trained)
    block = run.config.model.block_size
    n = 2 * block + 3  # well past the context: the window slides
    for slide in (1, block // 2):
        argv = ["generate", str(trained), "--prompt", "the", "--strategy", "greedy", "--max-new-tokens", str(n)]
        assert cli.main([*argv, "--context-slide", str(slide)]) == 0
        printed = capsys.readouterr().out.rstrip("\n")
        settings = SamplingSettings(strategy="greedy", max_new_tokens=n, context_slide=slide)
        assert printed == "the" + generate(run.model, run.tokenizer, "the", settings).text
    for bad in ("0", str(block + 1)):
        code = cli.main(["generate", str(trained), "--prompt", "the", "--context-slide", bad])
        assert_clean_error(code, capsys.readouterr().err, "context_slide")
