"""The demo's speech-to-text case: stock Pipecat and ResilientSTT under the same dropped socket.

The caller says one turn into the stock ``DeepgramSTTService`` and into the
same service inside :class:`~pipecat_resilient.stt.ResilientSTT`, each against
its own embedded Deepgram emulator that closes the socket with 1011 in the
middle of the turn. The caller's audio is speech code, so the words that reach
the LLM context (the user turn Pipecat's user aggregator committed) can be
checked against the words said. No keys, no network.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from pipecat.processors.frame_processor import FrameProcessor

__all__ = ["STTSideResult", "TITLE", "UTTERANCE", "run_stt_case"]

TITLE = "Deepgram closes the socket (1011) mid-turn"
UTTERANCE = "I need to move my dentist appointment from Tuesday to Thursday afternoon, please."
FAULT_WORD = "appointment"  # the socket closes a little into this word
API_KEY = "demo-key"
MS_PER_CHAR = 20.0
MESSAGE_S = 0.02  # the stock service sends one message per 20 ms frame


@dataclass
class STTSideResult:
    """What one side of the speech-to-text case produced.

    Parameters:
        name: The processor that ran.
        said: The words the caller said.
        context: The words of the user turns committed to the LLM context.
        lost: Words said that never reached the context.
        extra: Words in the context the caller did not say (repeats).
        turns: User turns committed to the context.
        errors: Error frames that went upstream.
        connections: Connections the emulator saw.
    """

    name: str
    said: list[str]
    context: list[str]
    lost: list[str]
    extra: list[str]
    turns: int
    errors: int
    connections: int

    @property
    def clean(self) -> bool:
        """Every word in the context once, in one turn, and no error frame."""
        return self.context == self.said and self.turns == 1 and self.errors == 0


async def _side(*, resilient: bool, realtime: bool) -> STTSideResult:
    from pipecat.services.deepgram.stt import DeepgramSTTService

    from pipecat_resilient.stt import ResilientSTT
    from pipecat_resilient.testing.deepgram_stt import DeepgramSTTEmulator
    from pipecat_resilient.testing.faults import Fault, FaultPlan
    from pipecat_resilient.testing.stt_harness import Caller, STTScenario

    caller = Caller([UTTERANCE], ms_per_char=MS_PER_CHAR)
    word = next(w for w in caller.said if w.text == FAULT_WORD)
    # The audio message that carries the middle of the turn (the first connection's count).
    mid = int((word.start + 0.05) / MESSAGE_S) + 1
    plan = FaultPlan(Fault.close(1011, "NET-0000", after_audio_received=mid))
    # Finals of four words, so the close cuts a group the connection had not finalized.
    async with DeepgramSTTEmulator(
        plan=plan, api_key=API_KEY, ms_per_char=MS_PER_CHAR, words_per_final=4
    ) as emulator:

        def make() -> DeepgramSTTService:
            return DeepgramSTTService(api_key=API_KEY, base_url=emulator.url)

        stt: FrameProcessor = ResilientSTT(make) if resilient else make()
        run = STTScenario(stt)
        await run.start()
        try:
            await run.speak(caller, pace=1.0 if realtime else None)
            await run.settle(
                lambda: run.turns_stopped >= 1 and len(run.user_messages) >= 1 and not run.lost(caller),
                idle=1.0,
                limit=15.0,
            )
            result = STTSideResult(
                "ResilientSTT(DeepgramSTTService)" if resilient else "stock DeepgramSTTService",
                caller.words,
                run.user_words,
                run.lost(caller, run.user_words),
                run.extra(caller, run.user_words),
                len(run.user_messages),
                len(run.errors),
                len(emulator.connections),
            )
            if not resilient:
                # The stock service may be waiting out its reconnect backoff; nobody is listening.
                await emulator.stop()
            with contextlib.suppress(Exception):
                await run.end(timeout=10.0)
        finally:
            await run.cancel()
    return result


def _quote(words: list[str], width: int = 96) -> str:
    text = " ".join(words) or "(nothing)"
    return text if len(text) <= width else text[: width - 3] + "..."


def _print(index: int, stock: STTSideResult, resilient: STTSideResult, out: Callable[[str], None]) -> None:
    out("")
    out(f"{index}. {TITLE}")
    out(f'   caller said: "{UTTERANCE}"')
    out(f"   {'':28}{'stock':>14}{'resilient':>14}")
    for label, a, b in (
        ("words said", len(stock.said), len(resilient.said)),
        ("words in the LLM context", len(stock.context), len(resilient.context)),
        ("words lost", len(stock.lost), len(resilient.lost)),
        ("words not said / twice", len(stock.extra), len(resilient.extra)),
        ("user turns committed", stock.turns, resilient.turns),
        ("error frames", stock.errors, resilient.errors),
        ("connections", stock.connections, resilient.connections),
    ):
        out(f"   {label:28}{a:>14}{b:>14}")
    out(f'   stock context:      "{_quote(stock.context)}"')
    out(f'   resilient context:  "{_quote(resilient.context)}"')


async def run_stt_case(
    *, realtime: bool, out: Callable[[str], None], index: int
) -> tuple[STTSideResult, STTSideResult]:
    """Run the speech-to-text case on both sides at once, print it, and return ``(stock, resilient)``.

    Args:
        realtime: Send the caller's audio at its own pace; False sends it as
            fast as the pipeline takes it.
        out: Where to print.
        index: The case's number in the demo.
    """
    stock, resilient = await asyncio.gather(
        _side(resilient=False, realtime=realtime), _side(resilient=True, realtime=realtime)
    )
    _print(index, stock, resilient, out)
    out("")
    out(
        f"STT, stock: {len(stock.lost)} of {len(stock.said)} words lost, "
        f"{stock.errors} error frame{'' if stock.errors == 1 else 's'}.  "
        + (
            "resilient: every word in the context once, one turn."
            if resilient.clean
            else "resilient: NOT CLEAN."
        )
    )
    return stock, resilient
