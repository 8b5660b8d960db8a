"""ResilientSTT around the stock DeepgramSTTService and AssemblyAISTTService, against the emulators.

Every test drives the stock service over real sockets (127.0.0.1) in a real
pipeline (``recorder -> stt -> transcripts -> Pipecat's user aggregator``) and
asserts on what reached the final transcripts and the LLM context against what
the caller said: no word lost, none transcribed twice, each user turn whole.
The same faults cost the stock services 3 to 30 of 37 words
(``tests/test_emulator_deepgram_stt.py``, ``tests/test_emulator_assemblyai.py``).

The fault matrices run each provider's calls side by side, unpaced (audio as
fast as the pipeline takes it); the timing tests run in real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from loguru import logger
from pipecat.frames.frames import InputAudioRawFrame, STTMuteFrame, STTUpdateSettingsFrame
from pipecat.services.assemblyai.stt import AssemblyAISTTService
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.stt_service import STTService
from pipecat.turns.user_turn_strategies import ExternalUserTurnStrategies

from pipecat_resilient import ReplayFailed, RetryPolicy, State
from pipecat_resilient.failures import Failure
from pipecat_resilient.stt import ResilientSTT, STTRecoveryReport
from pipecat_resilient.testing import AssemblyAIEmulator, DeepgramSTTEmulator, Fault, FaultPlan
from pipecat_resilient.testing.stt_harness import Caller, Measurement, SaidWord, STTScenario, measure

from .conftest import UNIT

API_KEY = "test-key"
MS_PER_CHAR = 50
NO_WAIT = RetryPolicy(attempts=4, wait_initial=0.0, wait_max=0.0, timeout=100 * UNIT)
# Test timeouts, scaled from UNIT. A whole fault matrix runs side by side,
# unpaced, on one event loop: the finalize timeout is long enough not to take
# that load for a stall (the timing tests use the defaults, in real time).
OPTIONS: dict[str, Any] = {
    "stall_timeout": 15 * UNIT,
    "finalize_timeout": 10 * UNIT,
    "send_timeout": 15 * UNIT,
}
USER_SPEECH_TIMEOUT = 6 * UNIT
TIMEOUT = 150 * UNIT

CALL = [
    "I would like to book a table.",
    "For four people on Friday night.",
    "Around eight would be perfect.",
]


@dataclass(frozen=True)
class Provider:
    """A provider as these tests drive it: its emulator, its stock service, its audio message size."""

    name: str
    message_s: float  # seconds of audio per message the stock service sends

    def emulator(self, plan: FaultPlan, **options: Any) -> DeepgramSTTEmulator | AssemblyAIEmulator:
        if self.name == "deepgram":
            # Deepgram-like: finals of four words, so a drop cuts a group.
            return DeepgramSTTEmulator(
                plan=plan, api_key=API_KEY, ms_per_char=MS_PER_CHAR, words_per_final=4, **options
            )
        return AssemblyAIEmulator(plan=plan, api_key=API_KEY, ms_per_char=MS_PER_CHAR, **options)

    def factory(self, emulator: Any, **options: Any) -> Callable[[], STTService]:
        def make() -> STTService:
            if self.name == "deepgram":
                return DeepgramSTTService(api_key=API_KEY, base_url=emulator.url, **options)
            return AssemblyAISTTService(api_key=API_KEY, api_endpoint_base_url=emulator.ws_url, **options)

        return make


DEEPGRAM = Provider("deepgram", 0.02)  # one message per 20 ms frame
ASSEMBLYAI = Provider("assemblyai", 0.05)  # Pipecat sends 50 ms chunks
PROVIDERS = [DEEPGRAM, ASSEMBLYAI]


def word(caller: Caller, text: str, utterance: int) -> SaidWord:
    return next(w for w in caller.said if w.text == text and w.utterance == utterance)


def message_at(provider: Provider, t: float) -> int:
    """The audio message (1-based) of the first connection that carries call time ``t``."""
    return math.floor(t / provider.message_s) + 1


@dataclass
class Outcome:
    """What one call through a ResilientSTT did."""

    measurement: Measurement
    lost: list[Failure] = field(default_factory=list)
    recovered: list[STTRecoveryReport] = field(default_factory=list)
    recovered_at: list[float] = field(default_factory=list)
    fault_at: float | None = None
    reopened_at: float | None = None
    queries: list[dict[str, str]] = field(default_factory=list)
    turns: tuple[int, int] = (0, 0)
    interims: list[str] = field(default_factory=list)
    audio_frames: tuple[int, int] = (0, 0)  # (caller frames sent, frames that went downstream)


async def call(
    provider: Provider,
    plan: FaultPlan,
    caller: Caller,
    *,
    pace: float | None = None,
    stt_options: dict[str, Any] | None = None,
    service_options: dict[str, Any] | None = None,
    scenario_options: dict[str, Any] | None = None,
    emulator_options: dict[str, Any] | None = None,
    during: Callable[[STTScenario, Any], Any] | None = None,
) -> Outcome:
    """Say ``caller``'s call through a ResilientSTT around the stock service, against ``plan``."""
    options = {**OPTIONS, **(stt_options or {})}
    async with provider.emulator(plan, **(emulator_options or {})) as emulator:
        stt = ResilientSTT(provider.factory(emulator, **(service_options or {})), retry=NO_WAIT, **options)
        outcome = Outcome(measurement=None)  # type: ignore[arg-type]

        async def on_lost(processor: ResilientSTT, failure: Failure) -> None:
            outcome.lost.append(failure)

        async def on_recovered(processor: ResilientSTT, report: STTRecoveryReport) -> None:
            outcome.recovered.append(report)
            outcome.recovered_at.append(time.monotonic())

        stt.add_event_handler("on_connection_lost", on_lost)
        stt.add_event_handler("on_connection_recovered", on_recovered)

        run = STTScenario(stt, **{"user_speech_timeout": USER_SPEECH_TIMEOUT, **(scenario_options or {})})
        await run.start()
        try:
            if during is None:
                # Unpaced, an utterance waits for the turn before it to end: long
                # enough for a stall to be noticed and recovered on a loaded machine.
                await run.speak(caller, pace=pace, turn_timeout=60 * UNIT)
            else:
                await during(run, emulator)
            await run.settle(
                lambda: len(run.user_messages) >= len(caller.utterances) and not run.lost(caller),
                idle=10 * UNIT,
                limit=TIMEOUT,
            )
            sent = sum(1 for cue in caller.cues() if cue.kind == "audio") if during is None else -1
            if sent > 0:
                # The last frames may still be on their way down the pipeline.
                with contextlib.suppress(TimeoutError):
                    await run.wait_until(
                        lambda: (
                            run.transcripts.audio_frames >= sent
                            and run.turns_stopped >= len(caller.utterances)
                        ),
                        20 * UNIT,
                    )
            outcome.measurement = measure(run, caller, emulator)
            outcome.turns = (run.turns_started, run.turns_stopped)
            outcome.interims = run.interim_texts
            outcome.audio_frames = (sent, run.transcripts.audio_frames)
            faulted = next((r for r in emulator.connections if r.fault_at is not None), None)
            if faulted is not None:
                outcome.fault_at = faulted.fault_at
                later = [r for r in emulator.connections[faulted.index + 1 :] if r.refused is None]
                outcome.reopened_at = later[0].opened_at if later else None
            outcome.queries = [record.query for record in emulator.streams]
            await run.end()
        finally:
            await run.cancel()
            await emulator.stop()
    return outcome


