"""The drop-in conformance suite: the same bot code, run with the stock service and with its wrapper.

Each test is written once, as a Pipecat user writes a bot for the stock
service, and runs twice (``kind`` is ``"stock"`` or ``"resilient"``) against the
same emulator, asserting the same observable behaviour: functions registered on
the LLM run, the MCP client's way of registering tools works, ``LLMSwitcher``
takes the processors, ``run_inference`` answers, settings updates reach the
provider, metrics name the processor, and the stock service's events fire.
The last tests check the delegation surface itself against the installed
Pipecat: every public member of the stock base class is delegated by the
wrapper or deliberately left out.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from loguru import logger
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import (
    InterruptionFrame,
    LLMServiceMetadataFrame,
    LLMUpdateSettingsFrame,
    ManuallySwitchServiceFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.metrics.metrics import LLMUsageMetricsData, TTFBMetricsData, TTSUsageMetricsData
from pipecat.observers.loggers.llm_log_observer import LLMLogObserver
from pipecat.pipeline.llm_switcher import LLMSwitcher
from pipecat.pipeline.service_switcher import ServiceSwitcher
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService
from pipecat.services.llm_service import FunctionCallParams, LLMService
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.tts_service import TTSService
from pipecat.transcriptions.language import Language

from pipecat_resilient import ResilientLLM, ResilientTTS, RetryPolicy
from pipecat_resilient.testing import (
    ChatToolCall,
    ElevenLabsEmulator,
    Fault,
    FaultPlan,
    OpenAIEmulator,
    Scenario,
)
from pipecat_resilient.testing.llm_harness import DownstreamRecorder, LLMScenario

from .conftest import SAMPLE_RATE, UNIT

KINDS = ["stock", "resilient"]
NO_WAIT = RetryPolicy(attempts=4, wait_initial=0.0, wait_max=0.0, timeout=20 * UNIT * 10)
WEATHER = FunctionSchema(
    name="get_weather",
    description="Current weather in a city.",
    properties={"city": {"type": "string"}},
    required=["city"],
)
TOOLS = ToolsSchema(standard_tools=[WEATHER])


def words(*texts: str) -> list[str]:
    return " ".join(texts).split()


# ----------------------------------------------------------------------
# Building the processor under test, both ways
# ----------------------------------------------------------------------


def make_llm(kind: str, emulator: OpenAIEmulator, **kwargs: Any) -> LLMService:
    """The LLM a bot would put in its pipeline: the stock service, or the wrapper around it."""

    def factory() -> OpenAILLMService:
        return OpenAILLMService(api_key="test-key", base_url=emulator.base_url, **kwargs)

    if kind == "stock":
        return factory()
    return ResilientLLM(factory, retry=NO_WAIT, first_token_timeout=5 * UNIT, stall_timeout=5 * UNIT)


def make_tts(kind: str, emulator: ElevenLabsEmulator, voice: str = "voice-a", **kwargs: Any) -> TTSService:
    """The TTS a bot would put in its pipeline: the stock service, or the wrapper around it."""

    def factory() -> ElevenLabsTTSService:
        return ElevenLabsTTSService(
            api_key="test-key",
            url=emulator.url,
            settings=ElevenLabsTTSService.Settings(voice=voice),
            **kwargs,
        )

    if kind == "stock":
        return factory()
    return ResilientTTS(factory, retry=NO_WAIT, first_audio_timeout=3 * UNIT, stall_timeout=3 * UNIT)


def events(processor: FrameProcessor, *names: str) -> dict[str, list[tuple[Any, ...]]]:
    """Record every call of the named events (the processor argument included)."""
    seen: dict[str, list[tuple[Any, ...]]] = {name: [] for name in names}
    for name in names:

        def record(processor: Any, *args: Any, _name: str = name) -> None:
            seen[_name].append((processor, *args))

        processor.add_event_handler(name, record)
    return seen


def frame_queue_tasks() -> int:
    """How many frame-queue tasks (a processor's input and process tasks) are running."""
    handlers = ("__input_frame_task_handler", "__process_frame_task_handler")
    return sum(1 for task in asyncio.all_tasks() if not task.done() and task.get_name().endswith(handlers))


class ErrorLog:
    """Collects what is logged at ERROR (Pipecat logs a missing attribute on a member there)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __enter__(self) -> ErrorLog:
        self._id = logger.add(lambda m: self.lines.append(str(m)), level="ERROR")
        return self

    def __exit__(self, *exc: object) -> None:
        logger.remove(self._id)


# ----------------------------------------------------------------------
# LLM (OpenAI)
# ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_function_registered_on_the_llm_runs_once(kind: str) -> None:
    """``llm.register_function(...)`` after construction: the call runs once and is answered."""
    async with OpenAIEmulator(
        replies={"weather in Paris?": ChatToolCall("get_weather", {"city": "Paris"})}
    ) as emu:
        llm = make_llm(kind, emu)
        calls: list[dict[str, Any]] = []

        async def get_weather(params: FunctionCallParams) -> None:
            calls.append(dict(params.arguments))
            await params.result_callback({"conditions": "sunny"})

        llm.register_function("get_weather", get_weather)
        started = events(llm, "on_function_calls_started")
        assert llm.has_function("get_weather")
        async with LLMScenario(llm, context=LLMContext(tools=TOOLS)) as run:
            await run.ask("weather in Paris?")
            await run.wait_until(lambda: run.responses_ended == 2, 50 * UNIT)
        assert calls == [{"city": "Paris"}]
        assert 'get_weather returned {"conditions": "sunny"}.' in run.assistant_texts
        [(processor, function_calls)] = started["on_function_calls_started"]
        assert processor is llm and [c.function_name for c in function_calls] == ["get_weather"]
        llm.unregister_function("get_weather")
        assert not llm.has_function("get_weather")


@pytest.mark.parametrize("kind", KINDS)
async def test_tools_registered_the_mcp_client_way(kind: str) -> None:
    """The code path of ``MCPClient.register_tools(llm)``: one handler per tool, by name, then the schema."""
    async with OpenAIEmulator(
        replies={"weather in Oslo?": ChatToolCall("get_weather", {"city": "Oslo"})}
    ) as emu:
        llm = make_llm(kind, emu)
        calls: list[str] = []

        async def tool_wrapper(params: FunctionCallParams) -> None:  # what MCPClient registers
            calls.append(params.function_name)
            await params.result_callback({"conditions": "snow"})

        def register_tools(llm: LLMService) -> ToolsSchema:  # MCPClient.register_tools, minus the session
            for schema in TOOLS.standard_tools:
                llm.register_function(schema.name, tool_wrapper)
            return TOOLS

        tools = register_tools(llm)
        async with LLMScenario(llm, context=LLMContext(tools=tools)) as run:
            await run.ask("weather in Oslo?")
            await run.wait_until(lambda: run.responses_ended == 2, 50 * UNIT)
        assert calls == ["get_weather"]
        assert 'get_weather returned {"conditions": "snow"}.' in run.assistant_texts


@pytest.mark.parametrize("kind", KINDS)
async def test_a_catch_all_handler_and_advertised_handlers(kind: str) -> None:
    """A catch-all handler (``function_name=None``) and a ``FunctionSchema`` carrying its handler both run."""
    replies = {
        "weather?": ChatToolCall("get_weather", {"city": "Rome"}),
        "time?": ChatToolCall("get_time", {}),
    }
    async with OpenAIEmulator(replies=replies) as emu:
        llm = make_llm(kind, emu)
        ran: list[str] = []

        async def catch_all(params: FunctionCallParams) -> None:
            ran.append(f"catch-all:{params.function_name}")
            await params.result_callback({"ok": True})

        async def get_time(params: FunctionCallParams) -> None:
            ran.append("get_time")
            await params.result_callback({"time": "noon"})

        llm.register_function(None, catch_all)
        schema = FunctionSchema(
            name="get_time", description="Time.", properties={}, required=[], handler=get_time
        )
        context = LLMContext(tools=ToolsSchema(standard_tools=[WEATHER, schema]))
        async with LLMScenario(llm, context=context) as run:
            await run.ask("weather?")
            await run.wait_until(lambda: run.responses_ended == 2, 50 * UNIT)
            await run.ask("time?")
            await run.wait_until(lambda: run.responses_ended == 4, 50 * UNIT)
        assert ran == ["catch-all:get_weather", "get_time"]


@pytest.mark.parametrize("kind", KINDS)
async def test_run_inference_answers_out_of_band(kind: str) -> None:
    """``await llm.run_inference(context)`` returns the provider's answer, outside the pipeline."""
    async with OpenAIEmulator(replies={"summarize": "A short summary."}) as emu:
        llm = make_llm(kind, emu)
        answer = await llm.run_inference(LLMContext([{"role": "user", "content": "summarize"}]))
        assert answer == "A short summary."


@pytest.mark.parametrize("kind", KINDS)
async def test_llm_switcher_takes_them_and_syncs_their_tools(kind: str) -> None:
    """``LLMSwitcher(llms=[a, b])``: functions registered on the switcher run on whichever is active."""
    reply = {"weather?": ChatToolCall("get_weather", {"city": "Lima"})}
    async with OpenAIEmulator(replies=reply) as emu_a, OpenAIEmulator(replies=reply) as emu_b:
        a, b = make_llm(kind, emu_a), make_llm(kind, emu_b)
        switcher = LLMSwitcher(llms=[a, b])
        calls: list[str] = []

        async def get_weather(params: FunctionCallParams) -> None:
            calls.append(params.arguments["city"])
            await params.result_callback({"conditions": "fog"})

        switcher.register_function("get_weather", get_weather)
        with ErrorLog() as errors:
            async with LLMScenario(switcher, context=LLMContext(tools=TOOLS)) as run:
                await run.ask("weather?")
                await emu_a.wait_until(lambda: len(emu_a.requests) == 2)
                await run.send(ManuallySwitchServiceFrame(service=b))
                await run.ask("weather?")
                await emu_b.wait_until(lambda: len(emu_b.requests) == 2)
                await run.wait_until(lambda: sum("fog" in t for t in run.assistant_texts) == 2, 50 * UNIT)
        assert calls == ["Lima", "Lima"]
        assert errors.lines == []
        assert switcher.active_llm is b


@pytest.mark.parametrize("kind", KINDS)
async def test_llm_settings_update_reaches_the_provider(kind: str) -> None:
    """An ``LLMUpdateSettingsFrame`` changes the model of the next request, and ``llm.settings`` says so."""
    async with OpenAIEmulator() as emu:
        llm = make_llm(kind, emu)
        async with LLMScenario(llm) as run:
            await run.ask("first")
            await run.wait_until(lambda: run.responses_ended == 1)
            await run.send(LLMUpdateSettingsFrame(delta=OpenAILLMService.Settings(model="gpt-test-2")))
            await run.ask("second")
            await run.wait_until(lambda: run.responses_ended == 2)
        assert [r.body.get("model") for r in emu.requests][-1] == "gpt-test-2"
        assert emu.requests[0].body.get("model") != "gpt-test-2"
        assert llm.settings.model == "gpt-test-2"


@pytest.mark.parametrize("kind", KINDS)
async def test_llm_log_observer_sees_an_llm(kind: str) -> None:
    """Pipecat's ``LLMLogObserver`` logs the processor's responses (it looks for an ``LLMService``)."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", filter="pipecat.observers")
    try:
        async with OpenAIEmulator() as emu:
            llm = make_llm(kind, emu)
            async with LLMScenario(llm, observers=[LLMLogObserver()]) as run:
                await run.ask("hello")
                await run.wait_until(lambda: run.responses_ended == 1)
    finally:
        logger.remove(sink)
    assert isinstance(llm, LLMService)
    assert any(f"{llm} → LLM START RESPONSE" in line for line in lines)
    assert any(f"{llm} → LLM END RESPONSE" in line for line in lines)


@pytest.mark.parametrize("kind", KINDS)
async def test_llm_metrics_name_the_processor(kind: str) -> None:
    """TTFB and token usage metrics carry the processor's name."""
    async with OpenAIEmulator() as emu:
        llm = make_llm(kind, emu)
        async with LLMScenario(llm, enable_metrics=True) as run:
            await run.ask("hello")
            await run.wait_until(lambda: run.responses_ended == 1)
            await run.ask("again")
            await run.wait_until(lambda: run.responses_ended == 2)
        data = [d for m in run.metrics for d in m.data]
        assert {type(d) for d in data} >= {TTFBMetricsData, LLMUsageMetricsData}
        assert {d.processor for d in data} == {llm.name}
        assert llm.can_generate_metrics()


async def test_the_llm_wrapper_adds_no_hop() -> None:
    """A frame into the LLM wrapper crosses as many queues as into the stock service."""
    async with OpenAIEmulator() as emu:
        async with LLMScenario(make_llm("resilient", emu)) as run:
            await run.ask("hello")
            await run.wait_until(lambda: run.responses_ended == 1)
            tasks = frame_queue_tasks()
        async with LLMScenario(make_llm("stock", emu)) as run:
            await run.ask("hello")
            await run.wait_until(lambda: run.responses_ended == 1)
            assert tasks == frame_queue_tasks()


@pytest.mark.parametrize("kind", KINDS)
async def test_service_metadata_gets_through_a_switcher(kind: str) -> None:
    """The LLM's metadata frame reaches the aggregators from inside an ``LLMSwitcher`` (matched by name)."""
    async with OpenAIEmulator() as emu_a, OpenAIEmulator() as emu_b:
        a, b = make_llm(kind, emu_a), make_llm(kind, emu_b)
        async with LLMScenario(LLMSwitcher(llms=[a, b])) as run:
            await run.wait_until(lambda: any(isinstance(f, LLMServiceMetadataFrame) for f in run.downstream))
            await run.send(ManuallySwitchServiceFrame(service=b))
            await run.wait_until(
                lambda: (
                    [f.service_name for f in run.downstream if isinstance(f, LLMServiceMetadataFrame)]
                    == [a.name, b.name]
                )
            )


# ----------------------------------------------------------------------
# TTS (ElevenLabs)
# ----------------------------------------------------------------------


def voice_of(emulator: ElevenLabsEmulator, text: str) -> list[str]:
    """The voices of the connections that were given ``text`` (from each connection's URL)."""
    return [c.path.split("/")[3] for c in emulator.connections if any(text in t for _, t in c.texts)]


def query_of(emulator: ElevenLabsEmulator, text: str) -> list[str]:
    return [c.path.split("?", 1)[1] for c in emulator.connections if any(text in t for _, t in c.texts)]


async def speak_all(run: Scenario, *frames: Any, utterances: int) -> None:
    await run.send(*frames)
    await run.wait_until(lambda: run.listener.stopped >= utterances, 50 * UNIT)


@pytest.mark.parametrize("kind", KINDS)
async def test_an_interruption_mid_utterance(kind: str) -> None:
    """``InterruptionFrame`` mid-utterance: the rest is never said, the next utterance is said whole."""
    long = "This answer goes on for quite a while so that the caller can cut it off halfway through."
    after = "Sure, go ahead."
    # Audio paced at its own duration (0.9 s for the long answer): the
    # interruption lands while most of it is still to come.
    async with ElevenLabsEmulator(realtime=True) as emulator:
        tts = make_tts(kind, emulator)
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await run.send(TTSSpeakFrame(long))
            await run.wait_heard(3, 50 * UNIT)
            await run.send(InterruptionFrame())
            heard_before = len(run.heard)
            await speak_all(run, TTSSpeakFrame(after), utterances=1)
            await run.wait_until(lambda: run.heard[-3:] == words(after), 50 * UNIT)
        cut = run.heard[: -len(words(after))]
        assert heard_before <= len(cut) < len(words(long))
        assert cut == words(long)[: len(cut)]
        shown = words(*(mark.detail for mark in run.listener.marks if mark.kind == "text"))
        assert shown[-len(words(after)) :] == words(after)
        assert len(shown) < len(words(long, after))
        assert run.errors == []


@pytest.mark.parametrize("kind", KINDS)
async def test_speech_kept_out_of_the_context_is_shown_once(kind: str) -> None:
    """``TTSSpeakFrame(append_to_context=False)``: each word goes downstream once, not for the context."""
    async with ElevenLabsEmulator() as emulator:
        tts = make_tts(kind, emulator)
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            hold = TTSSpeakFrame("Please hold the line.", append_to_context=False)
            await speak_all(run, hold, utterances=1)
            await speak_all(run, TTSSpeakFrame("Thanks for waiting."), utterances=2)
        shown = [mark.detail for mark in run.listener.marks if mark.kind == "text"]
        assert shown == words("Please hold the line.", "Thanks for waiting.")
        assert run.context_words == words("Thanks for waiting.")
        assert run.heard == shown and run.errors == []


@pytest.mark.parametrize("kind", KINDS)
async def test_a_voice_change_between_utterances(kind: str) -> None:
    """``TTSUpdateSettingsFrame(voice=...)`` between two utterances: the second is said in the new voice."""
    async with ElevenLabsEmulator() as emulator:
        tts = make_tts(kind, emulator)
        seen = events(tts, "on_connection_lost") if kind == "resilient" else {"on_connection_lost": []}
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await speak_all(run, TTSSpeakFrame("Hello there."), utterances=1)
            await speak_all(
                run,
                TTSUpdateSettingsFrame(delta=ElevenLabsTTSService.Settings(voice="voice-b")),
                TTSSpeakFrame("In the new voice now."),
                utterances=2,
            )
        assert run.heard == words("Hello there.", "In the new voice now.")
        assert run.context_words == run.heard
        assert voice_of(emulator, "Hello there.") == ["voice-a"]
        assert voice_of(emulator, "In the new voice now.") == ["voice-b"]
        assert tts.settings.voice == "voice-b"
        assert run.errors == [] and seen["on_connection_lost"] == []


@pytest.mark.parametrize("kind", KINDS)
async def test_language_and_model_changes(kind: str) -> None:
    """Language and model changes (both reconnect ElevenLabs) apply to what is said next."""
    async with ElevenLabsEmulator() as emulator:
        tts = make_tts(kind, emulator)
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await speak_all(
                run,
                TTSUpdateSettingsFrame(delta=ElevenLabsTTSService.Settings(language=Language.DE)),
                TTSSpeakFrame("Guten Tag."),
                utterances=1,
            )
            await speak_all(
                run,
                TTSUpdateSettingsFrame(delta=ElevenLabsTTSService.Settings(model="eleven_turbo_v2_5")),
                TTSSpeakFrame("Auf Wiedersehen."),
                utterances=2,
            )
        assert run.heard == words("Guten Tag.", "Auf Wiedersehen.")
        assert "language_code=de" in query_of(emulator, "Guten Tag.")[0]
        assert "model_id=eleven_turbo_v2_5" in query_of(emulator, "Auf Wiedersehen.")[0]
        assert run.errors == []


@pytest.mark.parametrize("kind", KINDS)
async def test_tts_properties(kind: str) -> None:
    """``sample_rate``, ``chunk_size``, ``settings`` and ``can_generate_metrics()`` read as on the stock."""
    async with ElevenLabsEmulator() as emulator:
        tts = make_tts(kind, emulator)
        assert isinstance(tts, TTSService)
        assert tts.sample_rate == 0  # known once the pipeline starts
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await speak_all(run, TTSSpeakFrame("Hi."), utterances=1)
            assert tts.sample_rate == SAMPLE_RATE
            assert tts.chunk_size == SAMPLE_RATE  # half a second of 16-bit audio
            assert tts.settings.voice == "voice-a"
            assert tts.can_generate_metrics()


async def test_the_wrapper_adds_no_hop() -> None:
    """A frame into the wrapper crosses as many queues as into the stock service: the instance's only."""
    async with ElevenLabsEmulator() as emulator:
        tts = make_tts("resilient", emulator)
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await speak_all(run, TTSSpeakFrame("Hi."), utterances=1)
            tasks = frame_queue_tasks()
            assert run.heard == ["Hi."]
        async with Scenario(make_tts("stock", emulator), spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await speak_all(run, TTSSpeakFrame("Hi."), utterances=1)
            assert tasks == frame_queue_tasks()


@pytest.mark.parametrize("kind", KINDS)
async def test_tts_frames_go_to_the_services_transport_destination(kind: str) -> None:
    """With ``transport_destination=``, the audio, start, stop and word frames all carry it."""
    async with ElevenLabsEmulator() as emulator:
        tts = make_tts(kind, emulator, transport_destination="speaker-2")
        recorder = DownstreamRecorder()
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE), after=[recorder]) as run:
            await speak_all(run, TTSSpeakFrame("Two words."), utterances=1)
        kinds = (TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame, TTSTextFrame)
        spoken = [f for f in recorder.frames if isinstance(f, kinds)]
        assert {type(f) for f in spoken} == set(kinds)
        assert {f.transport_destination for f in spoken} == {"speaker-2"}
        assert run.heard == ["Two", "words."]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_text_transformer_added_to_the_tts(kind: str) -> None:
    """``tts.add_text_transformer(...)`` transforms what is sent to the provider."""
    async with ElevenLabsEmulator() as emulator:
        tts = make_tts(kind, emulator)

        async def shout(text: str, text_type: str) -> str:
            return text.upper()

        tts.add_text_transformer(shout)
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await speak_all(run, TTSSpeakFrame("quiet words."), utterances=1)
        assert run.heard == ["QUIET", "WORDS."]


