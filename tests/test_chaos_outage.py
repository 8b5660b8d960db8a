"""The chaos bench's outages and fallback provider: the primary goes down mid-answer for a while.

With ``--fallback`` the resilient side moves the unheard rest to the other
provider (its own emulator) and takes the primary back once healthy; without
one it waits the outage out within its retry policy. The stock side has no
fallback, and loses the rest of the answer.
"""

from __future__ import annotations

import json

import pytest

from pipecat_resilient.chaos import (
    ALL_FAULT_KINDS,
    EXTRA_KINDS,
    FALLBACK_MIX,
    FAULT_KINDS,
    OUTAGE_KINDS,
    ChaosConfig,
    format_table,
    main,
    make_schedule,
    parse_config,
    run_chaos,
)

# Short outages keep the runs fast; the seeds put the outage in the first turns.
OUTAGE = 0.6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fallback", "elevenlabs"], "must be another provider than --provider (elevenlabs)"),
        (["--provider", "cartesia", "--fallback", "cartesia"], "must be another provider"),
        (["--fallback", "acme"], "invalid choice: 'acme'"),
        (["--outage-seconds", "0"], "must be a number more than 0"),
        (["--mix", "outage-flood"], "unknown fault kind: outage-flood"),
    ],
)
def test_a_bad_fallback_or_outage_option_is_a_usage_error(argv: list[str], message: str, capsys) -> None:
    """Exit status 2 with argparse's message, before anything runs."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_outages_join_the_default_mix_only_with_a_fallback() -> None:
    """Default runs keep their mix and schedule; --fallback adds refuse and stall outages; --mix rules."""
    config, _ = parse_config([])
    assert config.mix == FAULT_KINDS and config.fallback is None and not config.outages
    config, _ = parse_config(["--fallback", "cartesia", "--outage-seconds", "1.5"])
    assert config.fallback == "cartesia" and config.outage_seconds == 1.5
    assert config.mix == FALLBACK_MIX and {"outage-refuse", "outage-stall"} < set(config.mix)
    config, _ = parse_config(["--fallback", "deepgram", "--mix", "outage-hang,abort"])
    assert config.mix == ("outage-hang", "abort")
    assert set(ALL_FAULT_KINDS) == set(FAULT_KINDS) | set(EXTRA_KINDS) | set(OUTAGE_KINDS)
    with pytest.raises(ValueError, match="another provider"):
        ChaosConfig(fallback="elevenlabs")
    with pytest.raises(ValueError, match="unknown TTS provider"):
        ChaosConfig(fallback="acme")


def test_outage_lengths_are_seeded_and_leave_the_rest_of_the_schedule_alone() -> None:
    """Each outage lasts 0.5 to 1.5 times --outage-seconds; other turns get no length."""
    config = ChaosConfig(seed=3, turns=30, faults=20, mix=FALLBACK_MIX, outage_seconds=2.0)
    schedule = make_schedule(config)
    assert schedule == make_schedule(config)
    outages = [t for t in schedule if t.fault in OUTAGE_KINDS]
    assert outages and all(t.outage_seconds is not None and 1.0 <= t.outage_seconds <= 3.0 for t in outages)
    assert all(t.outage_seconds is None for t in schedule if t.fault not in OUTAGE_KINDS)


def test_an_outage_with_a_fallback_switches_and_loses_nothing(tmp_path, capsys) -> None:
    """The CLI end to end: the primary refuses for a while mid-answer; the resilient side switches to
    Cartesia and loses, repeats and misreports nothing; the stock side loses the rest of its answer."""
    argv = ["--fallback", "cartesia", "--mix", "outage-refuse", "--outage-seconds", str(OUTAGE)]
    argv += ["--turns", "3", "--faults", "1", "--seed", "2", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "provider switches" in table and "time on the fallback" in table and "PASS" in table
    data = json.loads((tmp_path / "report.json").read_text())
    resilient, stock = data["resilient"], data["stock"]
    assert [t["fault"] for t in data["schedule"] if t["fault"]] == ["outage-refuse"]
    assert resilient["outages"] == 1 and resilient["outage_handshakes"] >= 1
    assert resilient["switches"] >= 1
    assert resilient["switches_by_route"]["ElevenLabsTTSService -> CartesiaTTSService"] >= 1
    assert resilient["time_on_fallback_s"] > 0 and 0 < resilient["time_on_fallback_share"] < 1
    assert resilient["words_lost"] == resilient["words_heard_twice"] == 0
    assert resilient["context_words_never_heard"] == resilient["heard_words_not_in_context"] == 0
    assert resilient["error_frames"] == 0
    assert resilient["connections_by_provider"]["CartesiaTTSService"] >= 1
    assert "outage-refuse" in resilient["dead_air_by_fault_s"]
    # A stock service has no fallback: the rest of the answer is gone.
    assert stock["words_lost"] > 0 and stock["switches"] == 0
    [outage] = data["events"]["resilient"]["outages"]
    assert outage["provider"] == "ElevenLabsTTSService" and outage["connections_cut"] == 1
    switches = data["events"]["resilient"]["switches"]
    assert switches[0]["turn"] == outage["turn"]


async def test_an_outage_without_a_fallback_is_waited_out() -> None:
    """One provider, down (stalled) for a while mid-answer: the resilient side keeps trying within its
    retry policy and says the rest once the provider is back."""
    config = ChaosConfig(seed=2, turns=2, faults=1, mix=("outage-stall",), outage_seconds=OUTAGE)
    report = await run_chaos(config, stock=False)
    resilient = report.resilient
    assert resilient.lost == [] and resilient.repeated == [] and resilient.unheard_in_context == []
    assert resilient.heard_not_in_context == [] and resilient.errors == 0
    assert resilient.switches == [] and resilient.time_on_fallback == 0
    [outage] = resilient.outages
    [turn] = [t for t in resilient.turns if t.fault == "outage-stall"]
    assert turn.fault_at is not None and turn.recovered_at is not None and not turn.cut_off
    # The rest was said only once the provider was back.
    assert turn.recovered_at - turn.fault_at >= outage["lasted_s"]
    assert report.passed and "PASS" in format_table(report)