def assert_whole(outcome: Outcome, caller: Caller) -> None:
    """No word lost, none twice, each utterance one user message, no error upstream."""
    m = outcome.measurement
    assert m.lost == ()
    assert m.extra == ()
    assert m.user_messages == caller.utterances
    assert m.errors == ()
    assert outcome.turns == (len(caller.utterances), len(caller.utterances))
    sent, downstream = outcome.audio_frames
    assert sent in (-1, downstream)  # every frame of the caller's audio went on once, replays or not


# ----------------------------------------------------------------------
# Every fault kind, both providers
# ----------------------------------------------------------------------


def _faults(provider: Provider) -> dict[str, tuple[FaultPlan, Caller]]:
    """Each fault kind, at a place in the call, for ``provider``."""
    caller = Caller(CALL, ms_per_char=MS_PER_CHAR)
    silent = Caller(CALL, ms_per_char=MS_PER_CHAR, pause=3.0)
    # After "For four" and mid-"people": the dying connection heard words it had not finalized.
    mid = message_at(provider, word(caller, "people", 1).start + 0.1)
    mid_word = message_at(provider, (word(caller, "Friday", 1).start + word(caller, "Friday", 1).end) / 2)
    between = message_at(provider, word(caller, "night.", 1).end + 0.4)  # after the VAD stop
    quiet = message_at(provider, word(silent, "night.", 1).end + 1.5)  # 1.5 s into 3 s of silence
    error_code = 1011 if provider is DEEPGRAM else 3005
    return {
        "close 1000": (FaultPlan(Fault.close(1000, after_audio_received=mid)), caller),
        "close 1011": (FaultPlan(Fault.close(1011, "NET-0000", after_audio_received=mid)), caller),
        "abort": (FaultPlan(Fault.abort(after_audio_received=mid)), caller),
        "stall": (FaultPlan(Fault.stall(after_audio_received=mid)), caller),
        "refused 429": (
            FaultPlan(Fault.close(1011, after_audio_received=mid), Fault.refuse(429, connection=1)),
            caller,
        ),
        "refused 503": (
            FaultPlan(Fault.close(1011, after_audio_received=mid), Fault.refuse(503, connection=1)),
            caller,
        ),
        "drop mid-word": (FaultPlan(Fault.close(1011, after_audio_received=mid_word)), caller),
        "drop between turns": (FaultPlan(Fault.abort(after_audio_received=between)), caller),
        "drop while silent": (FaultPlan(Fault.close(1011, after_audio_received=quiet)), silent),
        "provider error": (
            FaultPlan(Fault.error("internal server error", error_code, after_audio_received=mid)),
            caller,
        ),
    }