@pytest.mark.parametrize("kind", KINDS)
async def test_tts_events_fire_with_the_processor(kind: str) -> None:
    """``on_connection_error``, ``on_connected``, ``on_tts_request`` fire, with the processor as argument."""
    async with ElevenLabsEmulator(plan=FaultPlan(Fault.refuse(503))) as emulator:
        tts = make_tts(kind, emulator)
        seen = events(tts, "on_connection_error", "on_connected", "on_tts_request")
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await run.wait_until(lambda: len(seen["on_connection_error"]) >= 1)
            await speak_all(run, TTSSpeakFrame("Hello."), utterances=1)
        [(processor, error)] = seen["on_connection_error"]
        assert processor is tts and "503" in error
        assert [p for p, *_ in seen["on_connected"]] == [tts]
        assert [(p, text) for p, _, text in seen["on_tts_request"]] == [(tts, "Hello.")]
        assert run.heard == ["Hello."]


@pytest.mark.parametrize("kind", KINDS)
async def test_tts_metrics_name_the_processor(kind: str) -> None:
    """TTFB and character usage metrics, and the worker's first metrics frame, name the processor."""
    async with ElevenLabsEmulator() as emulator:
        tts = make_tts(kind, emulator)
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE), enable_metrics=True) as run:
            await speak_all(run, TTSSpeakFrame("One two three."), utterances=1)
            await speak_all(run, TTSSpeakFrame("Four five."), utterances=2)
        data = [d for m in run.listener.metrics for d in m.data]
        assert {type(d) for d in data} >= {TTFBMetricsData, TTSUsageMetricsData}
        assert {d.processor for d in data} == {tts.name}
        # The worker's initial frame lists the processor (zero TTFB), before any speech.
        first = run.listener.metrics[0]
        assert [(d.processor, d.value) for d in first.data if isinstance(d, TTFBMetricsData)] == [
            (tts.name, 0.0)
        ]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_service_switcher_switches_between_them(kind: str) -> None:
    """A manual ``ServiceSwitcher`` over two TTS: settings reach the inactive one, speech the active one."""
    async with ElevenLabsEmulator() as emu_a, ElevenLabsEmulator() as emu_b:
        a, b = make_tts(kind, emu_a), make_tts(kind, emu_b)
        switcher = ServiceSwitcher([a, b])
        voice_b = ElevenLabsTTSService.Settings(voice="voice-b")
        async with Scenario(switcher, spc=emu_a.samples_per_char(SAMPLE_RATE)) as run:
            await speak_all(run, TTSSpeakFrame("From the first."), utterances=1)
            await run.send(TTSUpdateSettingsFrame(delta=voice_b, reach_inactive_services=True))
            await run.send(ManuallySwitchServiceFrame(service=b))
            await speak_all(run, TTSSpeakFrame("From the second."), utterances=2)
        assert run.heard == words("From the first.", "From the second.")
        assert [t for c in emu_a.connections for _, t in c.texts] == ["From the first."]
        assert [t for c in emu_b.connections for _, t in c.texts] == ["From the second."]
        assert voice_of(emu_b, "From the second.") == ["voice-b"]
        assert run.errors == []


