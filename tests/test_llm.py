"""ResilientLLM around the stock OpenAILLMService, against the chat-completions emulator.

Every test asserts on what went downstream from the LLM (the frames a TTS
would speak), what Pipecat's aggregators wrote into the context, how many
requests the provider saw, and what went upstream.
"""

from __future__ import annotations

import asyncio

import pytest
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import InterruptionFrame
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.llm_service import FunctionCallParams
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.utils.errors import ErrorCategory

from pipecat_resilient import ReplayFailed, ReplayPolicy, ResilientLLM, RetryPolicy, State
from pipecat_resilient.policy import CONTINUE_INSTRUCTION
from pipecat_resilient.testing import ChatToolCall, Fault, FaultPlan, OpenAIEmulator
from pipecat_resilient.testing.llm_harness import LLMScenario

from .conftest import UNIT

QUESTION = "what is the plan"
ANSWER = "You said: what is the plan. That is all."
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


def stock(emulator: OpenAIEmulator, **kwargs: object) -> OpenAILLMService:
    return OpenAILLMService(api_key="test-key", base_url=emulator.base_url, **kwargs)  # type: ignore[arg-type]


def resilient(emulator: OpenAIEmulator, **kwargs: object) -> ResilientLLM:
    options: dict[str, object] = {
        "retry": NO_WAIT,
        "first_token_timeout": 5 * UNIT,
        "stall_timeout": 5 * UNIT,
    }
    options.update(kwargs)
    api_key = options.pop("api_key", "test-key")
    return ResilientLLM(
        lambda: OpenAILLMService(api_key=api_key, base_url=emulator.base_url),  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )


async def ask(llm: FrameProcessor, text: str = QUESTION, *, responses: int = 1, context=None) -> LLMScenario:
    run = LLMScenario(llm, context=context or LLMContext())
    await run.start()
    await run.ask(text)
    try:
        await run.wait_until(lambda: run.responses_ended >= responses, 50 * UNIT)
    except TimeoutError:
        pass  # the assertions say what is missing
    await run.end()
    return run


def assert_clean(run: LLMScenario, answer: str = ANSWER) -> None:
    """One response, the whole answer once, the context equal to it, no error."""
    assert run.kinds(collapse=True) == ["start", "text", "end"]
    assert run.responses == [answer]
    assert run.assistant_texts == [answer]
    assert run.errors == []


async def test_no_fault_passes_the_answer_through() -> None:
    """Without faults the answer is streamed as the stock service streams it."""
    async with OpenAIEmulator() as emulator:
        run = await ask(resilient(emulator))
        assert_clean(run)
        assert len(emulator.requests) == 1


@pytest.mark.parametrize(
    "fault",
    [
        Fault.abort(after_audio_chunks=0),
        Fault.refuse(503),
        Fault.refuse(429, headers={"Retry-After": "0"}),
        Fault.close(1000, after_audio_chunks=0),
    ],
    ids=["drop-before-text", "503", "429", "truncated-before-text"],
)
async def test_failure_before_any_text_is_retried_invisibly(fault: Fault) -> None:
    """Nothing went downstream yet: a fresh instance answers, and nobody downstream can tell."""
    async with OpenAIEmulator(plan=FaultPlan(fault)) as emulator:
        run = await ask(resilient(emulator))
        assert_clean(run)
        assert len(emulator.requests) == 2
        assert emulator.requests[1].messages == emulator.requests[0].messages


async def test_slow_first_token_is_cut_off_and_retried() -> None:
    """No first token within the timeout: the request is abandoned and asked again."""
    async with OpenAIEmulator(plan=FaultPlan(Fault.stall(after_audio_chunks=0))) as emulator:
        run = await ask(resilient(emulator, first_token_timeout=3 * UNIT))
        assert_clean(run)
        assert len(emulator.requests) == 2


async def test_stalled_request_before_headers_is_cut_off() -> None:
    """A request that never gets response headers is abandoned within the first-token timeout."""
    async with OpenAIEmulator(plan=FaultPlan(Fault.stall())) as emulator:
        run = await ask(resilient(emulator, first_token_timeout=3 * UNIT))
        assert_clean(run)
        assert len(emulator.requests) == 2