FAULT_KINDS = list(_faults(DEEPGRAM))


async def _run_matrix() -> dict[str, dict[str, Outcome]]:
    jobs = [(p, kind, plan, caller) for p in PROVIDERS for kind, (plan, caller) in _faults(p).items()]
    outcomes = await asyncio.gather(*(call(p, plan, caller) for p, _, plan, caller in jobs))
    matrix: dict[str, dict[str, Outcome]] = {p.name: {} for p in PROVIDERS}
    for (p, kind, _, _), outcome in zip(jobs, outcomes, strict=True):
        matrix[p.name][kind] = outcome
    return matrix


@pytest.fixture(scope="module")
def matrix() -> dict[str, dict[str, Outcome]]:
    """Every fault kind for both providers, all the calls side by side."""
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    return asyncio.run(_run_matrix())


@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS])
@pytest.mark.parametrize("fault", FAULT_KINDS)
def test_no_word_is_lost_or_repeated(
    matrix: dict[str, dict[str, Outcome]], provider: str, fault: str
) -> None:
    """Under each fault: every word once, each turn whole in the context, one recovery, no error upstream."""
    outcome = matrix[provider][fault]
    caller = Caller(CALL, ms_per_char=MS_PER_CHAR, pause=3.0 if fault == "drop while silent" else 0.6)
    assert_whole(outcome, caller)
    assert len(outcome.lost) == 1 and len(outcome.recovered) == 1
    handshakes = outcome.measurement.handshakes
    if fault.startswith("refused"):
        assert handshakes == (None, int(fault[-3:]), None)
    else:
        assert handshakes == (None, None)


@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS])
def test_words_the_dead_connection_had_not_finalized_were_replayed(
    matrix: dict[str, dict[str, Outcome]], provider: str
) -> None:
    """The faults mid-utterance took words the dying connection had heard and not finalized; all came back."""
    outcome = matrix[provider]["close 1011"]
    assert "four" in outcome.measurement.dropped  # heard by the first connection, never final there
    assert outcome.recovered[0].replayed_audio_s > 0.3
    # Only the audio not final was sent again: not the call from the start.
    assert outcome.recovered[0].replayed_audio_s < 3.0


@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS])
def test_a_drop_while_the_caller_is_silent_replays_no_speech(
    matrix: dict[str, dict[str, Outcome]], provider: str
) -> None:
    """Silence after finalized speech is not held: a drop in it replays none of what was said before."""
    silent = Caller(CALL, ms_per_char=MS_PER_CHAR, pause=3.0)
    report = matrix[provider]["drop while silent"].recovered[0]
    assert report.replay_from_s > word(silent, "night.", 1).end


@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS])
def test_failures_are_classified(matrix: dict[str, dict[str, Outcome]], provider: str) -> None:
    """Each failure is named for what it was: the close code, the stall, the provider's error message."""
    outcomes = matrix[provider]
    assert "close 1000" in outcomes["close 1000"].lost[0].description
    assert "close 1011" in outcomes["close 1011"].lost[0].description
    assert "1006" in outcomes["abort"].lost[0].description
    assert "provider" in outcomes["stall"].lost[0].description
    assert f"{'Deepgram' if provider == 'deepgram' else 'AssemblyAI'} Error" in (
        outcomes["provider error"].lost[0].description
    )


