"""ResilientSTT around the stock DeepgramFluxSTTService, against the Flux emulator.

Flux owns turn detection and never answers a finalize request: what it has
committed is each ``EndOfTurn``. A 1011 close in the middle of a user turn,
in a real pipeline over real sockets (``recorder -> stt -> transcripts ->
Pipecat's user aggregator``, with the turn strategies the service recommends):
the turn that reaches the context is what was said, once, and the turns before
it are not transcribed again. The stock service, against the same fault, ends
the cut turn early with the words of its last Update and loses the word cut
by the drop (``tests/test_emulator_deepgram_flux.py``).
"""

from __future__ import annotations

import math
from typing import Any

from pipecat.services.deepgram.flux.stt import DeepgramFluxSTTService

from pipecat_resilient import RetryPolicy
from pipecat_resilient.failures import Failure
from pipecat_resilient.stt import ResilientSTT, STTRecoveryReport
from pipecat_resilient.testing import DeepgramFluxEmulator, Fault, FaultPlan
from pipecat_resilient.testing.stt_harness import Caller, STTScenario, measure

from .conftest import UNIT

API_KEY = "test-key"
MS_PER_CHAR = 50
TIMEOUT = 30 * UNIT
NO_WAIT = RetryPolicy(attempts=4, wait_initial=0.0, wait_max=0.0, timeout=100 * UNIT)
CALL = [
    "I would like to book a table.",
    "For four people on Friday night.",
    "Around eight would be perfect.",
]


async def test_a_1011_mid_turn_keeps_the_turn_whole_and_repeats_no_earlier_turn() -> None:
    """The socket closes 0.1 s into "people" (after Flux's Update "For four"), in the second turn.

    The dying instance does not end the turn with "For four"; the audio since the first turn's
    EndOfTurn is replayed into a fresh connection, which hears the second turn whole and nothing
    of the first.
    """
    caller = Caller(CALL, ms_per_char=MS_PER_CHAR, pause=1.6)
    people = next(w for w in caller.said if w.text == "people" and w.utterance == 1)
    fault = Fault.close(1011, after_audio_received=math.floor((people.start + 0.1) / 0.02) + 1)
    lost: list[Failure] = []
    recovered: list[STTRecoveryReport] = []
    async with DeepgramFluxEmulator(
        plan=FaultPlan(fault), api_key=API_KEY, ms_per_char=MS_PER_CHAR
    ) as emulator:
        stt = ResilientSTT(
            lambda: DeepgramFluxSTTService(api_key=API_KEY, url=emulator.ws_url), retry=NO_WAIT
        )

        async def on_lost(processor: Any, failure: Failure) -> None:
            lost.append(failure)

        async def on_recovered(processor: Any, report: STTRecoveryReport) -> None:
            recovered.append(report)

        stt.add_event_handler("on_connection_lost", on_lost)
        stt.add_event_handler("on_connection_recovered", on_recovered)
        run = STTScenario(stt, user_speech_timeout=0.6)
        await run.start()
        try:
            await run.speak(caller, pace=1.0, turn_timeout=TIMEOUT)
            await run.settle(
                lambda: len(run.user_messages) >= len(CALL) and not run.lost(caller),
                idle=3 * UNIT,
                limit=TIMEOUT,
            )
            m = measure(run, caller, emulator)
            finals, turns = run.final_texts, (run.turns_started, run.turns_stopped)
            await run.end()
        finally:
            await run.cancel()
    assert stt.adapter == "deepgram-flux"
    assert len(lost) == 1 and "1011" in lost[0].description and len(recovered) == 1
    # Every word once, each utterance one user message, one turn each.
    assert finals == CALL
    assert m.user_messages == tuple(CALL)
    assert m.lost == () and m.extra == () and m.errors == ()
    assert turns == (len(CALL), len(CALL))
    # The dead connection had committed the first turn and heard "For four" of the second; the
    # fresh one was given the audio from the first turn's EndOfTurn on, not the whole call.
    first, second = emulator.streams
    assert first.words_finalized == caller.utterance_words(0)
    assert first.words_dropped == ["For", "four"]
    assert second.words_finalized == caller.utterance_words(1) + caller.utterance_words(2)
    assert second.seconds_received < caller.duration - people.start + 2.0
