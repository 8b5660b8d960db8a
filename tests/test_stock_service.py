"""Why this package exists: the bare stock service under the same faults.

These tests pin down the stock behaviour measured in PROVIDERS.md against our
emulator. If Pipecat ever fixes it, they fail, and we want to know.
"""

from __future__ import annotations

from pipecat.frames.frames import TTSSpeakFrame

from pipecat_resilient.testing import ElevenLabsEmulator, Fault, FaultPlan

from .conftest import stock_factory
from .test_tts import SENTENCE, run_until_heard, words


async def test_stock_service_loses_the_rest_and_records_it_as_spoken() -> None:
    """A 1012 mid-sentence: stock Pipecat reconnects, never resends, and lies to the context."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=4))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        stock = stock_factory(emulator)()
        run = await run_until_heard(
            emulator, stock, [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1, timeout=1.0
        )
        # The listener heard the beginning only.
        assert len(run.heard) < len(words(SENTENCE)) / 2
        # The context holds the whole sentence, unheard words included.
        assert run.context_words == words(SENTENCE)
        # And nothing said so: no error, the new connection never got the text.
        assert run.errors == []
        assert len(emulator.connections) == 2
        assert emulator.connections[1].texts == []
        # The utterance was never closed downstream.
        assert run.listener.started == 1 and run.listener.stopped == 0