# ----------------------------------------------------------------------
# In real time: recovery times, stalls with the default timeouts, turns
# ----------------------------------------------------------------------


# A long first utterance: a stall in it is caught while the caller still
# speaks; then one whose stall comes at its very end. Every real-time call
# says it, so that they are all in the same place at the same time.
STALL_CALL = [
    "I would like to book a table for four people on Friday night at eight.",
    "Thank you so much.",
]
DEFAULTS = {"stall_timeout": 2.0, "finalize_timeout": 0.5, "send_timeout": 2.0}
PROVIDER_TURNS_CALL = CALL


def _stall_caller() -> Caller:
    return Caller(STALL_CALL, ms_per_char=MS_PER_CHAR, pause=1.5)


_timed_caller = _stall_caller


def _real_time_jobs() -> dict[tuple[str, str], Any]:
    """Every real-time call, by (provider, case)."""
    jobs: dict[tuple[str, str], Any] = {}
    # Each close or abort in a word of its own, so no two recoveries overlap,
    # and all of them while everyone is still speaking: before the stalls'
    # recoveries and any turn's end (whose bursts load the machine a moment).
    words = iter(
        word(_timed_caller(), text, 0) for text in ("would", "like", "book", "table", "for", "people")
    )
    for p in PROVIDERS:
        drops = [message_at(p, (w.start + w.end) / 2) for w in (next(words), next(words), next(words))]
        for kind, fault in (
            ("close 1000", Fault.close(1000, after_audio_received=drops[0])),
            ("close 1011", Fault.close(1011, after_audio_received=drops[1])),
            ("abort", Fault.abort(after_audio_received=drops[2])),
        ):
            jobs[(p.name, kind)] = call(
                p, FaultPlan(fault), _timed_caller(), pace=1.0, scenario_options={"user_speech_timeout": 0.6}
            )
        caller = _stall_caller()
        for case, at in (
            ("stall while speaking", word(caller, "four", 0).end),
            # After "Thank you so" was shown, before "much." was: at the end of the turn.
            ("stall at the end of a turn", word(caller, "much.", 1).start + 0.05),
        ):
            jobs[(p.name, case)] = call(
                p,
                FaultPlan(Fault.stall(after_audio_received=message_at(p, at))),
                caller,
                pace=1.0,
                stt_options=DEFAULTS,
                scenario_options={"user_speech_timeout": 0.6},
            )
    owned = Caller(PROVIDER_TURNS_CALL, ms_per_char=MS_PER_CHAR, pause=1.6)
    jobs[("assemblyai", "provider-owned turns")] = call(
        ASSEMBLYAI,
        FaultPlan(
            Fault.close(
                1011, after_audio_received=message_at(ASSEMBLYAI, word(owned, "people", 1).start + 0.1)
            )
        ),
        owned,
        pace=2.0,
        service_options={"vad_force_turn_endpoint": False},
        scenario_options={"user_turn_strategies": ExternalUserTurnStrategies()},
    )
    return jobs


@pytest.fixture(scope="module")
def real_time() -> dict[tuple[str, str], Outcome]:
    """Every real-time call: one provider's side by side, then the other's.

    They are paced, but all of them at once kept one core about three quarters
    busy (every pipeline and emulator shares this process's event loop), and a
    moment's stall of a shared machine then made every call late at once.
    """
    logger.remove()
    logger.add(sys.stderr, level="ERROR")

    async def run_all() -> dict[tuple[str, str], Outcome]:
        jobs = _real_time_jobs()
        outcomes: dict[tuple[str, str], Outcome] = {}
        for provider in PROVIDERS:
            batch = {key: job for key, job in jobs.items() if key[0] == provider.name}
            results = await asyncio.gather(*batch.values())
            outcomes.update(zip(batch, results, strict=True))
        return outcomes

    return asyncio.run(run_all())


# Closes and aborts are recovered within this of the fault: detection, a
# fresh instance, the emulator's connect, and the replay sent. The target (50
# ms on top of the connect) is measured by benchmarks/stt_recovery.py (p50 6-8
# ms, p95 8-11 ms); 7 to 40 ms here (up to six real-time calls side by side on 2
# cores), but a loaded CI machine once took 200 ms. This bound only tells a
# prompt reconnect from the stock services' (4 s of backoff, or never).
RECOVERY_BOUND_S = 1.0


