"""The speech-to-speech chaos bench: seeded session faults, stock Pipecat and ResilientLLM side by side.

``pipecat-resilient chaos --side llm --provider gemini-live|openai-realtime``
runs a conversation - a greeting, then spoken questions each answered with a
few sentences - through the stock ``GeminiLiveLLMService`` (or
``OpenAIRealtimeLLMService``) and through the same service inside
:class:`~pipecat_resilient.llm.ResilientLLM`, each against its own embedded
emulator, under one seeded schedule of faults armed at the start of a turn:
closes (1011, 1007), aborts, half-open stalls, a drop whose reconnect is
refused with 503, and, for Gemini Live, a reply that comes with no audio and
a session that stops answering, for OpenAI Realtime an ``error`` event on an
open socket. The emulated model goes on with a cut reply as
``continuation`` says (it continues, restarts, or repeats a phrase).

What each side did is measured from what a listener heard, decoded from the
audio: answer words lost, heard twice, context words never heard, heard words
missing from the context, turns left unanswered, error frames, connections,
and (resilient side) the time from detecting each failure to a live session.
The exit status is 1 when the resilient side lost, repeated or misreported a
word.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger
from pipecat.frames.frames import UserStartedSpeakingFrame, UserStoppedSpeakingFrame
from pipecat.processors.frame_processor import FrameProcessor

from pipecat_resilient.policy import ReplayPolicy, RetryPolicy
from pipecat_resilient.testing.faults import Fault
from pipecat_resilient.testing.harness import SessionScenario
from pipecat_resilient.testing.report import WordAccount, account

__all__ = ["LLM_FAULTS", "PROVIDERS", "LLMChaosConfig", "LLMChaosReport", "LLMTurn", "main", "run_llm_chaos"]

PROVIDERS = ("gemini-live", "openai-realtime")
LLM_FAULTS: dict[str, tuple[str, ...]] = {
    "gemini-live": ("close-1011", "close-1007", "abort", "stall", "refuse-503", "silent", "mute"),
    "openai-realtime": ("close-1011", "abort", "stall", "refuse-503", "error"),
}
"""The faults the bench can schedule, per provider (``--mix`` takes a comma list of these)."""

GREETING = "Hello."
GREETING_REPLY = "Hi there, how can I help you today?"
GEMINI_MODEL = "models/gemini-2.5-flash-native-audio-preview-12-2025"
REALTIME_MODEL = "gpt-realtime"
_WORDS = (
    "account afternoon answer appointment balance booking card city clinic code confirm customer date "
    "delivery detail doctor email evening flight garden hotel invoice kitchen letter meeting morning "
    "number office order package parcel payment phone plan question receipt refund room schedule "
    "station street ticket time train travel visit weather window"
).split()
_QUESTIONS = ("Tell me about my {}.", "What about the {}?", "Can you check the {}?", "And the {}?")


@dataclass(frozen=True, slots=True)
class LLMChaosConfig:
    """What to run.

    Parameters:
        provider: ``"gemini-live"`` or ``"openai-realtime"``.
        seed: Seeds the questions, answers and faults.
        turns: Questions after the greeting.
        faults: How many of them get a fault.
        mix: Fault kinds to draw from (all of the provider's when empty).
        continuation: How the emulated model goes on with a cut reply.
        transcript: When output transcription goes out against its audio:
            ``"bundled"`` (Gemini Live: in the same message as its audio),
            ``"with_audio"`` (right after it), ``"before_audio"``,
            ``"after_audio"``; None for ``"bundled"`` (Gemini Live) or
            ``"before_audio"`` (OpenAI Realtime). When the transcription
            trails the audio, a word heard just before a cut whose
            transcription had not come yet is heard again (by design: a word
            the transcription never named is not dropped).
        ms_per_char: Speech rate of the emulated model.
        turn_limit: Longest a side may take over one turn, in seconds.
        idle: A side that has produced nothing for this long is done with a
            turn (a stock service that lost it, say).
        continuation_hold_s: ``ReplayPolicy.continuation_hold_s`` of the
            resilient side.
    """

    provider: str = "gemini-live"
    seed: int = 2026
    turns: int = 6
    faults: int = 4
    mix: tuple[str, ...] = ()
    continuation: str = "restart"
    transcript: str | None = None
    ms_per_char: float = 5.0
    turn_limit: float = 8.0
    idle: float = 2.5
    continuation_hold_s: float = 0.3

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}")
        if self.turns < 1 or not 0 <= self.faults <= self.turns:
            raise ValueError("turns must be at least 1, and faults between 0 and turns")
        unknown = set(self.mix) - set(LLM_FAULTS[self.provider])
        if unknown:
            raise ValueError(f"{self.provider} cannot schedule {', '.join(sorted(unknown))}")
        if self.continuation not in ("continue", "restart", "repeat"):
            raise ValueError("continuation must be continue, restart or repeat")
        if self.transcript == "bundled" and self.provider != "gemini-live":
            raise ValueError("only Gemini Live bundles transcription with its audio")


@dataclass(frozen=True, slots=True)
class LLMTurn:
    """One question of the schedule, its answer, and the fault armed when it is asked."""

    index: int
    question: str
    answer: str
    fault: str | None
    after_chunks: int


def make_schedule(config: LLMChaosConfig) -> list[LLMTurn]:
    """The questions, answers and faults for ``config`` (the same for a seed)."""
    rng = random.Random(config.seed)
    kinds = config.mix or LLM_FAULTS[config.provider]
    faulted = set(rng.sample(range(config.turns), config.faults))
    turns = []
    used: set[str] = set()
    asked: set[str] = set()
    for index in range(config.turns):
        topic = rng.choice([word for word in _WORDS if word not in used] or _WORDS)
        used.add(topic)
        question = rng.choice(_QUESTIONS).format(topic)
        while question in asked:
            # Every question once: the emulated model answers a question by its text.
            question = rng.choice(_QUESTIONS).format(f"{rng.choice(_WORDS)} {topic}")
        asked.add(question)
        sentences = [
            " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 9))).capitalize() + "."
            for _ in range(rng.randint(2, 3))
        ]
        fault = rng.choice(kinds) if index in faulted else None
        turns.append(LLMTurn(index, question, " ".join(sentences), fault, rng.randint(3, 8)))
    return turns


@dataclass
class LLMSideReport:
    """What one side did over the whole schedule."""

    name: str
    words: dict[str, Any] = field(default_factory=dict)
    errors: int = 0
    connections: int = 0
    recoveries: list[float] = field(default_factory=list)  # seconds from detecting a drop to a live session
    unanswered: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def honest(self) -> bool:
        """Nothing lost or repeated, and the context is what was heard."""
        return not any(
            self.words.get(key) for key in ("lost", "repeated", "unheard_in_context", "heard_not_in_context")
        )


@dataclass
class LLMChaosReport:
    """Both sides under one schedule."""

    config: LLMChaosConfig
    schedule: list[LLMTurn]
    stock: LLMSideReport
    resilient: LLMSideReport

    @property
    def ok(self) -> bool:
        """Whether the resilient side lost, repeated and misreported nothing, and raised no error."""
        return self.resilient.honest and self.resilient.errors == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "schedule": [asdict(turn) for turn in self.schedule],
            "stock": asdict(self.stock),
            "resilient": asdict(self.resilient),
        }


def _words(account_: WordAccount) -> dict[str, Any]:
    return {
        "expected": len(account_.expected),
        "heard": len(account_.heard),
        "lost": list(account_.lost),
        "repeated": list(account_.repeated),
        "unheard_in_context": list(account_.unheard_in_context),
        "heard_not_in_context": list(account_.heard_not_in_context),
    }


async def _side(config: LLMChaosConfig, schedule: Sequence[LLMTurn], *, resilient: bool) -> LLMSideReport:
    script: dict[str, str] = {GREETING: GREETING_REPLY}
    script.update({turn.question: turn.answer for turn in schedule})
    if config.provider == "gemini-live":
        emulator, make = _gemini(config, script)
        rate = 16000
    else:
        emulator, make = _openai_realtime(config, script)
        rate = 24000
    name = f"ResilientLLM({config.provider})" if resilient else f"stock {config.provider}"
    report = LLMSideReport(name)
    started = time.monotonic()
    async with emulator:
        factory = make(emulator)
        retry = RetryPolicy(attempts=6, wait_initial=0.05, wait_max=0.2, timeout=10.0, attempt_timeout=3.0)
        llm: FrameProcessor = (
            _resilient(factory, retry, config.continuation_hold_s) if resilient else factory()
        )
        if resilient:
            llm.add_event_handler(
                "on_connection_recovered",
                lambda _, recovery: report.recoveries.append(round(recovery.downtime, 3)),
            )
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            listener = run.listener
            expected = GREETING_REPLY.split()
            await run.start_conversation(GREETING)
            await _settle(run, expected, 0, config)
            for turn in schedule:
                await asyncio.sleep(0.2)  # a pause between turns
                _arm(emulator, turn)
                since = len(listener.heard)
                await _ask(run, config, turn.question, rate)
                expected += turn.answer.split()
                if not await _settle(run, turn.answer.split(), since, config):
                    report.unanswered.append(turn.index)
        report.words = _words(account(expected, listener.heard, " ".join(run.assistant_texts).split()))
        report.errors = len(run.errors)
        report.connections = len(emulator.connections)
    report.seconds = round(time.monotonic() - started, 2)
    return report


async def _ask(run: SessionScenario, config: LLMChaosConfig, question: str, rate: int) -> None:
    """Say ``question``; with Gemini Live, framed as a local VAD frames it (OpenAI's own VAD does that)."""
    if config.provider == "gemini-live":
        await run.send(UserStartedSpeakingFrame())
    await run.speak(question, sample_rate=rate)
    if config.provider == "gemini-live":
        await run.send(UserStoppedSpeakingFrame())


def _resilient(factory: Any, retry: RetryPolicy, hold: float) -> FrameProcessor:
    from pipecat_resilient.llm import ResilientLLM

    return ResilientLLM(
        factory,
        retry=retry,
        replay=ReplayPolicy(continuation_hold_s=hold),
        first_token_timeout=1.0,
        stall_timeout=1.0,
    )


async def _settle(run: SessionScenario, answer: list[str], since: int, config: LLMChaosConfig) -> bool:
    """Wait until every word of ``answer`` was heard and no reply is open, or nothing moves for a while.

    The words must be heard, in order, among those heard since the turn
    began (``since`` words before it): a count of words heard would take a
    word heard twice (after a cut, say) for one of the answer's, call the turn
    over while its continuation is still to come, and have the next question
    cut in on it - the answer's rest then counted as lost.
    """
    listener = run.listener
    return await listener.settle(
        lambda: _heard_in_order(answer, listener.heard[since:]) and listener.started == listener.stopped,
        idle=config.idle,
        limit=config.turn_limit,
    )


def _heard_in_order(words: Sequence[str], heard: Sequence[str]) -> bool:
    """Whether ``words`` occur in ``heard`` in order (other words, repeated ones say, in between)."""
    remaining = iter(heard)
    return all(word in remaining for word in words)


def _arm(emulator: Any, turn: LLMTurn) -> None:
    kind, chunks = turn.fault, turn.after_chunks
    if kind is None:
        return
    if kind.startswith("close-"):
        emulator.arm(
            Fault.close(int(kind.split("-")[1]), "Internal error encountered.", after_audio_chunks=chunks)
        )
    elif kind == "abort":
        emulator.arm(Fault.abort(after_audio_chunks=chunks))
    elif kind == "stall":
        emulator.arm(Fault.stall(after_audio_chunks=chunks))
    elif kind == "refuse-503":
        emulator.arm(Fault.close(1011, "Internal error encountered.", after_audio_chunks=chunks))
        emulator.arm(Fault.refuse(503))
    elif kind == "error":
        from pipecat_resilient.testing.openai_realtime import SERVER_ERROR

        emulator.arm(Fault.error(SERVER_ERROR, 500, after_audio_chunks=chunks))
    elif kind == "silent":
        emulator.silence_next_reply()
    elif kind == "mute":
        # The newest connection with a session (the newest may be a refused one).
        for index in range(len(emulator.connections) - 1, -1, -1):
            try:
                emulator.mute(index)
                return
            except RuntimeError:
                continue


def _gemini(config: LLMChaosConfig, script: dict[str, str]) -> tuple[Any, Any]:
    from pipecat.services.google.gemini_live.llm import GeminiLiveLLMService

    from pipecat_resilient.testing.gemini_live import GeminiLiveEmulator

    timing = config.transcript or "bundled"
    emulator = GeminiLiveEmulator(
        script=script,
        continuation=config.continuation,  # type: ignore[arg-type]
        transcription="with_audio" if timing == "bundled" else timing,  # type: ignore[arg-type]
        bundle_transcription=timing == "bundled",
        ms_per_char=config.ms_per_char,
    )

    def make(emulator: GeminiLiveEmulator) -> Any:
        def factory() -> GeminiLiveLLMService:
            return GeminiLiveLLMService(
                api_key="chaos-key",
                http_options=emulator.http_options(),
                settings=GeminiLiveLLMService.Settings(model=GEMINI_MODEL),
            )

        return factory

    return emulator, make


def _openai_realtime(config: LLMChaosConfig, script: dict[str, str]) -> tuple[Any, Any]:
    from pipecat.services.openai.realtime import events
    from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService

    from pipecat_resilient.testing.openai_realtime import OpenAIRealtimeEmulator

    emulator = OpenAIRealtimeEmulator(
        script=script,
        continuation=config.continuation,  # type: ignore[arg-type]
        transcript=config.transcript or "before_audio",  # type: ignore[arg-type]
        ms_per_char=config.ms_per_char,
    )

    def make(emulator: OpenAIRealtimeEmulator) -> Any:
        def factory() -> OpenAIRealtimeLLMService:
            audio_input = events.AudioInput(
                transcription=events.InputAudioTranscription(),
                turn_detection=events.TurnDetection(silence_duration_ms=100),
            )
            properties = events.SessionProperties(audio=events.AudioConfiguration(input=audio_input))
            return OpenAIRealtimeLLMService(
                api_key="chaos-key",
                base_url=emulator.base_url,
                settings=OpenAIRealtimeLLMService.Settings(
                    model=REALTIME_MODEL, session_properties=properties
                ),
            )

        return factory

    return emulator, make


async def run_llm_chaos(config: LLMChaosConfig) -> LLMChaosReport:
    """Run both sides under ``config``'s schedule, one after the other.

    Not at once: a stock session that died answers every frame of the
    caller's audio with an error (over a thousand in a long run), and in the
    same event loop that flood delays the other side's transcripts past its
    continuation hold, which no bot of its own would see.
    """
    schedule = make_schedule(config)
    resilient = await _side(config, schedule, resilient=True)
    stock = await _side(config, schedule, resilient=False)
    return LLMChaosReport(config, schedule, stock, resilient)


def format_table(report: LLMChaosReport) -> str:
    """The report as a table for a terminal."""
    config = report.config
    faults = [f"{turn.index}:{turn.fault}" for turn in report.schedule if turn.fault]
    lines = [
        f"speech-to-speech chaos: {config.provider}, seed {config.seed}, {config.turns} turns, "
        f"model {config.continuation}s a cut reply",
        f"faults: {', '.join(faults) or 'none'}",
        "",
        f"{'':34}{'stock':>14}{'resilient':>14}",
    ]

    def row(label: str, stock: object, resilient: object) -> None:
        lines.append(f"{label:34}{stock!s:>14}{resilient!s:>14}")

    s, r = report.stock, report.resilient
    row("answer words expected", s.words["expected"], r.words["expected"])
    row("words lost", len(s.words["lost"]), len(r.words["lost"]))
    row("words heard twice", len(s.words["repeated"]), len(r.words["repeated"]))
    row("context words never heard", len(s.words["unheard_in_context"]), len(r.words["unheard_in_context"]))
    row(
        "heard words missing in context",
        len(s.words["heard_not_in_context"]),
        len(r.words["heard_not_in_context"]),
    )
    row("turns left unanswered", len(s.unanswered), len(r.unanswered))
    row("error frames", s.errors, r.errors)
    row("connections", s.connections, r.connections)

    def median(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}s" if values else "-"

    row("drop detected to live (median)", median(s.recoveries), median(r.recoveries))
    row("run time", f"{s.seconds:.1f}s", f"{r.seconds:.1f}s")
    lines.append("")
    lines.append("resilient side: " + ("every word heard once, context honest" if report.ok else "SLIPPED"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``pipecat-resilient chaos --side llm``: run and print; the status is 1 if the resilient side slips."""
    parser = argparse.ArgumentParser(
        prog="pipecat-resilient chaos --side llm",
        description="A seeded schedule of session faults through a stock speech-to-speech service and "
        "ResilientLLM, one after the other, on embedded emulators.",
    )
    parser.add_argument("--provider", choices=PROVIDERS, default="gemini-live")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--faults", type=int, default=4)
    parser.add_argument(
        "--mix", default="", help="comma list of fault kinds (default: all of the provider's)"
    )
    parser.add_argument("--continuation", choices=("continue", "restart", "repeat"), default="restart")
    parser.add_argument(
        "--transcript", choices=("bundled", "with_audio", "before_audio", "after_audio"), default=None
    )
    parser.add_argument("--out", type=Path, default=None, help="directory for report.json")
    # Taken as the other sides take them, so one script can run all three.
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (this side prints none)")
    parser.add_argument("--verbose", action="store_true", help="show the services' log")
    args = parser.parse_args(argv)
    try:
        config = LLMChaosConfig(
            provider=args.provider,
            seed=args.seed,
            turns=args.turns,
            faults=args.faults,
            mix=tuple(kind for kind in args.mix.split(",") if kind),
            continuation=args.continuation,
            transcript=args.transcript,
        )
    except ValueError as exc:
        parser.error(str(exc))
    logger.remove()
    if args.verbose:
        logger.add(sys.stderr, level="DEBUG")
    report = asyncio.run(run_llm_chaos(config))
    print(format_table(report))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    return 0 if report.ok else 1