async def test_drop_after_partial_text_continues_without_repeating() -> None:
    """Cut mid-answer: the fresh instance continues it, and only the new suffix goes downstream."""
    async with OpenAIEmulator(plan=FaultPlan(Fault.abort(after_audio_chunks=4))) as emulator:
        run = await ask(resilient(emulator))
        assert_clean(run)
        first, second = emulator.requests
        assert ANSWER.startswith(first.text_sent) and first.text_sent
        # The second request asks to continue the cut answer.
        assert second.messages[-2] == {"role": "assistant", "content": first.text_sent}
        assert second.messages[-1] == {"role": "user", "content": CONTINUE_INSTRUCTION}


async def test_repeated_start_of_a_continuation_is_trimmed() -> None:
    """A model that repeats the end of the cut answer before continuing is not heard twice."""
    plan = FaultPlan(Fault.abort(after_audio_chunks=7))
    async with OpenAIEmulator(plan=plan, repeat_on_continue=3) as emulator:
        run = await ask(resilient(emulator))
        assert_clean(run)
        repeated = " ".join(emulator.requests[0].text_sent.split()[-3:])
        assert emulator.requests[1].text_sent.lstrip().startswith(repeated)


async def test_stalled_stream_is_detected_and_continued() -> None:
    """A stream that stops mid-answer is declared dead after the stall timeout and continued."""
    async with OpenAIEmulator(plan=FaultPlan(Fault.stall(after_audio_chunks=3))) as emulator:
        run = await ask(resilient(emulator, stall_timeout=3 * UNIT))
        assert_clean(run)
        assert len(emulator.requests) == 2


async def test_restart_policy_closes_the_cut_answer_and_answers_again() -> None:
    """With partial_answer='restart' the cut answer ends and a whole new one follows."""
    async with OpenAIEmulator(plan=FaultPlan(Fault.abort(after_audio_chunks=4))) as emulator:
        run = await ask(resilient(emulator, replay=ReplayPolicy(partial_answer="restart")), responses=2)
        cut = emulator.requests[0].text_sent
        assert run.kinds(collapse=True) == ["start", "text", "end", "start", "text", "end"]
        assert run.responses == [cut, ANSWER]
        assert run.assistant_texts == [cut, ANSWER]
        assert emulator.requests[1].messages == emulator.requests[0].messages
        assert run.errors == []


async def test_cut_function_call_stream_is_retried_whole_and_runs_once() -> None:
    """A tool-call stream cut midway is asked again whole; the function runs exactly once."""
    calls: list[dict] = []

    async def get_weather(params: FunctionCallParams) -> None:
        calls.append(dict(params.arguments))
        await params.result_callback({"conditions": "sunny"})

    def make() -> OpenAILLMService:
        service = OpenAILLMService(api_key="test-key", base_url=emulator.base_url)
        service.register_function("get_weather", get_weather)
        return service

    replies = {"weather in Paris?": ChatToolCall("get_weather", {"city": "Paris"})}
    plan = FaultPlan(Fault.abort(after_audio_chunks=3))
    async with OpenAIEmulator(plan=plan, replies=replies) as emulator:
        llm = ResilientLLM(make, retry=NO_WAIT, first_token_timeout=0.5, stall_timeout=0.5)
        context = LLMContext(tools=WEATHER_TOOLS)
        run = await ask(llm, "weather in Paris?", responses=2, context=context)
        assert calls == [{"city": "Paris"}]
        # The cut stream, its retry, and the request answering the result.
        assert len(emulator.requests) == 3
        assert emulator.requests[2].tool_results == [("get_weather", '{"conditions": "sunny"}')]
        assert run.assistant_texts[-1] == 'get_weather returned {"conditions": "sunny"}.'
        assert run.errors == []


async def test_function_never_runs_twice_when_the_answer_to_its_result_breaks() -> None:
    """The answer to a function's result breaks mid-stream: it is continued, the function not re-run."""
    calls: list[dict] = []

    async def get_weather(params: FunctionCallParams) -> None:
        calls.append(dict(params.arguments))
        await params.result_callback({"conditions": "sunny"})

    def make() -> OpenAILLMService:
        service = OpenAILLMService(api_key="test-key", base_url=emulator.base_url)
        service.register_function("get_weather", get_weather)
        return service

    replies = {"weather in Paris?": ChatToolCall("get_weather", {"city": "Paris"})}
    plan = FaultPlan(Fault.abort(after_audio_chunks=3, connection=1))
    async with OpenAIEmulator(plan=plan, replies=replies) as emulator:
        llm = ResilientLLM(make, retry=NO_WAIT, first_token_timeout=0.5, stall_timeout=0.5)
        run = await ask(llm, "weather in Paris?", responses=2, context=LLMContext(tools=WEATHER_TOOLS))
        assert calls == [{"city": "Paris"}]
        assert run.assistant_texts[-1] == 'get_weather returned {"conditions": "sunny"}.'
        assert run.responses[-1] == 'get_weather returned {"conditions": "sunny"}.'
        assert run.errors == []


