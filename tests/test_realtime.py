"""ResilientLLM around the stock GeminiLiveLLMService, against the Gemini Live emulator over TLS.

Each test asserts on what a listener where the transport would be heard
(decoded from the audio), what the context received, what the emulator got
(setups, resumption handles, tool responses), and what went upstream.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.services.google.gemini_live.llm import GeminiLiveLLMService

from pipecat_resilient import ResilientLLM, RetryPolicy, _gemini
from pipecat_resilient.realtime import ResilientRealtimeLLM
from pipecat_resilient.testing import Fault, FaultPlan, GeminiLiveEmulator
from pipecat_resilient.testing.gemini_live import LAST_CHUNK_BEFORE_TURN_COMPLETE

from .conftest import UNIT
from .test_emulator_gemini_live import MODEL, LiveRun, words

STORY = "Once upon a time there was a socket that never closed and a bot that never stopped talking."
NO_WAIT = RetryPolicy(attempts=4, wait_initial=0.0, wait_max=0.0)
WEATHER_TOOLS = ToolsSchema(
    standard_tools=[
        FunctionSchema(
            name="get_weather",
            description="Current weather in a city.",
            properties={"city": {"type": "string"}},
            required=["city"],
        )
    ]
)


def make(emulator: GeminiLiveEmulator, **kwargs: object):
    def factory() -> GeminiLiveLLMService:
        service = GeminiLiveLLMService(
            api_key="test-key",
            http_options=emulator.http_options(),
            settings=GeminiLiveLLMService.Settings(model=MODEL),
        )
        for name, handler in kwargs.items():
            service.register_function(name, handler)
        return service

    return factory


def resilient(emulator: GeminiLiveEmulator, **kwargs: object) -> ResilientLLM:
    functions = kwargs.pop("functions", {})
    options: dict[str, object] = {"retry": NO_WAIT, "first_token_timeout": 1.0, "stall_timeout": 1.0}
    options.update(kwargs)
    return ResilientLLM(make(emulator, **functions), **options)  # type: ignore[arg-type]


async def wait_ready(llm: ResilientLLM) -> None:
    async with asyncio.timeout(30 * UNIT):
        while llm.service is None or not _gemini.is_ready(llm.service):
            await asyncio.sleep(UNIT / 20)


def heard_once(run: LiveRun, text: str) -> None:
    """Every word of ``text`` heard in full exactly once, in order (cut fragments aside)."""
    assert run.listener.heard == words(text)


def context_is_heard(run: LiveRun) -> None:
    """The assistant side of the context is what was heard."""
    assert " ".join(run.assistant_texts).split() == run.listener.heard


async def test_resilient_llm_picks_the_realtime_shell() -> None:
    """A factory of Gemini Live services gets the speech-to-speech shell."""
    async with GeminiLiveEmulator() as emulator:
        assert isinstance(resilient(emulator), ResilientRealtimeLLM)


async def test_no_fault_conversation() -> None:
    """Without faults the session behaves as the stock one."""
    script = {"Tell me a story.": STORY}
    async with GeminiLiveEmulator(script=script) as emulator:
        llm = resilient(emulator)
        async with LiveRun(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Tell me a story.")
            await run.wait_until(lambda: run.listener.responses_ended == 1)
        heard_once(run, STORY)
        context_is_heard(run)
        assert len(emulator.connections) == 1
        assert run.errors == []


@pytest.mark.parametrize(
    "fault",
    [
        Fault.close(1011, "Internal error encountered.", after_audio_chunks=4),
        Fault.close(1007, LAST_CHUNK_BEFORE_TURN_COMPLETE, after_audio_chunks=4),
        Fault.abort(after_audio_chunks=4),
        Fault.stall(after_audio_chunks=4),
    ],
    ids=["1011", "1007", "abort", "stall"],
)
async def test_drop_mid_reply_closes_it_resumes_and_answers_the_rest(fault: Fault) -> None:
    """Cut mid-reply: the reply is closed downstream, the session resumed, the rest said once."""
    script = {"Tell me a story.": STORY}
    async with GeminiLiveEmulator(
        script=script, plan=FaultPlan(fault), bundle_transcription=True
    ) as emulator:
        llm = resilient(emulator)
        async with LiveRun(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Tell me a story.")
            await run.wait_until(lambda: run.listener.heard[-1:] == words(STORY)[-1:])
            await run.wait_until(lambda: run.listener.responses_ended == 2)
        heard_once(run, STORY)
        context_is_heard(run)
        assert run.listener.kinds() == ["started", "response-start", "stopped", "response-end"] * 2
        assert emulator.resumption_handle(1) == emulator.handles_issued(0)[-1]
        assert run.errors == []


async def test_end_frame_does_not_wait_on_a_cut_reply() -> None:
    """The stock service defers an EndFrame 30 s behind a cut reply; here the pipeline ends at once."""
    script = {"Tell me a story.": STORY}
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=4), Fault.refuse(503, connection=None))
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=4))
    async with GeminiLiveEmulator(script=script, plan=plan) as emulator:
        llm = resilient(emulator)
        run = LiveRun(llm, emulator.samples_per_char())
        await run.__aenter__()
        await run.start_conversation("Tell me a story.")
        await run.wait_until(lambda: run.listener.responses_ended >= 1)
        started = time.monotonic()
        from pipecat.frames.frames import EndFrame

        await run.send(EndFrame())
        assert run._task is not None
        await asyncio.wait_for(run._task, 10 * UNIT * 10)
        assert time.monotonic() - started < 5.0
        assert run.errors == []
