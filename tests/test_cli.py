"""The command line: usage errors exit 2 with one error line, help is plain words, and --version."""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

import pipecat_resilient
from pipecat_resilient import chaos
from pipecat_resilient.__main__ import main

# Sphinx roles and inline literals, which have no business in --help.
SPHINX_MARKUP = re.compile(r"``|:(?:class|mod|func|meth|attr|data|exc|obj):`")


@pytest.fixture
def nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command gets as far as starting its event loop."""

    def refuse(coroutine: Coroutine[Any, Any, Any]) -> None:
        coroutine.close()
        raise AssertionError("a usage error started the command")

    monkeypatch.setattr(asyncio, "run", refuse)


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        ([], "required: COMMAND"),
        (["nope"], "invalid choice: 'nope'"),
        (["--bogus", "demo"], "unrecognized arguments: --bogus"),
        (["chaos", "--mix", "close-1012,bogus"], "unknown fault kind: bogus"),
        (["chaos", "--turns", "-3"], "--turns"),
        (["chaos", "--turns", "0"], "--turns"),
        (["chaos", "--turns", "many"], "--turns"),
        (["chaos", "--faults", "-1"], "--faults"),
        (["chaos", "--turns", "3", "--faults", "5"], "faults <= turns"),
        (["chaos", "--mix", ","], "non-empty mix"),
        (["chaos", "--ms-per-char", "-4"], "--ms-per-char"),
        (["chaos", "--ms-per-char", "nan"], "--ms-per-char"),
        (["chaos", "--bogus"], "unrecognized arguments: --bogus"),
        (["chaos", "--out", __file__], "not a folder"),
        (["chaos", "--side", "sts"], "invalid choice: 'sts'"),
        (["chaos", "--side", "stt", "--provider", "elevenlabs"], "invalid choice: 'elevenlabs'"),
        (["chaos", "--side", "llm", "--provider", "elevenlabs"], "invalid choice: 'elevenlabs'"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["demo", "extra"], "unrecognized arguments: extra"),
        (["emulate"], "required: provider"),
        (["emulate", "cartesia"], "invalid choice: 'cartesia'"),
        (["emulate", "elevenlabs", "--ms-per-char", "0"], "--ms-per-char"),
        (["emulate", "elevenlabs", "--first-audio-delay", "-1"], "--first-audio-delay"),
    ],
    ids=lambda value: (" ".join(value) or "no-command") if isinstance(value, list) else "",
)
def test_usage_error_exits_2_with_one_error_line(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str], nothing_runs: None
) -> None:
    """A usage error of any command exits 2, runs nothing and ends with one error line, no traceback."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: pipecat-resilient")
    assert [line for line in lines if "error:" in line] == [lines[-1]]
    assert lines[-1].startswith("pipecat-resilient") and complaint in lines[-1]


@pytest.mark.parametrize(
    "argv", [["--help"], ["-h"], ["demo", "--help"], ["chaos", "--help"], ["emulate", "-h"]]
)
def test_help_is_plain_words(argv: list[str], capsys: pytest.CaptureFixture[str], nothing_runs: None) -> None:
    """Every command's --help is plain words, with no Sphinx markup, and exits 0."""
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pipecat-resilient")
    assert not SPHINX_MARKUP.search(out), out


def test_top_level_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """The top-level help names each command and the --version option."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("demo", "chaos", "emulate", "--version"):
        assert word in out


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--version and -V print the installed distribution's version and exit 0."""
    assert main([flag]) == 0
    assert capsys.readouterr().out == f"pipecat-resilient {importlib.metadata.version('pipecat-resilient')}\n"


def test_version_without_distribution_metadata(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run from a source tree with no installed metadata, --version falls back to __version__."""

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"pipecat-resilient {pipecat_resilient.__version__}\n"


@pytest.mark.parametrize(("lost", "status"), [([], 0), (["word"], 1)], ids=["clean", "lost-a-word"])
def test_chaos_options_reach_the_bench_and_the_status_says_if_a_word_was_lost(
    lost: list[str],
    status: int,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Valid options become the bench's config unchanged; exit 1 means the resilient side lost a word."""
    configs: list[chaos.ChaosConfig] = []

    async def run_chaos(config: chaos.ChaosConfig, **_: object) -> chaos.ChaosReport:
        configs.append(config)
        resilient = chaos.SideReport("resilient", lost=list(lost))
        schedule = chaos.make_schedule(config)
        return chaos.ChaosReport(config, schedule, chaos.SideReport("stock"), resilient, 0.0)

    monkeypatch.setattr(chaos, "run_chaos", run_chaos)
    monkeypatch.setattr(chaos, "write_outputs", lambda report, out: [])
    argv = ["chaos", "--seed", "3", "--turns", "6", "--mix", "close-1012,abort,", "--out", str(tmp_path)]
    assert main([*argv, "--no-progress"]) == status
    assert configs == [
        chaos.ChaosConfig(seed=3, turns=6, faults=4, mix=("close-1012", "abort"), out=tmp_path)
    ]
    assert ("PASS" if status == 0 else "FAIL") in capsys.readouterr().out


def test_chaos_side_llm_runs_the_speech_to_speech_bench(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``chaos --side llm`` hands its other options to the speech-to-speech bench."""
    from pipecat_resilient import chaos_llm

    seen: list[list[str]] = []

    def llm_main(argv: list[str]) -> int:
        seen.append(argv)
        return 1

    monkeypatch.setattr(chaos_llm, "main", llm_main)
    assert main(["chaos", "--side", "llm", "--provider", "openai-realtime", "--seed", "4"]) == 1
    assert seen == [["--provider", "openai-realtime", "--seed", "4"]]


@pytest.mark.parametrize("side", ["tts", "llm", "stt"])
def test_every_side_of_the_chaos_bench_takes_the_shared_options(
    side: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One script can run all three sides with the same options: each parses them and starts."""

    class Started(Exception):
        pass

    def started(coroutine: Coroutine[Any, Any, Any]) -> None:
        coroutine.close()
        raise Started

    monkeypatch.setattr(asyncio, "run", started)
    argv = ["--seed", "3", "--turns", "4", "--faults", "2", "--no-progress", "--verbose"]
    with pytest.raises(Started):
        main(["chaos", "--side", side, *argv])
    assert "error:" not in capsys.readouterr().err


def test_python_dash_m_exits_2_on_a_usage_error() -> None:
    """``python -m pipecat_resilient`` hands the usage-error status 2 to the shell, with no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "pipecat_resilient", "chaos", "--mix", "close-1012,bogus"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("pipecat-resilient chaos: error: argument --mix")