async def test_permanent_failure_reports_once_without_retrying() -> None:
    """A rejected key (401) ends at once: one authentication ErrorFrame, unusable."""
    async with OpenAIEmulator(api_key="the-right-key") as emulator:
        llm = resilient(emulator, api_key="a-wrong-key")
        run = await ask(llm)
        [error] = run.errors
        assert error.category is ErrorCategory.AUTHENTICATION
        assert isinstance(error.exception, ReplayFailed)
        assert "unfinished answer" in error.error
        assert not llm.is_usable and llm.state is State.FAILED
        assert len(emulator.requests) == 1
        # The answer that had started is closed downstream, then the error goes up.
        assert run.kinds() == ["start", "end", "error"]
        assert "without retrying" in error.error


async def test_exhausted_retries_report_one_error_and_close_the_answer() -> None:
    """A provider that keeps failing: one ErrorFrame after the policy's attempts, and the answer ends."""
    plan = FaultPlan(Fault.refuse(500, connection=None))
    async with OpenAIEmulator(plan=plan) as emulator:
        llm = resilient(emulator, retry=RetryPolicy(attempts=3, wait_initial=0, wait_max=0))
        run = await ask(llm)
        [error] = run.errors
        assert error.category is ErrorCategory.SERVER
        assert error.exception.attempts == 3
        assert len(emulator.requests) == 4  # the first, then three fresh instances
        assert run.responses_ended == 1


async def test_interruption_during_recovery_drops_the_answer() -> None:
    """The user interrupts while the request is being retried: it is not asked again."""
    plan = FaultPlan(Fault.abort(after_audio_chunks=2), Fault.refuse(503, connection=1))
    retry = RetryPolicy(attempts=3, wait_initial=5 * UNIT, wait_max=5 * UNIT, jitter=False)
    async with OpenAIEmulator(plan=plan) as emulator:
        llm = resilient(emulator, retry=retry)
        recovered = asyncio.Event()
        llm.add_event_handler("on_connection_recovered", lambda *_: recovered.set())
        run = LLMScenario(llm)
        await run.start()
        await run.ask(QUESTION)
        await emulator.wait_for_requests(2)
        await run.send(InterruptionFrame())
        await asyncio.wait_for(recovered.wait(), 50 * UNIT)
        await run.end()
        # Connection 2 came up, but nothing was asked of it.
        assert len(emulator.requests) == 2
        assert run.errors == []


async def test_events_report_the_recovery() -> None:
    """on_connection_lost and on_connection_recovered say what happened."""
    async with OpenAIEmulator(plan=FaultPlan(Fault.abort(after_audio_chunks=4))) as emulator:
        llm = resilient(emulator)
        lost, recovered = [], []
        llm.add_event_handler("on_connection_lost", lambda _, failure: lost.append(failure))
        llm.add_event_handler("on_connection_recovered", lambda _, report: recovered.append(report))
        await ask(llm)
        assert len(lost) == 1 and lost[0].category == "connectivity"
        [report] = recovered
        assert report.replayed_utterances == 1 and report.attempts == 1


def test_bad_configuration_fails_at_construction() -> None:
    """Bad input gets a clear error at construction."""
    with pytest.raises(TypeError, match="factory must be a zero-argument callable"):
        ResilientLLM(OpenAILLMService(api_key="k"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="factory must return a LLMService"):
        ResilientLLM(lambda: FrameProcessor())  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="first_token_timeout must be a positive"):
        ResilientLLM(lambda: OpenAILLMService(api_key="k"), first_token_timeout=0)
    with pytest.raises(TypeError, match="replay must be a ReplayPolicy"):
        ResilientLLM(lambda: OpenAILLMService(api_key="k"), replay="continue")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="partial_answer must be"):
        ReplayPolicy(partial_answer="again")
    with pytest.raises(ValueError, match="min_repeat_chars must be at least 1"):
        ReplayPolicy(min_repeat_chars=0)
    with pytest.raises(ValueError, match="standby=True is not supported for LLMs"):
        ResilientLLM(lambda: OpenAILLMService(api_key="k"), standby=True)
    llm = ResilientLLM(lambda: OpenAILLMService(api_key="k"))
    assert llm._host.first.service._client.max_retries == 0