@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS])
@pytest.mark.parametrize("kind", ["close 1000", "close 1011", "abort"])
def test_closes_and_aborts_are_recovered_within_one_connect(
    real_time: dict[tuple[str, str], Outcome], provider: str, kind: str
) -> None:
    """The fresh connection is open and replayed into within tens of ms of the fault (stock: 4 s, never)."""
    outcome = real_time[(provider, kind)]
    assert_whole(outcome, _timed_caller())
    assert outcome.fault_at is not None and outcome.reopened_at is not None
    assert outcome.reopened_at - outcome.fault_at < RECOVERY_BOUND_S
    assert outcome.recovered_at[0] - outcome.fault_at < RECOVERY_BOUND_S


@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS])
@pytest.mark.parametrize(
    ("case", "rule"),
    [("stall while speaking", "after the caller spoke"), ("stall at the end of a turn", "finalize")],
)
def test_a_stalled_stream_is_recovered_within_two_and_a_half_seconds(
    real_time: dict[tuple[str, str], Outcome], provider: str, case: str, rule: str
) -> None:
    """With the default timeouts, a stream that goes quiet is recovered within 2.5 s, the turn kept whole.

    While the caller speaks, 2 s without a message gives it away; at the end
    of a turn, words shown and not finalized 0.5 s after the VAD stop's
    finalize request do, in time for the aggregator's 0.6 s.
    """
    outcome = real_time[(provider, case)]
    assert_whole(outcome, _stall_caller())
    assert outcome.fault_at is not None
    assert outcome.recovered_at[0] - outcome.fault_at < 2.5
    assert rule in outcome.lost[0].description
    assert len(outcome.lost) == 1


def test_a_drop_mid_turn_with_provider_owned_turns_keeps_the_turn_whole(
    real_time: dict[tuple[str, str], Outcome],
) -> None:
    """AssemblyAI owning turn detection (Universal-3 Pro): a drop mid-turn neither ends nor holds it."""
    outcome = real_time[("assemblyai", "provider-owned turns")]
    assert_whole(outcome, Caller(PROVIDER_TURNS_CALL, ms_per_char=MS_PER_CHAR, pause=1.6))
    assert len(outcome.recovered) == 1
    assert "min_turn_silence" not in outcome.queries[0]  # the provider's own turn detection


async def test_a_replay_from_inside_the_last_word_of_a_final_turn_repeats_none_of_it() -> None:
    """The case above, with the final of the first turn placed after the next VAD start.

    AssemblyAI ends a turn after 1.28 s of silence (its default with provider-owned turns); the caller
    speaks again 1.3 s after "table.". The 50 ms chunk whose silence ends the turn goes out with the
    frame after the VAD start, so the final comes back while the caller speaks: what is final ends
    with "table.", 10 ms into a 20 ms frame, and a drop in "people" replays from that frame (margin 0).
    The fresh connection hears the last 10 ms of "." before its silence: a tail of a final word, which
    is not transcribed again (the emulator once timed it as a whole character, and "." came out as a
    turn of its own; the real-time case above hit it when the final came back late).
    """
    caller = Caller(CALL[:2], ms_per_char=MS_PER_CHAR, pause=1.3)
    drop = message_at(ASSEMBLYAI, word(caller, "people", 1).start + 0.1)
    outcome = await call(
        ASSEMBLYAI,
        FaultPlan(Fault.close(1011, after_audio_received=drop)),
        caller,
        pace=2.0,
        service_options={"vad_force_turn_endpoint": False},
        scenario_options={"user_turn_strategies": ExternalUserTurnStrategies()},
    )
    assert_whole(outcome, caller)
    (report,) = outcome.recovered
    table = word(caller, "table.", 0)
    assert table.start < report.replay_from_s < table.end  # the replay started inside "table."


# ----------------------------------------------------------------------
# A connection that dies after the VAD stop, a replacement that never answers
# ----------------------------------------------------------------------


async def test_a_turn_is_not_ended_before_the_words_a_dying_connection_owed_are_recovered() -> None:
    """The connection goes half-open after finalizing four words, before the VAD stop reached it: the
    stop waits until the replacement finalized the rest, so the turn is not committed in two halves.

    The aggregator had text and would end the turn user_speech_timeout (0.6 s) after the stop; the
    stall is found out 1 to 1.5 s after it (the test timeouts).
    """
    caller = Caller(CALL[:1], ms_per_char=MS_PER_CHAR)  # "I would like to book a table."
    stall = message_at(DEEPGRAM, word(caller, "book", 0).start + 0.05)
    outcome = await call(DEEPGRAM, FaultPlan(Fault.stall(after_audio_received=stall)), caller)
    assert_whole(outcome, caller)
    assert outcome.interims and len(outcome.lost) == 1 and len(outcome.recovered) == 1
    assert outcome.measurement.dropped == ()  # the stalled connection had finalized "I would like to"
    assert outcome.fault_at is not None and outcome.recovered_at[0] - outcome.fault_at > USER_SPEECH_TIMEOUT


