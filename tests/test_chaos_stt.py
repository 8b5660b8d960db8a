"""The speech-to-text chaos bench: short seeded schedules, the stock service and ResilientSTT side by side."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from pipecat_resilient import chaos
from pipecat_resilient.__main__ import main
from pipecat_resilient.chaos_stt import (
    ALL_FAULT_KINDS,
    STTChaosConfig,
    format_table,
    make_schedule,
    run_stt_chaos,
)

# Faults every stock service loses words to.
MIX = ("close-1011", "abort", "error")


@pytest.fixture
def nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command gets as far as starting its event loop."""

    def refuse(coroutine: Coroutine[Any, Any, Any]) -> None:
        coroutine.close()
        raise AssertionError("a usage error started the command")

    monkeypatch.setattr(asyncio, "run", refuse)


@pytest.mark.parametrize("provider", ["deepgram", "assemblyai"])
async def test_the_resilient_side_loses_and_repeats_nothing_and_the_stock_side_loses_words(
    provider: str,
) -> None:
    """Same faults: the stock service loses words; ResilientSTT loses none, repeats none, and every
    user turn in the context is the sentence said."""
    config = STTChaosConfig(provider=provider, seed=3, turns=4, faults=3, mix=MIX, idle=0.6)
    report = await run_stt_chaos(config)
    table = format_table(report)
    resilient, stock = report.resilient, report.stock
    assert report.passed, table
    assert resilient.lost == [] and resilient.twice == [] and resilient.not_said == []
    assert resilient.context_equal and resilient.user_turns_equal == 4
    assert resilient.faults == 3 and len(resilient.recovery_s()) == 3
    assert resilient.errors == 0
    # The stock service, under the same faults, does not keep the caller's words.
    assert stock.lost and not stock.honest, table
    assert stock.said == resilient.said == sum(len(turn.words) for turn in report.schedule)
    assert "PASS" in table and "by fault kind" in table


def test_the_schedule_is_seeded_and_spreads_every_kind() -> None:
    """The same seed gives the same schedule; every kind of the mix strikes, at a place in a sentence."""
    config = STTChaosConfig(seed=9, turns=30, faults=len(ALL_FAULT_KINDS))
    schedule = make_schedule(config)
    assert schedule == make_schedule(config)
    assert schedule != make_schedule(STTChaosConfig(seed=10, turns=30, faults=len(ALL_FAULT_KINDS)))
    faulted = [turn for turn in schedule if turn.fault]
    assert sorted(turn.fault for turn in faulted if turn.fault) == sorted(ALL_FAULT_KINDS)
    assert all(turn.after_messages and turn.after_messages > 0 and turn.at for turn in faulted)
    assert all(turn.outage_seconds for turn in faulted if turn.fault and turn.fault.startswith("outage-"))
    # AssemblyAI's messages are 50 ms, Deepgram's 20 ms: the same moment is fewer messages in.
    aai = make_schedule(STTChaosConfig(provider="assemblyai", seed=9, turns=30, faults=len(ALL_FAULT_KINDS)))
    assert [t.sentence for t in aai] == [t.sentence for t in schedule]
    assert all((a.after_messages or 0) <= (d.after_messages or 0) for a, d in zip(aai, schedule, strict=True))
    with pytest.raises(ValueError, match="provider"):
        STTChaosConfig(provider="speechmatics")
    with pytest.raises(ValueError, match="unknown fault kinds"):
        STTChaosConfig(mix=("close-1011", "slow-first-audio"))
    with pytest.raises(ValueError, match="faults"):
        STTChaosConfig(turns=2, faults=3)


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--provider", "nope"], "invalid choice: 'nope'"),
        (["--provider", "elevenlabs"], "invalid choice: 'elevenlabs'"),
        (["--turns", "0"], "--turns"),
        (["--turns", "3", "--faults", "5"], "faults <= turns"),
        (["--mix", "close-1011,slow-first-audio"], "unknown fault kind: slow-first-audio"),
        (["--pace", "0"], "--pace"),
        (["--out", __file__], "not a folder"),
        (["--fallback", "assemblyai"], "unrecognized arguments: --fallback"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_usage_errors_exit_2_before_anything_runs(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str], nothing_runs: None
) -> None:
    """``chaos --side stt`` with a bad option exits 2 with one error line, and runs nothing."""
    assert main(["chaos", "--side", "stt", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: pipecat-resilient chaos --side stt")
    assert lines[-1].startswith("pipecat-resilient chaos --side stt: error:") and complaint in lines[-1]
    with pytest.raises(SystemExit) as stop:
        chaos.main(["--side", "stt", *argv])
    assert stop.value.code == 2


def test_help_names_the_stt_bench(capsys: pytest.CaptureFixture[str], nothing_runs: None) -> None:
    """``chaos --side stt --help`` is the STT bench's own help; ``chaos --help`` lists the side."""
    assert main(["chaos", "--side", "stt", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pipecat-resilient chaos --side stt")
    for option in ("--provider", "--turns", "--faults", "--mix", "--pace", "--out", "--no-progress"):
        assert option in out
    assert "``" not in out
    assert main(["chaos", "--help"]) == 0
    assert "stt" in capsys.readouterr().out


def test_the_command_writes_the_json_report_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pipecat-resilient chaos --side stt`` runs both sides, prints the table, writes report.json."""
    argv = ["chaos", "--side", "stt", "--provider", "deepgram", "--seed", "5", "--turns", "2"]
    argv += ["--faults", "1", "--mix", "close-1012", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "speech-to-text chaos: deepgram, seed 5, 2 turns, 1 faults" in out and "PASS" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is True
    assert report["config"]["provider"] == "deepgram" and report["config"]["mix"] == ["close-1012"]
    assert report["resilient"]["words_lost"] == 0 and report["resilient"]["context_equal_to_said"]
    assert report["resilient"]["by_fault"]["close-1012"]["carried_out"] == 1
    assert len(report["schedule"]) == 2 and set(report["turns"]) == {
        "stock deepgram",
        "ResilientSTT(deepgram)",
    }
