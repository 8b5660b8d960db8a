"""The drop-in conformance suite for speech-to-text: the same bot code, stock service and ResilientSTT.

Each test is written once, as a Pipecat user writes a bot for the stock
service, and runs twice (``kind`` is ``"stock"`` or ``"resilient"``) against
the same emulator, asserting the same observable behaviour: Pipecat's
``TranscriptionLogObserver`` logs the processor's transcripts, metrics and the
service metadata name it, settings updates reach the provider, the stock
service's events fire with the processor as argument, and its properties read
the same. The last tests check the delegation surface against the installed
Pipecat: every public member of ``STTService`` is delegated by the wrapper or
deliberately left out.
"""

from __future__ import annotations

from typing import Any

import pytest
from loguru import logger
from pipecat.frames.frames import STTMetadataFrame, STTMuteFrame, STTUpdateSettingsFrame
from pipecat.metrics.metrics import STTUsageMetricsData, TTFBMetricsData
from pipecat.observers.loggers.transcription_log_observer import TranscriptionLogObserver
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.assemblyai.stt import AssemblyAISTTService
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.stt_service import STTService
from pipecat.transcriptions.language import Language

from pipecat_resilient import RetryPolicy
from pipecat_resilient.stt import ResilientSTT
from pipecat_resilient.testing import AssemblyAIEmulator, DeepgramSTTEmulator, Fault, FaultPlan
from pipecat_resilient.testing.stt_harness import Caller, STTScenario

from .conftest import UNIT
from .test_dropin import INHERITED

KINDS = ["stock", "resilient"]
NO_WAIT = RetryPolicy(attempts=4, wait_initial=0.0, wait_max=0.0, timeout=100 * UNIT)
TIMEOUT = 50 * UNIT
SAID = ["Hello there, how are you?"]


def make_deepgram(kind: str, emulator: DeepgramSTTEmulator) -> STTService:
    """The STT a bot would put in its pipeline: the stock service, or the wrapper around it."""

    def factory() -> DeepgramSTTService:
        return DeepgramSTTService(api_key="test-key", base_url=emulator.url)

    return factory() if kind == "stock" else ResilientSTT(factory, retry=NO_WAIT)


def make_assemblyai(kind: str, emulator: AssemblyAIEmulator) -> STTService:
    def factory() -> AssemblyAISTTService:
        return AssemblyAISTTService(api_key="test-key", api_endpoint_base_url=emulator.ws_url)

    return factory() if kind == "stock" else ResilientSTT(factory, retry=NO_WAIT)


def events(processor: FrameProcessor, *names: str) -> dict[str, list[tuple[Any, ...]]]:
    """Record every call of the named events (the processor argument included)."""
    seen: dict[str, list[tuple[Any, ...]]] = {name: [] for name in names}
    for name in names:

        def record(processor: Any, *args: Any, _name: str = name) -> None:
            seen[_name].append((processor, *args))

        processor.add_event_handler(name, record)
    return seen


async def say(run: STTScenario, utterances: list[str]) -> None:
    """Say ``utterances`` and wait until each is a user message (after those said before)."""
    before = len(run.user_messages)
    await run.speak(Caller(utterances))
    await run.wait_until(lambda: len(run.user_messages) >= before + len(utterances), TIMEOUT)