# ----------------------------------------------------------------------
# What only the wrapper can do: the same, across a reconnect
# ----------------------------------------------------------------------


async def test_metrics_keep_one_name_across_reconnects() -> None:
    """After two drops the metrics still name the wrapper, and replayed characters count as usage."""
    plan = FaultPlan(
        Fault.close(1012, after_audio_chunks=3), Fault.close(1011, after_audio_chunks=2, connection=1)
    )
    sentence = "Metrics keep one name across reconnects."
    async with ElevenLabsEmulator(plan=plan) as emulator:
        tts = make_tts("resilient", emulator)
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE), enable_metrics=True) as run:
            await speak_all(run, TTSSpeakFrame(sentence), utterances=1)
        assert run.heard == words(sentence)
        assert len(emulator.connections) == 3
        data = [d for m in run.listener.metrics for d in m.data]
        assert {d.processor for d in data} == {tts.name}
        billed = sum(d.value for d in data if isinstance(d, TTSUsageMetricsData))
        sent = sum(len(t) for c in emulator.connections for _, t in c.texts)
        assert billed == sent > len(sentence)


async def test_functions_reach_an_instance_made_after_a_drop() -> None:
    """A function registered on the wrapper runs on the instance that replaced a dropped one."""
    replies = {"weather?": ChatToolCall("get_weather", {"city": "Kyiv"})}
    # The first request is cut before any chunk; the second (on a fresh instance) answers.
    async with OpenAIEmulator(replies=replies, plan=FaultPlan(Fault.abort(after_audio_chunks=0))) as emu:
        llm = make_llm("resilient", emu)
        calls: list[str] = []

        async def get_weather(params: FunctionCallParams) -> None:
            calls.append(params.arguments["city"])
            await params.result_callback({"conditions": "clear"})

        llm.register_function("get_weather", get_weather)
        recovered = events(llm, "on_connection_recovered")
        async with LLMScenario(llm, context=LLMContext(tools=TOOLS)) as run:
            await run.ask("weather?")
            await run.wait_until(lambda: any("clear" in t for t in run.assistant_texts), 50 * UNIT)
        assert calls == ["Kyiv"]
        assert len(recovered["on_connection_recovered"]) == 1