async def test_the_pipeline_ends_with_every_word_when_the_connection_is_half_open_at_its_end() -> None:
    """The EndFrame follows the caller's last words into a half-open socket: once the stall is found
    out, the fresh connection gets the words not final and the EndFrame, finalizes them, and the
    pipeline ends (it is not left waiting for an EndFrame the dead instance never passed on)."""
    caller = Caller(CALL[:1], ms_per_char=MS_PER_CHAR)
    stall = message_at(DEEPGRAM, word(caller, "book", 0).start + 0.05)
    async with DEEPGRAM.emulator(FaultPlan(Fault.stall(after_audio_received=stall))) as emulator:
        stt = ResilientSTT(DEEPGRAM.factory(emulator), retry=NO_WAIT, **OPTIONS)
        run = STTScenario(stt, user_speech_timeout=USER_SPEECH_TIMEOUT)
        await run.start()
        try:
            await run.speak(caller)
            await run.end(timeout=TIMEOUT)
        finally:
            await run.cancel()
            await emulator.stop()
    assert run.final_words == caller.words
    assert run.errors == []


@pytest.mark.parametrize("provider", PROVIDERS, ids=[p.name for p in PROVIDERS])
async def test_a_half_open_replacement_is_found_out_while_the_caller_is_silent(provider: Provider) -> None:
    """The provider is down: the replacement's handshake completes, then it never says a word (not even
    AssemblyAI's Begin). The replay sent it speech not final after the caller had stopped: its silence
    gives it away as the caller's would, and the next connection transcribes the turn, whole."""
    caller = Caller(CALL[:1], ms_per_char=MS_PER_CHAR)
    stall = message_at(provider, word(caller, "book", 0).start + 0.05)

    async def during(run: STTScenario, emulator: Any) -> None:
        # Connections open now are left alone; the next ones are half-open until restore().
        emulator.outage("stall", drop_existing=False)
        await run.speak(caller)
        await emulator.wait_for_connections(2, TIMEOUT)
        emulator.restore()
        # Not over until the turn is: the second stall is found out 1.5 s after the replay.
        await run.wait_until(lambda: bool(run.user_messages), TIMEOUT)

    outcome = await call(
        provider,
        FaultPlan(Fault.stall(after_audio_received=stall)),
        caller,
        during=during,
        # The turn waits for two stalls to be found out (about 3 s): no bound on a loaded machine.
        stt_options={"stop_hold_timeout": TIMEOUT},
    )
    assert_whole(outcome, caller)
    first, second = outcome.lost
    assert "after the caller spoke" in second.description
    assert len(outcome.recovered) == 2
    assert outcome.measurement.handshakes == (None, None, None)


async def test_a_replacement_that_goes_quiet_after_answering_part_of_the_replay_is_found_out() -> None:
    """The first connection goes half-open at "book"; the caller finishes and is silent. Its replacement
    is sent the replay, answers its first words, then goes half-open too, before finalizing "book a
    table.". Deepgram's results say how far into the audio they reach, so the replay's speech stays
    owed: the stall watchdog finds the replacement out stall_timeout after its last message, although
    the caller says nothing more (the finalize watchdog, made too slow to matter here, is not needed).
    Without it, the turn waits for the caller's next words, and is committed with the next turn's."""
    caller = Caller(CALL[:1], ms_per_char=MS_PER_CHAR)  # "I would like to book a table."
    stall = message_at(DEEPGRAM, word(caller, "book", 0).start + 0.05)
    # The replay starts before "book" (near the end of "I would like to", final): stall the replacement
    # once it has received audio past "a", whichever way the replay was cut.
    into_replay = message_at(DEEPGRAM, word(caller, "table.", 0).start) - message_at(
        DEEPGRAM, word(caller, "to", 0).start
    )
    plan = FaultPlan(
        Fault.stall(after_audio_received=stall),
        Fault.stall(after_audio_received=into_replay, connection=1),
    )

    async def during(run: STTScenario, emulator: Any) -> None:
        await run.speak(caller)
        # Not over until the turn is: the second stall is found out 1.5 s after its last message.
        await run.wait_until(lambda: bool(run.user_messages), TIMEOUT)

    outcome = await call(
        DEEPGRAM,
        plan,
        caller,
        during=during,
        stt_options={"finalize_timeout": TIMEOUT, "stop_hold_timeout": TIMEOUT},
    )
    assert_whole(outcome, caller)
    assert outcome.interims  # words were shown before being finalized (the stalls cut groups)
    assert len(outcome.lost) == 2 and len(outcome.recovered) == 2
    assert all("after the caller spoke" in failure.description for failure in outcome.lost)