@pytest.mark.parametrize("kind", KINDS)
async def test_transcription_log_observer_sees_an_stt(kind: str) -> None:
    """Pipecat's ``TranscriptionLogObserver`` logs the processor's transcripts (it wants an STTService)."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", filter="pipecat.observers")
    try:
        async with DeepgramSTTEmulator() as emulator:
            stt = make_deepgram(kind, emulator)
            async with STTScenario(stt, observers=[TranscriptionLogObserver()]) as run:
                await say(run, SAID)
    finally:
        logger.remove(sink)
    assert isinstance(stt, STTService)
    assert any(f"{stt} → TRANSCRIPTION: 'Hello'" in line for line in lines)
    assert any(f"{stt} → INTERIM TRANSCRIPTION" in line for line in lines)


@pytest.mark.parametrize("kind", KINDS)
async def test_stt_metrics_and_metadata_name_the_processor(kind: str) -> None:
    """TTFB and audio usage metrics, and the STT metadata frame, carry the processor's name."""
    async with DeepgramSTTEmulator() as emulator:
        stt = make_deepgram(kind, emulator)
        async with STTScenario(stt, enable_metrics=True) as run:
            await say(run, SAID)
            await run.wait_until(
                lambda: any(
                    isinstance(d, TTFBMetricsData) and d.value > 0
                    for m in run.transcripts.metrics
                    for d in m.data
                ),
                TIMEOUT,
            )
    data = [d for m in run.transcripts.metrics for d in m.data]
    assert {type(d) for d in data} >= {TTFBMetricsData, STTUsageMetricsData}
    assert {d.processor for d in data} == {stt.name}
    [metadata] = [f for f in run.transcripts.service_metadata if isinstance(f, STTMetadataFrame)]
    assert metadata.service_name == stt.name and metadata.ttfs_p99_latency > 0
    assert stt.can_generate_metrics()


@pytest.mark.parametrize("kind", KINDS)
async def test_stt_properties(kind: str) -> None:
    """``sample_rate``, ``settings``, ``is_muted``, ``supports_ttfs``, language codes: as on the stock."""
    async with DeepgramSTTEmulator() as emulator:
        stt = make_deepgram(kind, emulator)
        assert stt.sample_rate == 0  # known once the pipeline starts
        assert stt.language_to_service_language(Language.FR) == "fr"
        async with STTScenario(stt) as run:
            await say(run, SAID)
            assert stt.sample_rate == 16000
            assert stt.settings.model == "nova-3-general"
            assert stt.supports_ttfs
            assert not stt.is_muted
            await run.send(STTMuteFrame(mute=True))
            await run.wait_until(lambda: stt.is_muted, TIMEOUT)
            assert stt.service_metadata_frame().service_name == stt.name


@pytest.mark.parametrize("kind", KINDS)
async def test_a_model_change_reaches_the_provider(kind: str) -> None:
    """``STTUpdateSettingsFrame(model=...)`` between two utterances: the second uses the new model."""
    async with DeepgramSTTEmulator() as emulator:
        stt = make_deepgram(kind, emulator)
        seen = events(stt, "on_connection_lost") if kind == "resilient" else {"on_connection_lost": []}
        async with STTScenario(stt) as run:
            await say(run, SAID)
            await run.send(STTUpdateSettingsFrame(delta=DeepgramSTTService.Settings(model="nova-2-general")))
            await say(run, ["And the second one."])
        assert [record.query["model"] for record in emulator.streams] == ["nova-3-general", "nova-2-general"]
        assert emulator.stream(1).words_finalized == ["And", "the", "second", "one."]
        assert stt.settings.model == "nova-2-general"
        assert run.user_messages == [*SAID, "And the second one."]
        assert run.errors == [] and seen["on_connection_lost"] == []


@pytest.mark.parametrize("kind", KINDS)
async def test_stt_events_fire_with_the_processor(kind: str) -> None:
    """AssemblyAI's ``on_connected`` and ``on_end_of_turn`` fire, with the processor as argument."""
    async with AssemblyAIEmulator() as emulator:
        stt = make_assemblyai(kind, emulator)
        seen = events(stt, "on_connected", "on_end_of_turn")
        async with STTScenario(stt) as run:
            await say(run, SAID)
    assert [p for p, *_ in seen["on_connected"]] == [stt]
    assert seen["on_end_of_turn"] == [(stt, SAID[0])]


# ----------------------------------------------------------------------
# What only the wrapper can do: the same, across a reconnect
# ----------------------------------------------------------------------


