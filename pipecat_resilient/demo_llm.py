"""The demo's LLM cases: stock Pipecat and ResilientLLM under the same broken stream or session.

Three cases, each run twice at once on embedded emulators with the same fault:
an OpenAI-style answer stream that breaks mid-answer (``OpenAILLMService``),
a Gemini Live session closed with 1007 mid-reply (``GeminiLiveLLMService``),
and an OpenAI Realtime session dropped mid-reply (``OpenAIRealtimeLLMService``,
which has no recovery at all in Pipecat 1.14). Needs the ``openai`` and
``google`` extras; the demo skips what is not installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pipecat.processors.frame_processor import FrameProcessor

__all__ = ["LLMSideResult", "run_llm_cases"]

QUESTION = "What should I pack for Lisbon?"
ANSWER = (
    "Pack light layers, comfortable shoes for the hills, a light rain jacket, "
    "and sunscreen, because the afternoons are bright even in spring."
)
STORY_REQUEST = "Tell me a short story."
STORY = "Once upon a time a socket closed in the middle of a sentence, and nobody noticed but the listener."
GEMINI_MODEL = "models/gemini-2.5-flash-native-audio-preview-12-2025"
REALTIME_MODEL = "gpt-realtime"
GREETING = "Hello."


@dataclass
class LLMSideResult:
    """What one side of an LLM case produced."""

    name: str
    expected: str
    said: str
    context: str
    errors: int
    connections: int
    open_replies: int

    @property
    def complete(self) -> bool:
        """The whole answer reached the user once, the context holds it, no error, nothing left open."""
        return (
            self.said.split() == self.expected.split()
            and self.context.split() == self.expected.split()
            and self.errors == 0
            and self.open_replies == 0
        )


async def _openai_side(*, resilient: bool, realtime: bool) -> LLMSideResult:
    from pipecat.services.openai.llm import OpenAILLMService

    from pipecat_resilient.llm import ResilientLLM
    from pipecat_resilient.testing.faults import Fault, FaultPlan
    from pipecat_resilient.testing.llm_harness import LLMScenario
    from pipecat_resilient.testing.openai import OpenAIEmulator

    plan = FaultPlan(Fault.abort(after_audio_chunks=8))
    async with OpenAIEmulator(
        plan=plan, replies={QUESTION: ANSWER}, chunk_interval=0.03 if realtime else 0.0
    ) as emulator:

        def make() -> OpenAILLMService:
            return OpenAILLMService(api_key="demo-key", base_url=emulator.base_url)

        llm: FrameProcessor = ResilientLLM(make) if resilient else make()
        run = LLMScenario(llm)
        await run.start()
        await run.ask(QUESTION)
        try:
            await run.wait_until(lambda: run.responses_ended >= 1, 15.0)
        except TimeoutError:
            pass
        await run.end()
        said = "".join(run.responses)
        return LLMSideResult(
            "ResilientLLM(OpenAILLMService)" if resilient else "stock OpenAILLMService",
            ANSWER,
            said,
            " ".join(run.assistant_texts),
            len(run.errors),
            len(emulator.requests),
            max(0, len(run.responses) - run.responses_ended),
        )


async def _gemini_side(*, resilient: bool, realtime: bool) -> LLMSideResult:
    from pipecat.services.google.gemini_live.llm import GeminiLiveLLMService

    from pipecat_resilient.llm import ResilientLLM
    from pipecat_resilient.testing.faults import Fault, FaultPlan
    from pipecat_resilient.testing.gemini_live import LAST_CHUNK_BEFORE_TURN_COMPLETE, GeminiLiveEmulator
    from pipecat_resilient.testing.harness import SessionScenario

    plan = FaultPlan(Fault.close(1007, LAST_CHUNK_BEFORE_TURN_COMPLETE, after_audio_chunks=6))
    async with GeminiLiveEmulator(
        plan=plan,
        script={STORY_REQUEST: STORY},
        bundle_transcription=True,
        realtime=realtime,
        ms_per_char=20.0 if realtime else 5.0,
    ) as emulator:

        def make() -> GeminiLiveLLMService:
            return GeminiLiveLLMService(
                api_key="demo-key",
                http_options=emulator.http_options(),
                settings=GeminiLiveLLMService.Settings(model=GEMINI_MODEL),
            )

        llm: FrameProcessor = ResilientLLM(make) if resilient else make()
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(STORY_REQUEST)
            listener = run.listener
            await listener.settle(
                lambda: (
                    len(listener.heard) >= len(STORY.split())
                    and listener.responses_started == listener.responses_ended
                )
            )
        return LLMSideResult(
            "ResilientLLM(GeminiLiveLLMService)" if resilient else "stock GeminiLiveLLMService",
            STORY,
            " ".join(listener.heard),
            " ".join(run.assistant_texts),
            len(run.errors),
            len(emulator.connections),
            listener.responses_started - listener.responses_ended,
        )


async def _openai_realtime_side(*, resilient: bool, realtime: bool) -> LLMSideResult:
    from pipecat.services.openai.realtime import events
    from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService

    from pipecat_resilient.llm import ResilientLLM
    from pipecat_resilient.testing.faults import Fault, FaultPlan
    from pipecat_resilient.testing.harness import SessionScenario
    from pipecat_resilient.testing.openai_realtime import OpenAIRealtimeEmulator

    greeting_reply = "Hi! What can I do for you?"
    chunks_before = -(-len(greeting_reply) // 5)  # the greeting's audio chunks, five characters each
    plan = FaultPlan(Fault.close(1011, "Internal error encountered.", after_audio_chunks=chunks_before + 6))
    ms_per_char = 20.0 if realtime else 5.0
    async with OpenAIRealtimeEmulator(
        plan=plan,
        script={GREETING: greeting_reply, STORY_REQUEST: STORY},
        transcript="before_audio",
        realtime=realtime,
        ms_per_char=ms_per_char,
        input_ms_per_char=10.0,
    ) as emulator:

        def make() -> OpenAIRealtimeLLMService:
            audio_input = events.AudioInput(
                transcription=events.InputAudioTranscription(),
                turn_detection=events.TurnDetection(silence_duration_ms=100),
            )
            properties = events.SessionProperties(audio=events.AudioConfiguration(input=audio_input))
            return OpenAIRealtimeLLMService(
                api_key="demo-key",
                base_url=emulator.base_url,
                settings=OpenAIRealtimeLLMService.Settings(
                    model=REALTIME_MODEL, session_properties=properties
                ),
            )

        llm: FrameProcessor = ResilientLLM(make) if resilient else make()
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            listener = run.listener
            # A greeting first (the session learns how fast its model speaks), then the request, spoken.
            await run.start_conversation(GREETING)
            try:
                await listener.wait_until(lambda: listener.responses_ended >= 1, 15.0)
                await asyncio.sleep(0.3)
            except TimeoutError:
                pass
            greeting_words = len(listener.heard)
            await run.speak(STORY_REQUEST, sample_rate=24000)
            await listener.settle(
                lambda: (
                    len(listener.heard) >= greeting_words + len(STORY.split())
                    and listener.started == listener.stopped
                )
            )
        said = listener.heard[greeting_words:]
        context = " ".join(run.assistant_texts).split()[len(greeting_reply.split()) :]
        return LLMSideResult(
            "ResilientLLM(OpenAIRealtimeLLMService)" if resilient else "stock OpenAIRealtimeLLMService",
            STORY,
            " ".join(said),
            " ".join(context),
            len(run.errors),
            len(emulator.connections),
            # The stock service opens each reply it asks for with two response
            # starts; its spoken part is bracketed once.
            listener.started - listener.stopped,
        )


def _quote(text: str, width: int = 96) -> str:
    text = text or "(nothing)"
    return text if len(text) <= width else text[: width - 3] + "..."


def _print(
    index: int, title: str, stock: LLMSideResult, resilient: LLMSideResult, out: Callable[[str], None]
) -> None:
    out("")
    out(f"{index}. {title}")
    out(f"   {'':28}{'stock':>14}{'resilient':>14}")
    for label, a, b in (
        (
            "whole answer delivered once",
            "yes" if stock.said.split() == stock.expected.split() else "no",
            "yes" if resilient.said.split() == resilient.expected.split() else "no",
        ),
        (
            "context == what was said",
            "yes" if stock.context.split() == stock.said.split() else "no",
            "yes" if resilient.context.split() == resilient.said.split() else "no",
        ),
        ("replies left open", stock.open_replies, resilient.open_replies),
        ("error frames", stock.errors, resilient.errors),
        ("requests / connections", stock.connections, resilient.connections),
    ):
        out(f"   {label:28}{a!s:>14}{b!s:>14}")
    out(f'   stock said:         "{_quote(stock.said)}"')
    out(f'   stock context:      "{_quote(stock.context)}"')
    out(f'   resilient said:     "{_quote(resilient.said)}"')
    out(f'   resilient context:  "{_quote(resilient.context)}"')


async def run_llm_cases(
    *, realtime: bool, out: Callable[[str], None], first_index: int
) -> list[tuple[LLMSideResult, LLMSideResult]]:
    """Run the LLM cases that the installed extras allow, print them, and return them."""
    cases: list[tuple[str, Callable[..., Awaitable[LLMSideResult]]]] = []
    try:
        import pipecat.services.openai.llm  # noqa: F401
    except ImportError:
        out("\n(skipping the OpenAI case: pip install 'pipecat-resilient[openai]')")
    else:
        cases.append(("An OpenAI answer stream breaks mid-answer (TCP reset)", _openai_side))
    try:
        import pipecat.services.google.gemini_live.llm  # noqa: F401
        import trustme  # noqa: F401
    except ImportError:
        out("\n(skipping the Gemini Live case: pip install 'pipecat-resilient[google]')")
    else:
        cases.append(("Gemini Live closes the session with 1007 mid-reply", _gemini_side))
    try:
        import pipecat.services.openai.realtime.llm  # noqa: F401
    except ImportError:
        out("\n(skipping the OpenAI Realtime case: pip install 'pipecat-resilient[openai]')")
    else:
        cases.append(("An OpenAI Realtime session drops mid-reply (1011)", _openai_realtime_side))
    results = await asyncio.gather(
        *[
            asyncio.gather(side(resilient=False, realtime=realtime), side(resilient=True, realtime=realtime))
            for _, side in cases
        ]
    )
    pairs = [(stock, resilient) for stock, resilient in results]
    titles = [title for title, _ in cases]
    for index, (title, (stock, resilient)) in enumerate(zip(titles, pairs, strict=True), start=first_index):
        _print(index, title, stock, resilient, out)
    return pairs
