"""Fallback chains: ResilientTTS moves the unheard text to the next provider, and back.

ElevenLabs is the primary and Cartesia the fallback, each a stock Pipecat
service against its own emulator over a real socket. The assertions are on
what a listener heard (decoded from the audio), what the LLM context
recorded, which provider was given which text, and the events raised.
"""

from __future__ import annotations

from typing import Any

import pytest
from pipecat.frames.frames import TTSSpeakFrame

from pipecat_resilient import (
    BreakerPolicy,
    Health,
    LocalHealthStore,
    ReplayFailed,
    ResilientTTS,
    RetryPolicy,
    State,
)
from pipecat_resilient.testing import Fault, FaultPlan, Scenario
from pipecat_resilient.testing.kits import tts_kit

from .conftest import NO_WAIT, SAMPLE_RATE, UNIT, Provider
from .test_tts import SECOND, SENTENCE, TURN, TURN_TOKENS, spoken_on, turn, words

PRIMARY = Provider("elevenlabs", tts_kit("elevenlabs"))
BACKUP = Provider("cartesia", tts_kit("cartesia"), emulator_options={"timestamps": "after"})

# The primary is down from its second connection on.
OUTAGE = [Fault.refuse(503, connection=index) for index in range(1, 40)]


def chain(
    primary: Any, backup: Any, *, store: LocalHealthStore | None = None, **options: Any
) -> ResilientTTS:
    """A ResilientTTS over the primary emulator, falling back on the backup's."""
    return ResilientTTS(
        PRIMARY.factory(primary),
        fallbacks=[BACKUP.factory(backup)],
        health=store if store is not None else LocalHealthStore(),
        retry=NO_WAIT,
        first_audio_timeout=3 * UNIT,
        stall_timeout=3 * UNIT,
        **options,
    )


def heard_all(run: Scenario, *texts: str, utterances: int) -> bool:
    return len(run.heard) >= len(words(*texts)) and run.listener.stopped >= utterances


def record_switches(tts: ResilientTTS, run: Scenario) -> list[tuple[str, str, str]]:
    switches: list[tuple[str, str, str]] = []

    @tts.event_handler("on_provider_switched")
    async def switched(processor: Any, old: str, new: str, reason: str) -> None:
        switches.append((old, new, reason))
        await run.notify()

    return switches


async def test_an_outage_mid_answer_moves_the_unheard_rest_to_the_fallback() -> None:
    """Primary dropped mid-turn and refusing: the fallback says the rest, from the first unheard word."""
    plan = FaultPlan(Fault.abort(after_audio_chunks=4), *OUTAGE)
    async with PRIMARY.emulator(plan) as primary, BACKUP.emulator() as backup:
        tts = chain(primary, backup)
        run = Scenario(tts, spc=primary.samples_per_char(SAMPLE_RATE))
        switches = record_switches(tts, run)
        await run.start()
        await run.send(*turn(TURN_TOKENS))
        await run.wait_until(lambda: len(run.heard) >= len(words(TURN)) and run.listener.stopped >= 1, 10.0)
        await run.end()
        assert run.heard == words(TURN)
        assert run.context_words == words(TURN)
        assert run.errors == []
        assert [(old, new) for old, new, _ in switches] == [("ElevenLabsTTSService", "CartesiaTTSService")]
        assert tts.provider_name == "CartesiaTTSService"
        # The fallback was given only what nobody had heard, from a word.
        said = " ".join(text for connection in spoken_on(backup) for _, text in connection.texts)
        assert said.split() and TURN.endswith(" ".join(said.split()))
        assert len(said.split()) < len(words(TURN))
        # One reconnect was tried on the primary (refused), then the chain moved on.
        assert len(primary.connections) == 2