async def test_run_inference_is_retried_after_a_drop() -> None:
    """A one-shot inference whose connection drops is asked again; the stock service raises instead."""
    plan = FaultPlan(Fault.abort())
    async with OpenAIEmulator(replies={"summarize": "Still summarized."}, plan=plan) as emu:
        stock = make_llm("stock", emu, retry_on_timeout=False)
        stock._client.max_retries = 0  # as the wrapper runs it: one request per attempt
        with pytest.raises(Exception, match="Connection error"):
            await stock.run_inference(LLMContext([{"role": "user", "content": "summarize"}]))
    async with OpenAIEmulator(replies={"summarize": "Still summarized."}, plan=plan) as emu:
        llm = make_llm("resilient", emu)
        answer = await llm.run_inference(LLMContext([{"role": "user", "content": "summarize"}]))
        assert answer == "Still summarized."
        assert len(emu.requests) == 2


async def test_settings_survive_a_drop() -> None:
    """A fresh instance after a drop speaks in the voice set before the drop."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=3, connection=1))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        tts = make_tts("resilient", emulator)
        lost = events(tts, "on_connection_lost")
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await speak_all(run, TTSSpeakFrame("First voice."), utterances=1)
            await speak_all(
                run,
                TTSUpdateSettingsFrame(delta=ElevenLabsTTSService.Settings(voice="voice-b")),
                TTSSpeakFrame("Second voice, dropped midway."),
                utterances=2,
            )
        assert run.heard == words("First voice.", "Second voice, dropped midway.")
        assert run.context_words == run.heard
        # Connection 1 (voice-b) dropped; its replacement was opened with voice-b
        # at once (one handshake, not a voice-a one and a reconnect).
        assert [c.path.split("/")[3] for c in emulator.connections] == ["voice-a", "voice-b", "voice-b"]
        assert len(lost["on_connection_lost"]) == 1 and run.errors == []


async def test_a_voice_change_during_an_utterance_waits_for_its_end() -> None:
    """A voice change arriving mid-turn: the turn ends in the old voice, the next is in the new one."""
    async with ElevenLabsEmulator() as emulator:
        tts = make_tts("resilient", emulator)
        lost = events(tts, "on_connection_lost")
        first = ["The first answer ", "is said ", "in one voice. ", "All of it."]
        from pipecat.frames.frames import LLMFullResponseEndFrame, LLMFullResponseStartFrame, LLMTextFrame

        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await run.send(LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in first[:2]])
            await run.send(TTSUpdateSettingsFrame(delta=ElevenLabsTTSService.Settings(voice="voice-b")))
            await run.send(*[LLMTextFrame(t) for t in first[2:]], LLMFullResponseEndFrame())
            await speak_all(run, TTSSpeakFrame("Then another voice."), utterances=2)
        assert run.heard == words(*first, "Then another voice.")
        assert run.context_words == run.heard
        assert voice_of(emulator, "in one voice.") == ["voice-a"]
        assert voice_of(emulator, "Then another voice.") == ["voice-b"]
        assert lost["on_connection_lost"] == [] and run.errors == []


# ----------------------------------------------------------------------
# The delegation surface against the installed Pipecat
# ----------------------------------------------------------------------


def offline_tts() -> ElevenLabsTTSService:
    return ElevenLabsTTSService(
        api_key="k", url="ws://127.0.0.1:9", settings=ElevenLabsTTSService.Settings(voice="v")
    )


# Members of the stock base classes the wrappers inherit on purpose, and why.
INHERITED = {
    # Lifecycle hooks called by AIService.process_frame, which never runs on a
    # wrapper: the hosted instance runs its own.
    "start": "lifecycle of the hosted instance",
    "stop": "lifecycle of the hosted instance",
    "cancel": "lifecycle of the hosted instance",
    "broadcast_service_metadata": "called by the service base on itself after its StartFrame",
    "process_generator": "helper the service base uses on itself",
    # Class-level constants, read by the service base on itself.
    "FUNCTION_CALL_ERROR_MESSAGE_TEMPLATE": "constant",
    "MISSING_FUNCTION_CALL_MESSAGE_TEMPLATE": "constant",
    "adapter_class": "constant; the adapter in use is get_llm_adapter()'s",
}


@pytest.mark.parametrize(("wrapper", "base"), [(ResilientTTS, TTSService), (ResilientLLM, LLMService)])
def test_every_public_member_of_the_service_is_delegated_or_deliberately_left_out(
    wrapper: type[Any], base: type[Any]
) -> None:
    """A Pipecat release that adds a member to the service fails here until the wrapper says what it means."""
    own = set(dir(FrameProcessor))
    defined = {name for cls in wrapper.__mro__[: wrapper.__mro__.index(base)] for name in vars(cls)}
    members = {name for name in dir(base) if not name.startswith("_") and name not in own}
    missing = sorted(members - defined - set(INHERITED))
    assert missing == [], f"{wrapper.__name__} neither delegates nor explains: {missing}"
    # The private members Pipecat's own code calls on an LLM it is given.
    if base is LLMService:
        assert {"_sync_registered_tool_handlers", "_register_direct_function"} <= defined


def test_internal_tts_machinery_is_refused_with_a_reason() -> None:
    """Calling the audio-context machinery on the wrapper says it belongs to the hosted instance."""
    tts = ResilientTTS(
        lambda: ElevenLabsTTSService(
            api_key="k", url="ws://127.0.0.1:9", settings=ElevenLabsTTSService.Settings(voice="v")
        )
    )
    with pytest.raises(TypeError, match="hosts its instance's"):
        tts.create_context_id()
    with pytest.raises(TypeError, match="send frames instead"):
        tts.get_audio_contexts()


def test_no_blanket_getattr() -> None:
    """A misspelt attribute is an AttributeError, not something forwarded somewhere."""
    tts = ResilientTTS(
        lambda: ElevenLabsTTSService(
            api_key="k", url="ws://127.0.0.1:9", settings=ElevenLabsTTSService.Settings(voice="v")
        )
    )
    assert "__getattr__" not in {name for cls in type(tts).__mro__ for name in vars(cls)}
    with pytest.raises(AttributeError):
        tts.sample_rates  # noqa: B018


async def test_llm_settings_survive_a_drop() -> None:
    """An answer retried on a fresh instance after a drop is asked with the model set before the drop."""
    # Request 1 answers; request 2 (after the model change) is cut before any chunk.
    plan = FaultPlan(Fault.abort(after_audio_chunks=0, connection=1))
    async with OpenAIEmulator(plan=plan) as emu:
        llm = make_llm("resilient", emu)
        async with LLMScenario(llm) as run:
            await run.ask("first")
            await run.wait_until(lambda: run.responses_ended == 1)
            await run.send(LLMUpdateSettingsFrame(delta=OpenAILLMService.Settings(model="gpt-test-2")))
            await run.ask("second")
            await run.wait_until(lambda: run.responses_ended == 2, 50 * UNIT)
        assert [r.body.get("model") for r in emu.requests][1:] == ["gpt-test-2", "gpt-test-2"]
        assert run.errors == []


# ----------------------------------------------------------------------
# Speech-to-speech (Gemini Live)
# ----------------------------------------------------------------------


def make_live(kind: str, emulator: Any) -> LLMService:
    """A Gemini Live LLM as a bot builds it: the stock service, or the wrapper around it."""
    from pipecat.services.google.gemini_live.llm import GeminiLiveLLMService

    from .test_emulator_gemini_live import MODEL

    def factory() -> GeminiLiveLLMService:
        return GeminiLiveLLMService(
            api_key="test-key",
            http_options=emulator.http_options(),
            settings=GeminiLiveLLMService.Settings(model=MODEL),
        )

    if kind == "stock":
        return factory()
    return ResilientLLM(factory, retry=NO_WAIT, first_token_timeout=1.0, stall_timeout=1.0)


@pytest.mark.parametrize("kind", KINDS)
async def test_gemini_live_function_registered_on_the_llm(kind: str) -> None:
    """Gemini Live: a function registered after construction runs, its result is answered, events fire."""
    from pipecat_resilient.testing import GeminiLiveEmulator, SessionScenario, ToolCall

    reply = "It is sunny in Paris today."
    script = {"What is the weather?": ToolCall("get_weather", {"city": "Paris"}, reply=reply)}
    async with GeminiLiveEmulator(script=script, bundle_transcription=True) as emulator:
        llm = make_live(kind, emulator)
        calls: list[dict[str, Any]] = []

        async def get_weather(params: FunctionCallParams) -> None:
            calls.append(dict(params.arguments))
            await params.result_callback({"conditions": "sunny"})

        llm.register_function("get_weather", get_weather)
        seen = events(llm, "on_function_calls_started")
        async with SessionScenario(llm, emulator.samples_per_char(), context=LLMContext(tools=TOOLS)) as run:
            await run.start_conversation("What is the weather?")
            await run.wait_until(lambda: run.listener.responses_ended == 1, 50 * UNIT)
        assert calls == [{"city": "Paris"}]
        assert run.listener.heard == words(reply)
        [response] = emulator.function_responses()
        assert response["name"] == "get_weather"
        [(processor, function_calls)] = seen["on_function_calls_started"]
        assert processor is llm and [c.function_name for c in function_calls] == ["get_weather"]
        assert isinstance(llm, LLMService) and llm.settings.model is not None


@pytest.mark.parametrize("kind", KINDS)
async def test_gemini_live_metadata_says_it_is_realtime(kind: str) -> None:
    """The metadata frame reaching the aggregators names the processor and says it is speech-to-speech."""
    from pipecat_resilient.testing import GeminiLiveEmulator, SessionScenario

    async with GeminiLiveEmulator() as emulator:
        llm = make_live(kind, emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Hello.")
            await run.wait_until(lambda: run.listener.responses_ended == 1, 50 * UNIT)
        [metadata] = [m for m in run.listener.service_metadata if isinstance(m, LLMServiceMetadataFrame)]
        assert metadata.service_name == llm.name and metadata.is_realtime_service