async def test_metrics_keep_one_name_across_reconnects() -> None:
    """After a drop the metrics still name the wrapper, and replayed audio counts as usage (it is billed)."""
    plan = FaultPlan(Fault.close(1011, after_audio_received=30))
    async with DeepgramSTTEmulator(plan=plan) as emulator:
        stt = make_deepgram("resilient", emulator)
        async with STTScenario(stt, enable_metrics=True) as run:
            await say(run, ["I would like to book a table for two people."])
        assert len(emulator.connections) == 2
    data = [d for m in run.transcripts.metrics for d in m.data]
    assert {d.processor for d in data} == {stt.name}
    billed = sum(d.value.audio_seconds for d in data if isinstance(d, STTUsageMetricsData))
    received = sum(record.seconds_received for record in emulator.streams)
    assert billed == pytest.approx(received, abs=0.1)
    assert billed > Caller(["I would like to book a table for two people."]).duration


async def test_events_of_the_stock_service_reach_handlers_across_a_reconnect() -> None:
    """Handlers registered on the wrapper keep receiving the stock service's events from a fresh instance."""
    plan = FaultPlan(Fault.close(1011, after_audio_received=8))
    async with AssemblyAIEmulator(plan=plan) as emulator:
        stt = make_assemblyai("resilient", emulator)
        seen = events(stt, "on_connected", "on_end_of_turn", "on_disconnected")
        async with STTScenario(stt) as run:
            await say(run, SAID)
    assert [p for p, *_ in seen["on_connected"]] == [stt, stt]
    assert [p for p, *_ in seen["on_disconnected"]][:1] == [stt]
    assert seen["on_end_of_turn"] == [(stt, SAID[0])]


# ----------------------------------------------------------------------
# The delegation surface against the installed Pipecat
# ----------------------------------------------------------------------


def offline() -> ResilientSTT:
    return ResilientSTT(lambda: DeepgramSTTService(api_key="k", base_url="ws://127.0.0.1:9"))


def test_every_public_member_of_the_service_is_delegated_or_deliberately_left_out() -> None:
    """A Pipecat release adding a member to ``STTService`` fails here until the wrapper says what it means."""
    own = set(dir(FrameProcessor))
    defined = {
        name for cls in ResilientSTT.__mro__[: ResilientSTT.__mro__.index(STTService)] for name in vars(cls)
    }
    members = {name for name in dir(STTService) if not name.startswith("_") and name not in own}
    missing = sorted(members - defined - set(INHERITED))
    assert missing == [], f"ResilientSTT neither delegates nor explains: {missing}"


@pytest.mark.parametrize(
    "call",
    [
        lambda stt: stt.request_finalize(),
        lambda stt: stt.confirm_finalize(),
        lambda stt: stt.emit_stt_usage_metrics(),
        lambda stt: stt.process_audio_frame(None, None),
    ],
    ids=["request_finalize", "confirm_finalize", "emit_stt_usage_metrics", "process_audio_frame"],
)
def test_internal_stt_machinery_is_refused_with_a_reason(call: Any) -> None:
    """Finalize bookkeeping, usage reports and audio processing belong to the hosted instance."""
    with pytest.raises(TypeError, match="hosts its instance's"):
        call(offline())


async def test_run_stt_is_refused_with_a_reason() -> None:
    """``run_stt`` is not a way in: audio goes in as frames, so that it is journaled."""
    with pytest.raises(TypeError, match="send frames instead"):
        async for _ in offline().run_stt(b"\x00\x00"):
            pass


def test_no_blanket_getattr() -> None:
    """A misspelt attribute is an AttributeError, not something forwarded somewhere."""
    stt = offline()
    assert "__getattr__" not in {name for cls in type(stt).__mro__ for name in vars(cls)}
    with pytest.raises(AttributeError):
        stt.sample_rates  # type: ignore[attr-defined]  # noqa: B018