async def test_a_permanent_failure_moves_on_and_opens_the_providers_breaker() -> None:
    """A bad key at the reconnect: no retry on that provider; its breaker opens at once."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=4), Fault.refuse(401, connection=1))
    store = LocalHealthStore(policy=BreakerPolicy(failures=5))
    async with PRIMARY.emulator(plan) as primary, BACKUP.emulator() as backup:
        tts = chain(primary, backup, store=store, switch_after=3)
        run = Scenario(tts, spc=primary.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.wait_until(
            lambda: len(run.heard) >= len(words(SENTENCE)) and run.listener.stopped >= 1, 10.0
        )
        await run.end()
        assert run.heard == words(SENTENCE)
        assert run.errors == []
        assert len(primary.connections) == 2  # switch_after=3, but a 401 is not retried
        assert await store.state("ElevenLabsTTSService") is Health.OPEN
        assert await store.state("CartesiaTTSService") is Health.CLOSED


async def test_a_chain_exhausted_end_to_end_gives_up_once_naming_the_unheard_text() -> None:
    """Both providers down: one ErrorFrame, not usable, the unheard text named."""
    plan = FaultPlan(Fault.abort(after_audio_chunks=4), *OUTAGE)
    backup_plan = FaultPlan(*[Fault.refuse(503, connection=index) for index in range(40)])
    async with PRIMARY.emulator(plan) as primary, BACKUP.emulator(backup_plan) as backup:
        tts = chain(primary, backup)
        given_up: list[ReplayFailed] = []

        @tts.event_handler("on_connection_given_up")
        async def gave_up(processor: Any, error: ReplayFailed) -> None:
            given_up.append(error)

        run = Scenario(tts, spc=primary.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.wait_until(lambda: bool(given_up), 10.0)
        await run.end()
        assert len(run.errors) == 1
        assert tts.state is State.FAILED and not tts.is_usable
        [error] = given_up
        assert error.unspoken and SENTENCE.endswith(error.unspoken[0].strip())
        assert run.heard + error.unspoken[0].split() == words(SENTENCE)
        assert len(backup.connections) >= 1


@pytest.mark.parametrize("switch_back", ["boundary", "never"])
async def test_the_preferred_provider_is_taken_back_at_a_boundary_unless_never(switch_back: str) -> None:
    """Once the primary's breaker lets a probe through and the connection works, the next utterance is
    spoken on the primary (``boundary``); with ``never`` the fallback keeps the session."""
    # Down for one reconnect only: the probe (a handshake, nothing billed) then works.
    plan = FaultPlan(Fault.abort(after_audio_chunks=4), Fault.refuse(503, connection=1))
    store = LocalHealthStore(policy=BreakerPolicy(failures=1, cooldown=0.05, cooldown_max=0.05))
    async with PRIMARY.emulator(plan) as primary, BACKUP.emulator() as backup:
        tts = chain(primary, backup, store=store, switch_back=switch_back)
        run = Scenario(tts, spc=primary.samples_per_char(SAMPLE_RATE))
        switches = record_switches(tts, run)
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.wait_until(
            lambda: len(run.heard) >= len(words(SENTENCE)) and run.listener.stopped >= 1, 10.0
        )
        if switch_back == "boundary":
            await run.wait_until(lambda: len(switches) == 2, 10.0)
            assert switches[1][:2] == ("CartesiaTTSService", "ElevenLabsTTSService")
            assert tts.provider_name == "ElevenLabsTTSService"
        await run.send(TTSSpeakFrame(SECOND))
        await run.wait_until(
            lambda: len(run.heard) >= len(words(SENTENCE, SECOND)) and run.listener.stopped >= 2, 10.0
        )
        await run.end()
        assert run.heard == words(SENTENCE, SECOND)
        assert run.context_words == words(SENTENCE, SECOND)
        assert run.errors == []
        second_on_primary = any(text.strip() == SECOND for c in spoken_on(primary) for _, text in c.texts)
        second_on_backup = any(text.strip() == SECOND for c in spoken_on(backup) for _, text in c.texts)
        assert second_on_primary == (switch_back == "boundary")
        assert second_on_backup == (switch_back == "never")
        if switch_back == "never":
            assert len(switches) == 1


async def test_a_provider_the_fleet_found_down_is_left_at_the_next_boundary() -> None:
    """Two bots share a health store; one finds the primary down: the other, idle on the primary,
    moves to the fallback before its next utterance without trying the primary."""
    store = LocalHealthStore(policy=BreakerPolicy(failures=1, cooldown=60.0))
    async with PRIMARY.emulator() as primary, BACKUP.emulator() as backup:
        tts = chain(primary, backup, store=store)
        run = Scenario(tts, spc=primary.samples_per_char(SAMPLE_RATE))
        switches = record_switches(tts, run)
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.wait_until(
            lambda: len(run.heard) >= len(words(SENTENCE)) and run.listener.stopped >= 1, 10.0
        )
        # Another bot of the fleet reports the primary down.
        await store.record_failure("ElevenLabsTTSService", permanent=False)
        await run.wait_until(lambda: len(switches) == 1, 10.0)
        assert switches[0][:2] == ("ElevenLabsTTSService", "CartesiaTTSService")
        connections = len(primary.connections)
        await run.send(TTSSpeakFrame(SECOND))
        await run.wait_until(
            lambda: len(run.heard) >= len(words(SENTENCE, SECOND)) and run.listener.stopped >= 2, 10.0
        )
        await run.end()
        assert run.heard == words(SENTENCE, SECOND)
        assert len(primary.connections) == connections
        assert any(text.strip() == SECOND for c in spoken_on(backup) for _, text in c.texts)


def test_bad_fallback_configuration_is_refused_at_construction() -> None:
    """Not a list, not callable, a bad policy word or count: clear errors before anything runs."""
    make = PRIMARY.kit.factory(type("E", (), {"url": "ws://127.0.0.1:9"})())
    with pytest.raises(TypeError, match="fallbacks must be a list"):
        ResilientTTS(make, fallbacks=make)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"fallbacks\[0\] must be a zero-argument callable"):
        ResilientTTS(make, fallbacks=["cartesia"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="switch_back"):
        ResilientTTS(make, fallbacks=[make], switch_back="sometimes")
    with pytest.raises(ValueError, match="switch_after"):
        ResilientTTS(make, fallbacks=[make], switch_after=0)
    with pytest.raises(TypeError, match="health must be a HealthStore"):
        ResilientTTS(make, health=object())  # type: ignore[arg-type]
    same = make()
    with pytest.raises(ValueError, match=r"fallbacks\[0\] returned the same"):
        ResilientTTS(make, fallbacks=[lambda: same])
    # The same provider twice is two providers of the chain, named apart.
    assert ResilientTTS(make, fallbacks=[make]).providers == [
        "ElevenLabsTTSService",
        "ElevenLabsTTSService#2",
    ]


async def test_every_provider_down_waits_out_the_outage_instead_of_spending_the_attempts() -> None:
    """Both providers refuse for a while: after trying each once the policy's waits apply, so the
    attempts last through the outage and the rest is said when one comes back (no ping-pong)."""
    async with (
        PRIMARY.emulator(FaultPlan(Fault.abort(after_audio_chunks=4))) as primary,
        BACKUP.emulator() as backup,
    ):
        tts = ResilientTTS(
            PRIMARY.factory(primary),
            fallbacks=[BACKUP.factory(backup)],
            health=LocalHealthStore(),
            retry=RetryPolicy(attempts=12, wait_initial=0.05, wait_max=0.2, jitter=False, timeout=20.0),
            first_audio_timeout=3 * UNIT,
            stall_timeout=3 * UNIT,
        )
        run = Scenario(tts, spc=primary.samples_per_char(SAMPLE_RATE))
        await run.start()
        backup.outage("refuse", seconds=1.0)
        primary.outage("refuse", seconds=1.0, drop_existing=False)
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.wait_until(
            lambda: (
                bool(run.errors) or (len(run.heard) >= len(words(SENTENCE)) and run.listener.stopped >= 1)
            ),
            10.0,
        )
        await run.end()
        assert run.errors == []
        assert run.heard == words(SENTENCE)
        assert run.context_words == words(SENTENCE)
        refused = sum(len(o.met) for o in primary.outages) + sum(len(o.met) for o in backup.outages)
        assert 2 <= refused < 12
