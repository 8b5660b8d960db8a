"""The side-by-side demo: stock Pipecat and the resilient processors under the same provider faults.

Runs each case twice at once, on two embedded ElevenLabs emulators with the
same fault plan: once with the stock ``ElevenLabsTTSService`` and once with
the same service inside :class:`~pipecat_resilient.tts.ResilientTTS`. Prints
what each listener heard (decoded from the audio), what each LLM context
recorded, and the dead air. No keys, no network. The LLM cases are in
:mod:`pipecat_resilient.demo_llm`, the speech-to-text case (a Deepgram socket
closed mid-turn) in :mod:`pipecat_resilient.demo_stt`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSSpeakFrame,
)
from pipecat.processors.frame_processor import FrameProcessor

from pipecat_resilient.testing.elevenlabs import ElevenLabsEmulator
from pipecat_resilient.testing.faults import Fault, FaultPlan
from pipecat_resilient.testing.harness import Scenario
from pipecat_resilient.testing.report import WordAccount, account

__all__ = ["DemoCase", "SideResult", "main", "run_demo"]

SAMPLE_RATE = 24000


@dataclass(frozen=True)
class DemoCase:
    """One fault, and what the bot was saying when it hit.

    Parameters:
        title: Shown as the heading.
        plan: Builds the fault plan (one per emulator).
        frames: Builds the frames to send.
        utterances: How many utterances the frames hold.
    """

    title: str
    plan: Callable[[], FaultPlan]
    frames: Callable[[], list[Frame]]
    utterances: int = 1

    @property
    def text(self) -> str:
        """Everything the bot meant to say."""
        parts = []
        for frame in self.frames():
            if isinstance(frame, TTSSpeakFrame):
                parts.append(frame.text)
            elif isinstance(frame, LLMTextFrame):
                parts.append(frame.text)
        return " ".join(" ".join(parts).split())


def _turn(*tokens: str) -> list[Frame]:
    return [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in tokens], LLMFullResponseEndFrame()]


CASES: tuple[DemoCase, ...] = (
    DemoCase(
        "ElevenLabs restarts the socket (close 1012) mid-sentence",
        lambda: FaultPlan(Fault.close(1012, "service restart", after_audio_chunks=5)),
        lambda: [
            TTSSpeakFrame(
                "Your appointment is confirmed for Tuesday at ten in the morning with Doctor Patel."
            )
        ],
    ),
    DemoCase(
        "The socket goes half-open during a streamed LLM answer",
        lambda: FaultPlan(Fault.stall(after_audio_chunks=7)),
        lambda: _turn(
            "Sure. ",
            "Your order shipped yesterday ",
            "and should arrive on Friday. ",
            "You will get a tracking number by email.",
        ),
    ),
    DemoCase(
        "The network drops the connection (1006), and the first reconnect is refused (503)",
        lambda: FaultPlan(Fault.abort(after_audio_chunks=6), Fault.refuse(503, connection=1)),
        lambda: _turn(
            "I found three flights. ",
            "The cheapest leaves at seven and costs two hundred dollars. ",
            "Shall I book it?",
        ),
    ),
)


@dataclass
class SideResult:
    """What one side of a case produced."""

    name: str
    words: WordAccount
    silences: list[float]
    errors: int
    connections: int
    recovered: list[float] = field(default_factory=list)


async def _run_side(case: DemoCase, *, resilient: bool, ms_per_char: float, realtime: bool) -> SideResult:
    from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

    from pipecat_resilient.tts import ResilientTTS

    async with ElevenLabsEmulator(
        plan=case.plan(),
        ms_per_char=ms_per_char,
        realtime=realtime,
        first_audio_delay=0.1 if realtime else 0.0,
    ) as emulator:

        def make() -> ElevenLabsTTSService:
            return ElevenLabsTTSService(
                api_key="demo-key",
                url=emulator.url,
                settings=ElevenLabsTTSService.Settings(voice="demo-voice"),
            )

        recovered: list[float] = []
        tts: FrameProcessor
        if resilient:
            tts = ResilientTTS(make)
            tts.add_event_handler(
                "on_connection_recovered", lambda _, report: recovered.append(report.downtime)
            )
            name = "ResilientTTS(ElevenLabsTTSService)"
        else:
            tts = make()
            name = "stock ElevenLabsTTSService"
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE), sample_rate=SAMPLE_RATE)
        await run.start()
        await run.send(*case.frames())
        expected = case.text.split()
        listener = run.listener
        await listener.settle(
            lambda: len(listener.heard) >= len(expected) and listener.stopped >= case.utterances
        )
        if not resilient:
            # A stock service stuck on a half-open socket would spend its close
            # timeouts (4 s) saying goodbye to it; nobody is listening.
            await emulator.stop()
        await run.end()
        silences = [gap for _, gap in run.listener.silences(SAMPLE_RATE, threshold=0.05)]
        return SideResult(
            name,
            account(expected, run.heard, run.context_words),
            silences,
            len(run.errors),
            len(emulator.connections),
            recovered,
        )


def _quote(words: tuple[str, ...], width: int = 96) -> str:
    text = " ".join(words) or "(nothing)"
    return text if len(text) <= width else text[: width - 3] + "..."


def _print_case(
    index: int, case: DemoCase, stock: SideResult, resilient: SideResult, out: Callable[[str], None]
) -> None:
    out("")
    out(f"{index}. {case.title}")
    out(f'   bot meant to say: "{case.text}"')
    header = f"   {'':28}{'stock':>14}{'resilient':>14}"
    out(header)
    rows = [
        ("words meant", len(stock.words.expected), len(resilient.words.expected)),
        ("words heard", len(stock.words.heard), len(resilient.words.heard)),
        ("words lost", len(stock.words.lost), len(resilient.words.lost)),
        ("words heard twice", len(stock.words.repeated), len(resilient.words.repeated)),
        (
            "context words never heard",
            len(stock.words.unheard_in_context),
            len(resilient.words.unheard_in_context),
        ),
        (
            "heard words not in context",
            len(stock.words.heard_not_in_context),
            len(resilient.words.heard_not_in_context),
        ),
        ("error frames", stock.errors, resilient.errors),
        ("connections", stock.connections, resilient.connections),
    ]
    for label, a, b in rows:
        out(f"   {label:28}{a:>14}{b:>14}")
    dead_stock = f"{max(stock.silences):.2f}s" if stock.silences else "-"
    dead_resilient = f"{max(resilient.silences):.2f}s" if resilient.silences else "-"
    if len(stock.words.heard) < len(stock.words.expected):
        dead_stock = "forever"
    out(f"   {'longest dead air':28}{dead_stock:>14}{dead_resilient:>14}")
    out(f'   stock heard:        "{_quote(stock.words.heard)}"')
    out(f'   stock context:      "{_quote(stock.words.context)}"')
    out(f'   resilient heard:    "{_quote(resilient.words.heard)}"')
    out(f'   resilient context:  "{_quote(resilient.words.context)}"')


async def run_demo(
    *,
    realtime: bool = True,
    ms_per_char: float = 25.0,
    out: Callable[[str], None] = print,
    llm: bool = True,
    stt: bool = True,
) -> list[tuple[SideResult, SideResult]]:
    """Run every case on both sides and print the comparison.

    Args:
        realtime: Pace the emulators' audio at its own duration (so dead air
            means something); False runs as fast as possible.
        ms_per_char: Speech rate of the emulated voice.
        out: Where to print.
        llm: Run the LLM cases too (OpenAI stream, Gemini Live session).
        stt: Run the speech-to-text case too (Deepgram, a socket closed mid-turn).

    Returns:
        ``(stock, resilient)`` results per TTS case; the LLM cases' results are
        in :attr:`last_llm_results`, the STT case's in :attr:`last_stt_results`.
    """
    out("pipecat-resilient demo: stock Pipecat vs the resilient processors, same faults, local emulators")
    out("(what was heard is decoded from the audio that reached the end of each pipeline)")
    results = await asyncio.gather(
        *[
            asyncio.gather(
                _run_side(case, resilient=False, ms_per_char=ms_per_char, realtime=realtime),
                _run_side(case, resilient=True, ms_per_char=ms_per_char, realtime=realtime),
            )
            for case in CASES
        ]
    )
    pairs = [(stock, resilient) for stock, resilient in results]
    out("")
    out("TTS: ElevenLabsTTSService")
    for index, (case, (stock, resilient)) in enumerate(zip(CASES, pairs, strict=True), start=1):
        _print_case(index, case, stock, resilient, out)
    lost_stock = sum(len(s.words.lost) for s, _ in pairs)
    lied_stock = sum(len(s.words.unheard_in_context) for s, _ in pairs)
    total = sum(len(s.words.expected) for s, _ in pairs)
    resilient_ok = all(r.words.honest and r.errors == 0 for _, r in pairs)
    out("")
    out(
        f"TTS, stock: {lost_stock} of {total} words lost, "
        f"{lied_stock} unheard words written into the context.  "
        + ("resilient: every word heard once, context == heard." if resilient_ok else "resilient: NOT CLEAN.")
    )
    last_llm_results.clear()
    if llm:
        from pipecat_resilient.demo_llm import run_llm_cases

        out("")
        out("LLM")
        llm_pairs = await run_llm_cases(realtime=realtime, out=out, first_index=len(CASES) + 1)
        last_llm_results.extend(llm_pairs)
        if llm_pairs:
            stock_done = sum(1 for s, _ in llm_pairs if s.complete)
            resilient_done = sum(1 for _, r in llm_pairs if r.complete)
            out("")
            out(
                f"LLM, stock: {stock_done} of {len(llm_pairs)} answers delivered whole.  "
                f"resilient: {resilient_done} of {len(llm_pairs)}."
            )
    last_stt_results.clear()
    if stt:
        from pipecat_resilient.demo_stt import run_stt_case

        out("")
        out("STT: DeepgramSTTService")
        index = len(CASES) + len(last_llm_results) + 1
        last_stt_results.append(await run_stt_case(realtime=realtime, out=out, index=index))
    return pairs


last_llm_results: list[Any] = []
"""The LLM cases' ``(stock, resilient)`` results of the last :func:`run_demo`."""

last_stt_results: list[Any] = []
"""The STT case's ``(stock, resilient)`` result of the last :func:`run_demo`."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pipecat-resilient demo``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="pipecat-resilient demo",
        description="Run stock Pipecat services and the same services inside the resilient processors "
        "side by side, under the same provider faults, on embedded emulators (no keys, no network). "
        "For each case it prints what each listener heard (decoded from the audio), what each LLM "
        "context recorded, and the longest dead air.",
        epilog="Exit status: 0 when the resilient side was clean in every case, 1 when it was not, "
        "2 on a usage error.",
    )
    parser.add_argument(
        "--fast", action="store_true", help="send audio as fast as possible (no real-time pacing)"
    )
    parser.add_argument("--verbose", action="store_true", help="show the services' log")
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "CRITICAL")
    pairs = asyncio.run(run_demo(realtime=not args.fast))
    tts_ok = all(r.words.honest and r.errors == 0 for _, r in pairs)
    llm_ok = all(r.complete for _, r in last_llm_results)
    stt_ok = all(r.clean for _, r in last_stt_results)
    return 0 if tts_ok and llm_ok and stt_ok else 1
