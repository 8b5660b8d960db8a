"""The OpenAI chat-completions emulator, and the stock OpenAILLMService under its faults.

The pipeline tests drive the stock ``OpenAILLMService`` (Pipecat 1.14) in a
real pipeline with an ``LLMContext`` and its aggregators, and pin down the
behaviour PROVIDERS.md section 3 describes. If Pipecat or the openai SDK ever
change it, they fail, and we want to know.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import AsyncOpenAI
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import ErrorFrame, LLMFullResponseEndFrame, LLMTextFrame
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import ErrorCategory, FrameDirection
from pipecat.services.llm_service import FunctionCallParams
from pipecat.services.openai.llm import OpenAILLMService

from pipecat_resilient.policy import CONTINUE_INSTRUCTION
from pipecat_resilient.testing import Fault, FaultKind, FaultPlan, OpenAIEmulator
from pipecat_resilient.testing.llm_harness import LLMScenario
from pipecat_resilient.testing.openai import ChatToolCall, tokens

from .conftest import UNIT

API_KEY = "test-key"
QUESTION = "hello there"
ANSWER = "You said: hello there. That is all."
WEATHER = ChatToolCall("get_weather", {"city": "Paris", "unit": "celsius"})
WEATHER_TOOLS = ToolsSchema(
    standard_tools=[
        FunctionSchema(
            name="get_weather",
            description="Current weather in a city.",
            properties={"city": {"type": "string"}, "unit": {"type": "string"}},
            required=["city"],
        )
    ]
)


def stock_llm(emulator: OpenAIEmulator, *, max_retries: int | None = None, **kwargs: Any) -> OpenAILLMService:
    """A stock OpenAILLMService on the emulator; ``max_retries`` swaps in a client with that budget.

    Pipecat builds its client in the public ``create_client`` hook without a
    retry setting, so a retry budget other than the SDK's default of 2 needs
    that hook overridden. Nothing else about the service changes.
    """
    if max_retries is None:
        return OpenAILLMService(api_key=API_KEY, base_url=emulator.base_url, **kwargs)
    retries = max_retries

    class RetryBudgetService(OpenAILLMService):
        def create_client(self, api_key: Any = None, base_url: Any = None, **_: Any) -> AsyncOpenAI:
            return AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=retries)

    return RetryBudgetService(api_key=API_KEY, base_url=emulator.base_url, **kwargs)


async def ask_and_wait(
    run: LLMScenario, text: str = QUESTION, *, responses: int = 1, timeout: float = 20 * UNIT
) -> None:
    """Ask ``text`` and wait until ``responses`` responses have ended."""
    await run.ask(text)
    await run.wait_until(lambda: run.responses_ended >= responses, timeout)


# The emulator on its own, through the openai SDK.


async def test_stream_is_token_chunks_then_finish_usage_and_done() -> None:
    """A streamed answer is small content chunks, a finish reason, a usage chunk, and [DONE]."""
    async with OpenAIEmulator() as emulator:
        client = AsyncOpenAI(api_key=API_KEY, base_url=emulator.base_url, max_retries=0)
        stream = await client.chat.completions.create(
            model="gpt-4.1",
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == tokens(ANSWER) and len(contents) > 5
    assert "".join(contents) == ANSWER
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(contents)
    record = emulator.requests[0]
    assert record.completed and record.text_sent == ANSWER and record.retry_count == 0


async def test_tool_call_arrives_as_id_and_name_then_argument_pieces() -> None:
    """A scripted tool call streams its id and name first, then its JSON arguments in pieces."""
    async with OpenAIEmulator(replies={"weather?": WEATHER}) as emulator:
        client = AsyncOpenAI(api_key=API_KEY, base_url=emulator.base_url, max_retries=0)
        stream = await client.chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": "weather?"}], stream=True
        )
        calls = [
            c.choices[0].delta.tool_calls[0]
            for c in [x async for x in stream]
            if c.choices and c.choices[0].delta.tool_calls
        ]
    assert calls[0].id == "call_0_0" and calls[0].function.name == "get_weather"
    assert all(c.id is None and c.function.name is None for c in calls[1:])
    assert len(calls) > 3
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {
        "city": "Paris",
        "unit": "celsius",
    }


async def test_wrong_api_key_is_refused_with_401() -> None:
    """With an api_key set, a request with another key gets 401 and is not retried."""
    async with OpenAIEmulator(api_key="right") as emulator:
        client = AsyncOpenAI(api_key="wrong", base_url=emulator.base_url)
        with pytest.raises(Exception) as raised:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=True
            )
    assert getattr(raised.value, "status_code", None) == 401
    assert [r.status for r in emulator.requests] == [401]


def test_replies_of_another_kind_are_rejected() -> None:
    """A scripted reply must be text or this module's ChatToolCall (not, say, Gemini Live's)."""
    with pytest.raises(TypeError):
        OpenAIEmulator(replies={"x": {"name": "f", "args": {}}})  # type: ignore[dict-item]


def test_faults_without_http_meaning_are_rejected() -> None:
    """GoAway and text-message triggers have no meaning for HTTP."""
    with pytest.raises(ValueError):
        OpenAIEmulator(plan=FaultPlan(Fault.go_away()))
    with pytest.raises(ValueError):
        OpenAIEmulator(plan=FaultPlan(Fault.abort(after_text_messages=1)))


# The stock OpenAILLMService in a pipeline.


async def test_streamed_answer_arrives_between_start_and_end_and_lands_in_context() -> None:
    """A normal answer arrives as LLMTextFrames between the start and end frames, and ends in the context."""
    async with OpenAIEmulator() as emulator:
        async with LLMScenario(stock_llm(emulator)) as run:
            await ask_and_wait(run)
    assert run.kinds(collapse=True) == ["start", "text", "end"]
    assert run.texts == tokens(ANSWER)
    assert run.responses == [ANSWER]
    assert run.errors == []
    assert run.context_messages == [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": ANSWER},
    ]
    assert len(emulator.requests) == 1
    assert emulator.requests[0].stream and emulator.requests[0].body["stream_options"] == {
        "include_usage": True
    }


async def test_tool_call_runs_the_function_once_and_its_result_goes_back() -> None:
    """A streamed tool call runs the registered function once; its result goes back in a second request."""
    calls: list[dict[str, Any]] = []

    async def get_weather(params: FunctionCallParams) -> None:
        calls.append(dict(params.arguments))
        await params.result_callback({"conditions": "sunny", "celsius": 21})

    async with OpenAIEmulator(replies={"weather?": WEATHER}) as emulator:
        llm = stock_llm(emulator)
        llm.register_function("get_weather", get_weather)
        async with LLMScenario(llm, context=LLMContext(tools=WEATHER_TOOLS)) as run:
            await ask_and_wait(run, "weather?", responses=2)
    assert calls == [{"city": "Paris", "unit": "celsius"}]
    first, second = emulator.requests
    assert first.tool_names == ["get_weather"] and not first.continuation
    assert second.continuation
    assert second.tool_results == [("get_weather", '{"conditions": "sunny", "celsius": 21}')]
    assert run.responses == ["", 'get_weather returned {"conditions": "sunny", "celsius": 21}.']
    assert run.assistant_texts[-1] == run.responses[-1]
    assert run.errors == []


async def test_mid_stream_drop_keeps_partial_text_then_error_then_end_and_no_retry() -> None:
    """A TCP drop after 3 chunks: 3 text frames stay, an ErrorFrame goes up, the end follows, no retry."""
    async with OpenAIEmulator(plan=FaultPlan(Fault.abort(after_audio_chunks=3))) as emulator:
        async with LLMScenario(stock_llm(emulator)) as run:
            await ask_and_wait(run)
    assert run.kinds(collapse=True) == ["start", "text", "error", "end"]
    assert run.texts == tokens(ANSWER)[:3]
    (error,) = run.timeline.of(ErrorFrame)
    assert error.direction is FrameDirection.UPSTREAM
    assert "Connection error" in error.frame.error and not error.frame.fatal
    # Pipecat does not classify the SDK's APIConnectionError as connectivity.
    assert error.frame.category is ErrorCategory.UNKNOWN
    record = emulator.requests[0]
    assert record.fault is not None and record.fault.kind is FaultKind.ABORT
    assert record.faulted_at is not None and error.at - record.faulted_at < 5 * UNIT
    assert len(emulator.requests) == 1
    # The cut answer is written to the context as if it were the whole reply.
    assert run.assistant_texts == ["You said:"]


async def test_clean_early_end_truncates_the_answer_silently() -> None:
    """A response that ends cleanly without [DONE] is taken as a complete answer: no error at all."""
    async with OpenAIEmulator(plan=FaultPlan(Fault.close(1000, after_audio_chunks=3))) as emulator:
        async with LLMScenario(stock_llm(emulator)) as run:
            await ask_and_wait(run)
    assert run.kinds(collapse=True) == ["start", "text", "end"]
    assert run.texts == tokens(ANSWER)[:3]
    assert run.errors == []
    assert not emulator.requests[0].completed
    assert run.assistant_texts == ["You said:"]


async def test_http_500_is_retried_by_the_sdk_then_reported_once() -> None:
    """HTTP 500 before the stream: the SDK tries 3 times in all, then one ErrorFrame, category server."""
    # retry-after-ms keeps the SDK's waits at 10 ms instead of about 0.4 s and 0.9 s.
    plan = FaultPlan(Fault.refuse(500, connection=None, headers={"retry-after-ms": "10"}))
    async with OpenAIEmulator(plan=plan) as emulator:
        async with LLMScenario(stock_llm(emulator)) as run:
            await ask_and_wait(run)
    assert [(r.status, r.retry_count) for r in emulator.requests] == [(500, 0), (500, 1), (500, 2)]
    assert run.kinds() == ["start", "error", "end"]
    (error,) = run.errors
    assert "500" in error.error and error.category is ErrorCategory.SERVER
    assert run.llm.is_usable
    assert run.assistant_texts == []


async def test_sdk_backoff_without_retry_after_and_a_smaller_retry_budget() -> None:
    """Without Retry-After the SDK waits 0.375-0.5 s to retry; max_retries bounds the requests."""
    async with OpenAIEmulator(plan=FaultPlan(Fault.refuse(503, connection=None))) as emulator:
        async with LLMScenario(stock_llm(emulator, max_retries=1)) as run:
            await ask_and_wait(run)
    first, second = emulator.requests
    assert [first.retry_count, second.retry_count] == [0, 1]
    assert 0.3 <= second.received_at - first.received_at <= 0.7
    assert len(run.errors) == 1 and run.errors[0].category is ErrorCategory.SERVER


async def test_one_refusal_before_the_stream_is_invisible_to_pipecat() -> None:
    """A 429 with Retry-After on the first request: the SDK waits that long, retries, and succeeds."""
    plan = FaultPlan(Fault.refuse(429, headers={"Retry-After": str(2 * UNIT)}))
    async with OpenAIEmulator(plan=plan) as emulator:
        async with LLMScenario(stock_llm(emulator)) as run:
            await ask_and_wait(run)
    first, second = emulator.requests
    assert (first.status, second.status, second.retry_count) == (429, 200, 1)
    assert second.received_at - first.received_at >= 2 * UNIT
    assert run.errors == [] and run.responses == [ANSWER]


async def test_401_is_not_retried_and_makes_the_service_unusable() -> None:
    """HTTP 401: one request, an authentication ErrorFrame, and the service marks itself unusable."""
    async with OpenAIEmulator(plan=FaultPlan(Fault.refuse(401))) as emulator:
        async with LLMScenario(stock_llm(emulator)) as run:
            await ask_and_wait(run)
    assert len(emulator.requests) == 1
    (error,) = run.errors
    assert error.category is ErrorCategory.AUTHENTICATION
    assert not run.llm.is_usable


async def test_drop_before_the_response_is_retried_by_the_sdk() -> None:
    """A connection dropped before any response is retried by the SDK, unseen by Pipecat."""
    async with OpenAIEmulator(plan=FaultPlan(Fault.abort())) as emulator:
        async with LLMScenario(stock_llm(emulator)) as run:
            await ask_and_wait(run)
    assert [r.retry_count for r in emulator.requests] == [0, 1]
    assert run.errors == [] and run.responses == [ANSWER]


async def test_stalled_stream_blocks_the_response() -> None:
    """A stream that stops after 2 chunks leaves the response open: no error, no end frame, nothing more."""
    async with OpenAIEmulator(plan=FaultPlan(Fault.stall(after_audio_chunks=2))) as emulator:
        run = LLMScenario(stock_llm(emulator))
        await run.start()
        try:
            await run.ask(QUESTION)
            await run.wait_until(lambda: len(run.texts) == 2, 10 * UNIT)
            with pytest.raises(TimeoutError):
                await run.wait_until(lambda: run.responses_ended > 0 or len(run.texts) > 2, 3 * UNIT)
            assert run.errors == []
            assert not emulator.requests[0].closed
        finally:
            await run.cancel()
        # Cancelling the pipeline is what finally hangs up on the emulator.
        await emulator.wait_until(lambda: emulator.requests[0].closed, 10 * UNIT)
    assert len(emulator.requests) == 1


async def test_retry_on_timeout_covers_a_stall_before_the_headers_only() -> None:
    """retry_on_timeout re-issues a request whose headers never came, but not one stalled after them."""
    plan = FaultPlan(Fault.stall(connection=0), Fault.stall(after_audio_chunks=0, connection=2))
    async with OpenAIEmulator(plan=plan) as emulator:
        llm = stock_llm(emulator, retry_on_timeout=True, retry_timeout_secs=2 * UNIT)
        run = LLMScenario(llm)
        await run.start()
        try:
            # Request 0 stalls before its headers; pipecat re-issues it as request 1.
            await ask_and_wait(run)
            assert [r.fault is not None for r in emulator.requests] == [True, False]
            assert run.errors == [] and run.responses == [ANSWER]
            # Request 2 sends its headers, then stalls: create() has returned, so no retry.
            await run.ask("again")
            with pytest.raises(TimeoutError):
                await run.wait_until(lambda: run.responses_ended > 1, 5 * UNIT)
            assert len(emulator.requests) == 3
        finally:
            await run.cancel()


async def test_slow_first_token_is_only_slow() -> None:
    """A first token 0.3 s late delays the answer and nothing else."""
    async with OpenAIEmulator(plan=FaultPlan(Fault.delay_first_audio(3 * UNIT))) as emulator:
        async with LLMScenario(stock_llm(emulator)) as run:
            await ask_and_wait(run)
    first_text = run.timeline.of(LLMTextFrame)[0]
    assert first_text.at - emulator.requests[0].received_at >= 3 * UNIT
    assert run.errors == [] and run.responses == [ANSWER]
    assert len(run.timeline.of(LLMFullResponseEndFrame)) == 1


async def test_paced_stream_drops_after_a_time() -> None:
    """With chunks 50 ms apart, an abort after 0.12 s cuts the answer after its third chunk."""
    plan = FaultPlan(Fault.abort(after_seconds=1.2 * UNIT))
    async with OpenAIEmulator(plan=plan, chunk_interval=0.5 * UNIT) as emulator:
        async with LLMScenario(stock_llm(emulator)) as run:
            await ask_and_wait(run)
    assert run.texts == tokens(ANSWER)[:3]
    assert run.kinds(collapse=True) == ["start", "text", "error", "end"]


# Conversations of several turns, and requests to continue a cut answer.

FIRST, SECOND = "what time is it", "and the date"
TWO_TURNS = {FIRST: "It is ten past nine in the morning.", SECOND: "Today is Tuesday the fourth of March."}


async def test_second_turn_of_a_conversation_gets_its_own_reply() -> None:
    """User, assistant, user: the second turn gets its own scripted reply; it is not a cut answer."""
    async with OpenAIEmulator(replies=TWO_TURNS) as emulator:
        async with LLMScenario(stock_llm(emulator)) as run:
            await ask_and_wait(run, FIRST)
            await ask_and_wait(run, SECOND, responses=2)
    assert run.responses == [TWO_TURNS[FIRST], TWO_TURNS[SECOND]]
    assert run.assistant_texts == [TWO_TURNS[FIRST], TWO_TURNS[SECOND]]
    assert run.errors == []
    second = emulator.requests[1]
    assert [m["role"] for m in second.messages] == ["user", "assistant", "user"]
    assert second.text_sent == TWO_TURNS[SECOND] and second.cut_answer is None


async def test_fault_planned_for_the_second_request_fires() -> None:
    """A drop planned for the second request of a conversation cuts the second answer."""
    plan = FaultPlan(Fault.abort(after_audio_chunks=2, connection=1))
    async with OpenAIEmulator(plan=plan, replies=TWO_TURNS) as emulator:
        async with LLMScenario(stock_llm(emulator, max_retries=0)) as run:
            await ask_and_wait(run, FIRST)
            await ask_and_wait(run, SECOND, responses=2)
    first, second = emulator.requests
    assert first.fault is None and first.completed
    assert second.fault is not None and second.fault.kind is FaultKind.ABORT
    assert second.text_sent == "".join(tokens(TWO_TURNS[SECOND])[:2])
    assert run.responses == [TWO_TURNS[FIRST], second.text_sent]
    assert len(run.errors) == 1


async def complete(emulator: OpenAIEmulator, messages: list[dict[str, str]]) -> str:
    """The streamed answer to ``messages``, through the openai SDK."""
    client = AsyncOpenAI(api_key=API_KEY, base_url=emulator.base_url, max_retries=0)
    stream = await client.chat.completions.create(model="gpt-4.1", messages=messages, stream=True)  # type: ignore[arg-type]
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_only_the_continue_instruction_asks_to_continue() -> None:
    """A cut answer is continued when the last user message is the instruction, and not otherwise."""
    whole = TWO_TURNS[SECOND]
    cut = "".join(tokens(whole)[:3])
    conversation = [
        {"role": "user", "content": FIRST},
        {"role": "assistant", "content": TWO_TURNS[FIRST]},
        {"role": "user", "content": SECOND},
        {"role": "assistant", "content": cut},
    ]
    async with OpenAIEmulator(replies=TWO_TURNS) as emulator:
        continued = await complete(
            emulator, [*conversation, {"role": "user", "content": CONTINUE_INSTRUCTION}]
        )
        # The same ending with another user text is a new turn, answered on its own.
        asked = await complete(emulator, [*conversation, {"role": "user", "content": cut}])
    assert continued == whole[len(cut) :]
    assert emulator.requests[0].cut_answer == cut
    assert asked == f"You said: {cut}. That is all." and emulator.requests[1].cut_answer is None


async def test_continue_marker_matches_a_custom_instruction() -> None:
    """With continue_marker set, that text (not the default instruction) asks to continue."""
    cut = "".join(tokens(ANSWER)[:4])
    conversation = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": cut}]
    async with OpenAIEmulator(continue_marker="Go on.") as emulator:
        continued = await complete(emulator, [*conversation, {"role": "user", "content": "Go on."}])
        default = await complete(emulator, [*conversation, {"role": "user", "content": CONTINUE_INSTRUCTION}])
    assert continued == ANSWER[len(cut) :]
    assert default == f"You said: {CONTINUE_INSTRUCTION}. That is all."
