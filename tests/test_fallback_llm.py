"""Fallback chains for streaming LLMs: the answer continues on the next endpoint, and comes back.

Two OpenAI-compatible endpoints (two chat-completions emulators, each a real
HTTP server) behind one ResilientLLM; the stock OpenAILLMService talks to
them. The assertions are on what went downstream, what Pipecat's aggregators
wrote into the context, which endpoint answered what, and the events raised.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.llm_service import FunctionCallParams
from pipecat.services.openai.llm import OpenAILLMService

from pipecat_resilient import BreakerPolicy, Health, LocalHealthStore, ResilientLLM
from pipecat_resilient.testing import ChatToolCall, Fault, FaultPlan, OpenAIEmulator
from pipecat_resilient.testing.llm_harness import LLMScenario

from .test_llm import ANSWER, NO_WAIT, QUESTION, WEATHER_TOOLS

# The primary refuses every request after its first (it is down).
DOWN_AFTER_FIRST = [Fault.refuse(503, connection=index) for index in range(1, 30)]
SECOND_QUESTION = "and then what"
SECOND_ANSWER = "You said: and then what. That is all."


def endpoint(emulator: OpenAIEmulator, functions: dict[str, Any] | None = None) -> Any:
    def make() -> OpenAILLMService:
        service = OpenAILLMService(api_key="test-key", base_url=emulator.base_url)
        for name, handler in (functions or {}).items():
            service.register_function(name, handler)
        return service

    return make


def chain(primary: OpenAIEmulator, backup: OpenAIEmulator, **options: Any) -> ResilientLLM:
    options.setdefault("health", LocalHealthStore())
    functions = options.pop("functions", None)
    return ResilientLLM(
        endpoint(primary, functions),
        fallbacks=[endpoint(backup, functions)],
        retry=NO_WAIT,
        first_token_timeout=0.5,
        stall_timeout=0.5,
        **options,
    )


def record_switches(llm: ResilientLLM) -> tuple[list[tuple[str, str]], asyncio.Event]:
    switches: list[tuple[str, str]] = []
    changed = asyncio.Event()

    @llm.event_handler("on_provider_switched")
    async def switched(processor: Any, old: str, new: str, reason: str) -> None:
        switches.append((old, new))
        changed.set()

    return switches, changed


async def test_an_answer_cut_while_the_primary_goes_down_is_continued_on_the_fallback() -> None:
    """Cut mid-answer, the primary refusing: the fallback continues it; downstream and context see it once."""
    plan = FaultPlan(Fault.abort(after_audio_chunks=3), *DOWN_AFTER_FIRST)
    async with OpenAIEmulator(plan=plan) as primary, OpenAIEmulator() as backup:
        llm = chain(primary, backup)
        switches, _ = record_switches(llm)
        run = LLMScenario(llm, context=LLMContext())
        await run.start()
        await run.ask(QUESTION)
        await run.wait_until(lambda: run.responses_ended >= 1, 10.0)
        await run.end()
        assert run.kinds(collapse=True) == ["start", "text", "end"]
        assert run.responses == [ANSWER]
        assert run.assistant_texts == [ANSWER]
        assert run.errors == []
        assert switches == [("OpenAILLMService", "OpenAILLMService#2")]
        assert llm.provider_name == "OpenAILLMService#2"
        # The fallback was asked to continue what had been said, not to start over.
        [continued] = backup.requests
        assistant = [m for m in continued.messages if m.get("role") == "assistant"]
        assert assistant and ANSWER.startswith(str(assistant[-1]["content"]).strip())
        # The cut request, then one refused retry on the primary before moving on.
        assert len(primary.requests) == 2


async def test_a_function_runs_once_when_its_answer_moves_to_the_fallback() -> None:
    """The answer to a tool result breaks and the primary is down: continued on the fallback, no re-run."""
    calls: list[dict[str, Any]] = []

    async def get_weather(params: FunctionCallParams) -> None:
        calls.append(dict(params.arguments))
        await params.result_callback({"conditions": "sunny"})

    replies = {"weather in Paris?": ChatToolCall("get_weather", {"city": "Paris"})}
    plan = FaultPlan(Fault.abort(after_audio_chunks=3, connection=1), *DOWN_AFTER_FIRST[1:])
    async with (
        OpenAIEmulator(plan=plan, replies=replies) as primary,
        OpenAIEmulator(replies=replies) as backup,
    ):
        llm = chain(primary, backup, functions={"get_weather": get_weather})
        run = LLMScenario(llm, context=LLMContext(tools=WEATHER_TOOLS))
        await run.start()
        await run.ask("weather in Paris?")
        await run.wait_until(lambda: run.responses_ended >= 2, 10.0)
        await run.end()
        assert calls == [{"city": "Paris"}]
        assert run.assistant_texts[-1] == 'get_weather returned {"conditions": "sunny"}.'
        assert run.responses[-1] == 'get_weather returned {"conditions": "sunny"}.'
        assert run.errors == []
        # The fallback continued the answer to the result it was given, without asking for the call.
        [continued] = backup.requests
        assert any(m.get("role") == "tool" for m in continued.messages)


@pytest.mark.parametrize("switch_back", ["boundary", "never"])
async def test_the_preferred_endpoint_is_taken_back_between_answers_unless_never(switch_back: str) -> None:
    """Once the primary's breaker is half-open, the next answer comes from it (``boundary``).

    For an HTTP service there is no connection to probe: that next answer is the probe.
    """
    plan = FaultPlan(Fault.abort(after_audio_chunks=3))
    store = LocalHealthStore(policy=BreakerPolicy(failures=1, cooldown=0.05, cooldown_max=0.05))
    async with OpenAIEmulator(plan=plan) as primary, OpenAIEmulator() as backup:
        llm = chain(primary, backup, health=store, switch_back=switch_back)
        switches, changed = record_switches(llm)
        run = LLMScenario(llm, context=LLMContext())
        await run.start()
        await run.ask(QUESTION)
        await run.wait_until(lambda: run.responses_ended >= 1, 10.0)
        assert switches == [("OpenAILLMService", "OpenAILLMService#2")]
        if switch_back == "boundary":
            changed.clear()
            await asyncio.wait_for(changed.wait(), 10.0)
            assert switches[-1] == ("OpenAILLMService#2", "OpenAILLMService")
        await run.ask(SECOND_QUESTION)
        await run.wait_until(lambda: run.responses_ended >= 2, 10.0)
        await run.end()
        assert run.responses == [ANSWER, SECOND_ANSWER]
        assert run.assistant_texts == [ANSWER, SECOND_ANSWER]
        assert run.errors == []
        asked_primary = any(SECOND_QUESTION in str(r.messages[-1].get("content")) for r in primary.requests)
        asked_backup = any(SECOND_QUESTION in str(r.messages[-1].get("content")) for r in backup.requests)
        assert asked_primary == (switch_back == "boundary")
        assert asked_backup == (switch_back == "never")
        if switch_back == "boundary":
            assert await store.state("OpenAILLMService") is Health.CLOSED


def test_a_chain_of_mixed_kinds_is_refused_at_construction() -> None:
    """A streaming primary cannot fall back on a speech-to-speech session (or the reverse)."""
    pytest.importorskip("pipecat.services.openai.realtime.llm")
    from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService

    streaming = endpoint(type("E", (), {"base_url": "http://127.0.0.1:9/v1"})())
    with pytest.raises(TypeError, match="cannot fall back on each other"):
        ResilientLLM(streaming, fallbacks=[lambda: OpenAIRealtimeLLMService(api_key="k")])
    with pytest.raises(TypeError, match=r"fallbacks\[0\] must be a zero-argument callable"):
        ResilientLLM(streaming, fallbacks=["openai"])  # type: ignore[list-item]


async def test_a_failed_probe_answer_moves_back_to_the_fallback_before_any_text() -> None:
    """Taken back while still down: the answer that probes it fails before its first token and is
    answered whole by the fallback; nobody downstream can tell."""
    plan = FaultPlan(Fault.abort(after_audio_chunks=3), Fault.refuse(503, connection=1))
    store = LocalHealthStore(policy=BreakerPolicy(failures=1, cooldown=0.05, cooldown_max=0.05))
    async with OpenAIEmulator(plan=plan) as primary, OpenAIEmulator() as backup:
        llm = chain(primary, backup, health=store)
        switches, changed = record_switches(llm)
        run = LLMScenario(llm, context=LLMContext())
        await run.start()
        await run.ask(QUESTION)
        await run.wait_until(lambda: run.responses_ended >= 1, 10.0)
        changed.clear()
        await asyncio.wait_for(changed.wait(), 10.0)
        await run.ask(SECOND_QUESTION)
        await run.wait_until(lambda: run.responses_ended >= 2, 10.0)
        await run.end()
        assert run.kinds(collapse=True) == ["start", "text", "end", "start", "text", "end"]
        assert run.responses == [ANSWER, SECOND_ANSWER]
        assert run.assistant_texts == [ANSWER, SECOND_ANSWER]
        assert run.errors == []
        name, backup_name = "OpenAILLMService", "OpenAILLMService#2"
        assert switches == [(name, backup_name), (backup_name, name), (name, backup_name)]
        assert [r.index for r in primary.requests] == [0, 1]  # the cut answer, the refused probe
        # Taking it back proved nothing (HTTP: nothing was connected); the refused answer did.
        assert await store.state(name) is not Health.CLOSED


async def test_the_fallback_endpoint_is_built_ahead_of_time_not_on_the_event_loop_at_the_switch() -> None:
    """Building an OpenAILLMService takes tens of ms (its SDK loads a CA bundle): the switch takes the
    instance built at construction, and the next one is built in a worker thread."""
    built_on_loop: list[bool] = []

    async with (
        OpenAIEmulator(plan=FaultPlan(Fault.abort(after_audio_chunks=3))) as primary,
        OpenAIEmulator() as backup,
    ):
        make = endpoint(backup)

        def build() -> OpenAILLMService:
            built_on_loop.append(threading.current_thread() is threading.main_thread())
            return make()

        llm = ResilientLLM(
            endpoint(primary),
            fallbacks=[build],
            retry=NO_WAIT,
            health=LocalHealthStore(policy=BreakerPolicy(failures=1)),
        )
        assert built_on_loop == [True, True]  # at construction, to check the factory
        switches, _ = record_switches(llm)
        run = LLMScenario(llm, context=LLMContext())
        await run.start()
        await run.ask(QUESTION)
        await run.wait_until(lambda: run.responses_ended >= 1, 10.0)
        await run.end()
        async with asyncio.timeout(10.0):
            while len(built_on_loop) < 3:  # the next one, in a worker thread
                await asyncio.sleep(0.01)
        assert switches == [("OpenAILLMService", "OpenAILLMService#2")]
        assert run.responses == [ANSWER] and run.errors == []
        assert built_on_loop == [True, True, False]
