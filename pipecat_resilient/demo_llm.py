"""The demo's LLM cases: stock Pipecat and ResilientLLM under the same broken stream or session.

Two cases, each run twice at once on embedded emulators with the same fault:
an OpenAI-style answer stream that breaks mid-answer (``OpenAILLMService``),
and a Gemini Live session closed with 1007 mid-reply
(``GeminiLiveLLMService``). Needs the ``openai`` and ``google`` extras; the
demo skips what is not installed.
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