# ----------------------------------------------------------------------
# Giving up, settings, mute, the bound
# ----------------------------------------------------------------------


async def test_a_permanent_refusal_gives_up_once_and_audio_keeps_flowing() -> None:
    """A 401 on the reconnect: one ErrorFrame saying how much audio went untranscribed; audio still flows."""
    caller = Caller(CALL[:2], ms_per_char=MS_PER_CHAR)
    drop = message_at(DEEPGRAM, word(caller, "people", 1).start + 0.1)
    plan = FaultPlan(Fault.close(1011, after_audio_received=drop), Fault.refuse(401, connection=1))
    given_up: list[ReplayFailed] = []

    async def during(run: STTScenario, emulator: Any) -> None:
        stt = run.stt
        assert isinstance(stt, ResilientSTT)
        stt.add_event_handler("on_connection_given_up", lambda p, error: given_up.append(error))
        await run.speak(caller)
        await run.wait_until(lambda: bool(given_up), TIMEOUT)
        assert stt.state is State.FAILED
        await run.send(InputAudioRawFrame(audio=bytes(640), sample_rate=16000, num_channels=1))
        sent = sum(1 for cue in caller.cues() if cue.kind == "audio") + 1
        await run.wait_until(lambda: run.transcripts.audio_frames == sent, TIMEOUT)
        assert stt.journal.held_s == 0.0  # passed on untranscribed, not held

    outcome = await call(DEEPGRAM, plan, caller, during=during)
    [error] = given_up
    assert error.reason == "authentication" and error.attempts == 1
    assert error.lost is not None and "s of caller audio not transcribed" in error.lost
    [frame] = outcome.measurement.errors
    assert "authentication" in frame
    assert outcome.measurement.user_messages[0] == CALL[0]


async def test_settings_apply_to_the_live_instance_and_to_fresh_ones() -> None:
    """A model change reconnects Deepgram as a planned change (no word lost); the next instance keeps it."""
    caller = Caller(CALL[:3], ms_per_char=MS_PER_CHAR)
    # The third connection (the planned one is the second) drops mid "eight".
    plan = FaultPlan(Fault.close(1011, after_audio_received=30, connection=1))

    async def during(run: STTScenario, emulator: Any) -> None:
        first = Caller(CALL[:1], ms_per_char=MS_PER_CHAR)
        await run.speak(first)
        await run.wait_until(lambda: len(run.user_messages) == 1, TIMEOUT)
        await run.send(STTUpdateSettingsFrame(delta=DeepgramSTTService.Settings(model="nova-2-general")))
        rest = Caller(CALL[1:3], ms_per_char=MS_PER_CHAR)
        await run.speak(rest)

    outcome = await call(DEEPGRAM, plan, caller, during=during)
    m = outcome.measurement
    assert m.lost == () and m.extra == () and m.errors == ()
    assert m.user_messages == caller.utterances
    models = [query["model"] for query in outcome.queries]
    assert models == ["nova-3-general", "nova-2-general", "nova-2-general"]
    assert len(outcome.lost) == 1  # the drop, not the planned reconnect


async def test_mute_holds_across_a_drop() -> None:
    """Audio said while muted is not transcribed by the fresh instance either."""
    caller = Caller(CALL[:2], ms_per_char=MS_PER_CHAR)
    plan = FaultPlan(Fault.close(1011, after_audio_received=10, connection=0))

    async def during(run: STTScenario, emulator: Any) -> None:
        await run.send(STTMuteFrame(mute=True))
        muted = Caller(["Nobody should hear this."], ms_per_char=MS_PER_CHAR)
        for cue in muted.cues():
            if cue.kind == "audio":
                await run.send(cue.frame(muted.sample_rate))
        await run.send(STTMuteFrame(mute=False))
        await run.speak(caller)

    outcome = await call(DEEPGRAM, plan, caller, during=during)
    m = outcome.measurement
    assert m.lost == () and m.extra == ()
    assert m.user_messages == caller.utterances


