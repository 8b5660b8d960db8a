"""The chaos bench: a seeded schedule is reproducible, and the resilient side passes it (the CI gate)."""

from __future__ import annotations

import json

import pytest

from pipecat_resilient.chaos import (
    FAULT_KINDS,
    ChaosConfig,
    ChaosReport,
    TurnResult,
    excuse_interruption_boundaries,
    format_table,
    make_schedule,
    run_chaos,
    write_outputs,
)


def test_schedule_is_seeded_and_covers_the_mix() -> None:
    """Same seed, same schedule; every requested fault kind can appear."""
    config = ChaosConfig(seed=5, turns=60, faults=50)
    schedule = make_schedule(config)
    assert schedule == make_schedule(config)
    assert schedule != make_schedule(ChaosConfig(seed=6, turns=60, faults=50))
    assert sum(1 for t in schedule if t.fault) == 50
    assert {t.fault for t in schedule if t.fault} == set(FAULT_KINDS)
    assert {t.kind for t in schedule} == {"llm", "speak"}
    assert all(t.interrupt_after is None for t in schedule if t.fault)


def _turn(heard: list[str], *, interrupted: bool) -> TurnResult:
    return TurnResult(
        index=0,
        fault=None,
        interrupted=interrupted,
        expected=heard,
        heard=heard,
        started_at=0.0,
        first_audio_at=None,
        ended_at=0.0,
    )


def test_each_interrupted_turn_excuses_its_own_last_word_once() -> None:
    """Two interrupted turns ending on the same word excuse it twice; other misses stay misreports."""
    turns = [
        _turn(["Invoice", "record!"], interrupted=True),
        _turn(["Doctor", "record!"], interrupted=True),
        _turn(["Late", "fee."], interrupted=False),
    ]
    left, excused = excuse_interruption_boundaries(["record!", "record!", "fee.", "Doctor"], turns)
    assert (left, excused) == (["fee.", "Doctor"], 2)
    left, excused = excuse_interruption_boundaries(["record!", "record!", "record!"], turns)
    assert (left, excused) == (["record!"], 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mix": ("close-9999",)}, "unknown fault kinds"),
        ({"turns": 2, "faults": 3}, "faults <= turns"),
        ({"turns": 0}, "turns >= 1"),
        ({"provider": "acme"}, "unknown TTS provider"),
    ],
)
def test_bad_config_is_refused(kwargs: dict, message: str) -> None:
    """Bad options fail before anything runs."""
    with pytest.raises(ValueError, match=message):
        ChaosConfig(**kwargs)


async def test_short_seeded_schedule_loses_repeats_and_misreports_nothing(tmp_path) -> None:
    """The CI gate: every fault kind once, through ResilientTTS and the stock service."""
    config = ChaosConfig(
        seed=7, turns=len(FAULT_KINDS) + 2, faults=len(FAULT_KINDS), interruptions=0.2, out=tmp_path
    )
    await _passes(config, tmp_path)


@pytest.mark.parametrize("provider", ["cartesia", "deepgram"])
async def test_every_provider_passes_the_bench(provider: str, tmp_path) -> None:
    """The same gate against Cartesia (timings in a seeded mix of orders) and Deepgram (no timings)."""
    config = ChaosConfig(
        seed=11,
        turns=len(FAULT_KINDS) + 2,
        faults=len(FAULT_KINDS),
        interruptions=0.2,
        out=tmp_path,
        provider=provider,
    )
    await _passes(config, tmp_path)


async def _passes(config: ChaosConfig, tmp_path) -> ChaosReport:
    report = await run_chaos(config, stock=False)
    resilient = report.resilient
    assert {t.fault for t in report.schedule if t.fault} == set(FAULT_KINDS)
    assert resilient.lost == []
    assert resilient.unheard_in_context == []
    # Without word timings a cut sentence may be said again by two words at most.
    allowed = 0 if config.provider != "deepgram" else 2 * resilient.faults
    assert len(resilient.repeated) <= allowed
    assert len(resilient.heard_not_in_context) <= allowed
    assert resilient.errors == 0
    assert resilient.words_heard == resilient.words_expected + len(resilient.repeated) > 0
    assert report.passed
    assert "PASS" in format_table(report)
    written = write_outputs(report, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["passed"] is True
    assert data["resilient"]["words_lost"] == 0
    assert len(data["schedule"]) == config.turns
    assert any(path.suffix == ".png" for path in written)
    # Recovery is broken down by fault kind, for every fault that fired and was recovered from.
    by_kind = data["resilient"]["recovery_by_fault_s"]
    fired = {t.fault for t in resilient.turns if t.fault_at is not None and t.recovered_at is not None}
    assert set(by_kind) == fired and fired
    assert sum(stats["n"] for stats in by_kind.values()) == data["resilient"]["recovery_s"]["n"]
    return report


async def test_with_a_standby_recoveries_take_over_on_it(tmp_path) -> None:
    """--standby: every fault kind, each struck on the connection that speaks; recoveries use the standby."""
    config = ChaosConfig(
        seed=5,
        turns=len(FAULT_KINDS) + 2,
        faults=len(FAULT_KINDS),
        interruptions=0.0,
        out=tmp_path,
        standby=True,
    )
    report = await _passes(config, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    resilient = data["resilient"]
    assert resilient["standby"] is True
    # The faults struck the connection that spoke (not the idle standby), and the
    # recoveries took over on the standby instead of connecting afresh (it is
    # connected again as soon as the processor is live: a fault in the next turn
    # finds one ready).
    assert resilient["faults"] >= config.faults - 2  # a slowed first audio, and an error, may not fire
    assert resilient["standbys_used"] >= resilient["faults"] - 1
    assert "taken over by the standby" in format_table(report)


async def test_a_close_whose_handshake_never_completes_is_recovered_like_any_close() -> None:
    """``--mix close-linger``: a close frame, then nothing; the stock side waits out its close timeout."""
    config = ChaosConfig(seed=3, turns=4, faults=2, interruptions=0.0, mix=("close-linger",))
    report = await run_chaos(config)
    resilient = report.resilient
    assert {t.fault for t in report.schedule if t.fault} == {"close-linger"}
    assert resilient.faults == 2
    assert resilient.lost == [] and resilient.repeated == [] and resilient.errors == 0
    assert report.passed
    # The stock service hears of the close only at its close timeout: it loses words.
    assert report.stock.lost