async def test_audio_held_over_the_bound_is_dropped_oldest_first_with_a_warning() -> None:
    """A provider that finalizes nothing: the oldest audio goes first, and a warning says how much."""
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    caller = Caller(["one two three four five six seven eight nine ten"], ms_per_char=MS_PER_CHAR)
    try:

        async def during(run: STTScenario, emulator: Any) -> None:
            for cue in caller.cues():
                if cue.kind == "audio":  # no VAD stop: no finalize, and the lag holds every word
                    await run.send(cue.frame(caller.sample_rate))
            stt = run.stt
            assert isinstance(stt, ResilientSTT)
            await run.wait_until(lambda: stt.journal.position >= caller.duration - 1e-6, TIMEOUT)
            assert stt.journal.held_s <= 1.0 + 1e-6

        await call(
            DEEPGRAM,
            FaultPlan(),
            caller,
            during=during,
            stt_options={"max_buffered_audio_s": 1.0},
            emulator_options={"lag": 100.0},
        )
    finally:
        logger.remove(sink)
    warnings = [line for line in lines if "dropped the oldest" in line]
    assert warnings and "possibly speech" in warnings[0]


def test_configuration_is_validated() -> None:
    """Timeouts must be positive seconds; the margin must fit in the bound."""
    make = DEEPGRAM.factory(type("E", (), {"url": "ws://127.0.0.1:9"})())
    with pytest.raises(ValueError, match="stall_timeout"):
        ResilientSTT(make, stall_timeout=0)
    with pytest.raises(ValueError, match="replay_margin"):
        ResilientSTT(make, replay_margin=-0.1)
    with pytest.raises(TypeError):
        ResilientSTT(lambda: object())  # type: ignore[arg-type, return-value]
    stt = ResilientSTT(make)
    assert stt.adapter == "deepgram" and stt.journal.replay_margin_s == pytest.approx(0.2)


# ----------------------------------------------------------------------
# Which provider errors are permanent
# ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "verdict", "category"),
    [
        (
            {"variant": "InternalServerError", "description": "model failure", "code": "1011"},
            "transient",
            "server",
        ),
        ({"variant": "SchemaError", "description": "could not parse"}, "suspect", "invalid_request"),
        ({"variant": "Error", "description": "nope", "code": "401"}, "permanent", "authentication"),
        ({"variant": "Error", "description": "insufficient credits"}, "permanent", "quota"),
        ({"variant": "Error", "description": "slow down", "code": "429"}, "transient", "rate_limit"),
    ],
)
def test_deepgram_error_messages_are_classified(message: dict[str, str], verdict: str, category: str) -> None:
    """Deepgram's Error message: its own trouble is retried, a bad request once, credentials never."""
    from pipecat_resilient._stt_adapters import deepgram_error

    failure = deepgram_error(type("ListenV1Error", (), message)())
    assert (failure.verdict.value, failure.category) == (verdict, category)


@pytest.mark.parametrize(
    ("code", "text", "verdict", "category"),
    [
        (3005, "Session Cancelled: An error occurred", "transient", "server"),
        (3008, "Session Expired: Maximum session duration exceeded", "transient", "connectivity"),
        (3009, "Unauthorized Connection: Too many concurrent sessions", "transient", "rate_limit"),
        (1008, "Unauthorized Connection: Too many concurrent sessions", "transient", "rate_limit"),
        (1008, "Unauthorized Connection: Missing Authorization header", "permanent", "authentication"),
        (
            3007,
            "Audio Transmission Rate Exceeded: Received 3 sec. audio in 1 sec",
            "suspect",
            "invalid_request",
        ),
        (3006, "Invalid Message Type: foo", "suspect", "invalid_request"),
        (4001, "Not Authorized", "permanent", "authentication"),
        (4002, "Insufficient Funds", "permanent", "quota"),
    ],
)
def test_assemblyai_error_messages_are_classified(code: int, text: str, verdict: str, category: str) -> None:
    """AssemblyAI's Error message: an expired or busy session is retried; credentials and funds never."""
    from pipecat_resilient._stt_adapters import assemblyai_error

    failure = assemblyai_error({"type": "Error", "error_code": code, "error": text})
    assert (failure.verdict.value, failure.category) == (verdict, category)
    assert failure.code == code
