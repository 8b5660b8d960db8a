"""The speech-to-text chaos bench: seeded connection faults, stock Pipecat and ResilientSTT side by side.

``pipecat-resilient chaos --side stt --provider deepgram|assemblyai`` has a
caller say a seeded script of sentences, one turn each, as speech-code audio
(:class:`~pipecat_resilient.testing.stt_harness.Caller`: 20 ms frames, the VAD
frames around each sentence) through the stock ``DeepgramSTTService`` (or
``AssemblyAISTTService``) and through the same service inside
:class:`~pipecat_resilient.stt.ResilientSTT`, each against its own embedded
emulator, under one seeded schedule of faults, each striking a seeded number
of audio messages into its turn (in the middle of a word, between two, or in
the silence after the sentence): closes (1000, 1011, 1012), aborts (1006), a
stall (half-open) while the caller speaks, a drop whose reconnect is refused
(503, or 429 with ``Retry-After``) or never answered, the provider's error
message (Deepgram leaves the socket open, AssemblyAI closes it), a drop of the
replacement too, and outages: the provider down for a while, its connections
cut, refusing, stalling or hanging every new one meanwhile. The Deepgram
emulator is unkind: finals of four words, and the newest word of every interim
misheard.

What each side did is measured from what reached the pipeline: caller words
said, transcribed (final transcripts), lost, transcribed twice (or words never
said: the tail of a cut word), the user turns committed to the LLM context by
Pipecat's own aggregator against the sentences said, error frames,
connections, and per fault the time from the fault to a fresh connection and
(resilient side) to the recovery (the fresh connection live and sent the audio
not yet final). Each sentence goes in as fast as the pipeline takes it
(``--pace 1`` for real time), then silence in real time, as a transport's,
until the turn is over: every word transcribed and the turn ended, or the side
quiet for a while (``idle``); the aggregator commits a turn with Pipecat's
default timing (``user_speech_timeout`` 0.6 s). The exit status is 1 when the
resilient side lost a word, transcribed one twice or the context differs from
what was said; 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger
from pipecat.frames.frames import InputAudioRawFrame
from pipecat.processors.frame_processor import FrameProcessor

from pipecat_resilient.chaos import (
    _WORDS,
    _count,
    _fmt,
    _kinds_type,
    _OutageTrigger,
    _percentiles,
    _positive_number,
    _progress_run,
)
from pipecat_resilient.policy import RetryPolicy
from pipecat_resilient.testing._server import WebsocketEmulator
from pipecat_resilient.testing.assemblyai import AssemblyAIEmulator
from pipecat_resilient.testing.deepgram_stt import DeepgramSTTEmulator
from pipecat_resilient.testing.faults import Fault, FaultKind
from pipecat_resilient.testing.stt_harness import Caller, SaidWord, STTScenario

__all__ = [
    "ALL_FAULT_KINDS",
    "FAULT_KINDS",
    "OUTAGE_KINDS",
    "PROVIDERS",
    "STTChaosConfig",
    "STTChaosReport",
    "STTSideReport",
    "STTTurn",
    "format_table",
    "main",
    "make_schedule",
    "run_stt_chaos",
]

PROVIDERS = ("deepgram", "assemblyai")

FAULT_KINDS: tuple[str, ...] = (
    "close-1000",
    "close-1011",
    "close-1012",
    "abort",
    "stall",
    "refuse-503",
    "refuse-429",
    "hang",
    "error",
    "replacement-drop",
)
"""The faults of one connection (``hang``: a drop, then the reconnect's handshake never answered)."""

OUTAGE_KINDS: tuple[str, ...] = ("outage-refuse", "outage-stall", "outage-hang")
"""The provider down for a while: its open connections cut, every new one refused (503), stalled
(upgraded, then silent) or hung (handshake never answered) until it comes back."""

ALL_FAULT_KINDS: tuple[str, ...] = FAULT_KINDS + OUTAGE_KINDS
"""Every fault the bench can schedule: the default mix (``--mix`` takes a comma list of these)."""

API_KEY = "chaos-key"
SAMPLE_RATE = 16000
LEAD_S = 0.1  # silence before each sentence
PAUSE_S = 0.6  # silence after it (the VAD stop comes 0.2 s into it)
# Seconds of audio in one message each stock service sends (Pipecat sends
# Deepgram each 20 ms frame, AssemblyAI 50 ms chunks).
MESSAGE_S = {"deepgram": 0.02, "assemblyai": 0.05}
_FRAME_S = 0.02
_SLIPS_SHOWN = 12  # turns listed under a failing table
_SILENCE = bytes(2 * round(SAMPLE_RATE * _FRAME_S))


@dataclass(frozen=True, slots=True)
class STTChaosConfig:
    """What to run.

    Parameters:
        provider: ``"deepgram"`` or ``"assemblyai"``.
        seed: Seeds the sentences and the faults (same seed, same schedule).
        turns: Sentences the caller says, one turn each.
        faults: How many of them get a fault (at most one each).
        mix: Fault kinds to draw from (every kind in :data:`ALL_FAULT_KINDS` when empty).
        pace: Speed of the caller's audio against real time (1.0: real
            time); None for as fast as the pipeline takes it.
        ms_per_char: Speech rate of the caller's speech code. A multiple of
            20 keeps every character within whole 20 ms frames, so a replay
            (which starts at a frame) never starts inside a character: the
            emulators would take the tail of a character for a whole word
            (the last 10 ms of ``date?`` transcribed as ``?``, timed as if
            whole), which no provider does.
        outage_seconds: Typical length of an outage: each lasts a seeded 0.5
            to 1.5 times this.
        idle: A side that has transcribed nothing and tried no connection
            for this long, with no outage under way and none of its
            handshakes left hanging, is done with a turn (a stock service
            that lost it, say).
        user_speech_timeout: The user aggregator's ``user_speech_timeout``
            (Pipecat's default, 0.6 s): silence after a VAD stop before the
            turn may be committed to the context.
        stall_timeout: ``ResilientSTT(stall_timeout=)`` of the resilient side.
        finalize_timeout: ``ResilientSTT(finalize_timeout=)`` of the resilient side.
    """

    provider: str = "deepgram"
    seed: int = 2026
    turns: int = 12
    faults: int = 8
    mix: tuple[str, ...] = ()
    pace: float | None = None
    ms_per_char: float = 20.0
    outage_seconds: float = 1.0
    idle: float = 1.0
    user_speech_timeout: float = 0.6
    stall_timeout: float = 0.5
    finalize_timeout: float = 0.5

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        if self.turns < 1 or not 0 <= self.faults <= self.turns:
            raise ValueError("need turns >= 1 and 0 <= faults <= turns")
        unknown = set(self.mix) - set(ALL_FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {', '.join(sorted(unknown))}")
        for name in (
            "ms_per_char",
            "outage_seconds",
            "idle",
            "user_speech_timeout",
            "stall_timeout",
            "finalize_timeout",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a number more than 0, got {value!r}")
        if self.pace is not None and not (math.isfinite(self.pace) and self.pace > 0):
            raise ValueError(f"pace must be a number more than 0, got {self.pace!r}")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The fault kinds drawn from."""
        return self.mix or ALL_FAULT_KINDS

    def retry(self) -> RetryPolicy:
        """The resilient side's retry policy: quick waits; with outages, one that waits an outage out."""
        if any(kind in OUTAGE_KINDS for kind in self.kinds):
            return RetryPolicy(
                attempts=100,
                wait_initial=0.05,
                wait_max=0.3,
                timeout=max(10.0, 4 * self.outage_seconds),
                attempt_timeout=1.0,
            )
        return RetryPolicy(attempts=6, wait_initial=0.05, wait_max=0.2, timeout=10.0, attempt_timeout=1.0)


@dataclass(frozen=True, slots=True)
class STTTurn:
    """One sentence of the schedule and the fault that strikes while it is said.

    Parameters:
        index: Position in the schedule.
        sentence: What the caller says.
        fault: The fault kind, if any.
        after_messages: Audio messages into the turn (counted by the emulator
            from the start of the turn) at which the fault strikes.
        at: Where that is: ``"in 'word'"``, ``"after 'word'"``,
            ``"before 'word'"`` or ``"in the pause"``.
        outage_seconds: How long an outage lasts (outage kinds only).
    """

    index: int
    sentence: str
    fault: str | None = None
    after_messages: int | None = None
    at: str | None = None
    outage_seconds: float | None = None

    @property
    def words(self) -> list[str]:
        """The sentence's words."""
        return self.sentence.split()


def _caller(config: STTChaosConfig, sentence: str) -> Caller:
    return Caller(
        [sentence], sample_rate=SAMPLE_RATE, ms_per_char=config.ms_per_char, lead=LEAD_S, pause=PAUSE_S
    )


def make_schedule(config: STTChaosConfig) -> list[STTTurn]:
    """The seeded script and its faults: every kind of the mix as evenly as the count allows."""
    rng = random.Random(config.seed)
    faulted = sorted(rng.sample(range(config.turns), config.faults))
    kinds = list(config.kinds) * (config.faults // len(config.kinds) + 1)
    fault_of = dict(zip(faulted, rng.sample(kinds[: config.faults], config.faults), strict=True))
    message_s = MESSAGE_S[config.provider]
    turns = []
    for index in range(config.turns):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 10))]
        sentence = " ".join([words[0].capitalize(), *words[1:]]) + rng.choice([".", ".", "?", "!"])
        fault = fault_of.get(index)
        if fault is None:
            turns.append(STTTurn(index, sentence))
            continue
        said = _caller(config, sentence).said
        speech_end = said[-1].end
        # A stall strikes while the caller speaks; the others anywhere from the
        # first word to well into the silence after the last.
        until = speech_end if fault == "stall" else speech_end + 0.7 * PAUSE_S
        moment = rng.uniform(LEAD_S, until)
        after = math.floor(moment / message_s) + 1  # the message holding that moment
        outage_seconds = None
        if fault in OUTAGE_KINDS:
            # A generator of its own, so outages leave the rest of the schedule as it was.
            share = random.Random(f"{config.seed}:outage:{index}").uniform(0.5, 1.5)
            outage_seconds = round(share * config.outage_seconds, 3)
        turns.append(
            STTTurn(
                index,
                sentence,
                fault,
                after_messages=after,
                at=_where(said, after * message_s),
                outage_seconds=outage_seconds,
            )
        )
    return turns


def _where(said: Sequence[SaidWord], moment: float) -> str:
    """Where in the sentence the audio up to ``moment`` seconds ends (what the provider heard)."""
    for word in said:
        if word.start < moment < word.end:
            return f"in {word.text!r}"
        if moment <= word.start:
            return f"before {word.text!r}"
    if moment <= said[-1].end + 0.2:
        return f"after {said[-1].text!r}"
    return "in the pause"


@dataclass
class TurnResult:
    """What one side did with one turn (times are ``time.monotonic()``)."""

    index: int
    fault: str | None
    armed_at: float
    ended_at: float = 0.0
    finals_from: int = 0  # where its final transcripts start in the run's
    done: bool = False  # every word arrived and the aggregator ended the turn in time
    fault_at: float | None = None
    reconnected_at: float | None = None  # a fresh connection's handshake was served
    recovered_at: float | None = None  # resilient: live again, the audio not yet final replayed
    lost: list[str] = field(default_factory=list)
    twice: list[str] = field(default_factory=list)
    not_said: list[str] = field(default_factory=list)
    context_ok: bool = True  # its sentence is one user message of the context, in its place
    # The last fault carried out by the end of the turn (kind, turn), this one's included.
    since: tuple[str, int] | None = None


@dataclass
class STTSideReport:
    """What one side did over the whole schedule."""

    name: str
    turns: list[TurnResult] = field(default_factory=list)
    said: int = 0
    transcribed: int = 0
    lost: list[str] = field(default_factory=list)
    twice: list[str] = field(default_factory=list)
    not_said: list[str] = field(default_factory=list)
    user_turns: int = 0
    user_turns_equal: int = 0
    context_equal: bool = False
    context_diff: list[str] = field(default_factory=list)
    context: list[str] = field(default_factory=list)  # the user messages, in order
    errors: int = 0
    connections: int = 0
    faults: int = 0
    recoveries: int = 0
    seconds: float = 0.0

    @property
    def honest(self) -> bool:
        """No word lost, none transcribed twice (or never said), and the context is the sentences said."""
        return not (self.lost or self.twice or self.not_said) and self.context_equal

    def reconnect_s(self) -> list[float]:
        """Per fault carried out, seconds to a fresh connection (those that got one)."""
        return [t.reconnected_at - t.fault_at for t in self.turns if t.fault_at and t.reconnected_at]

    def recovery_s(self) -> list[float]:
        """Per fault carried out, seconds to the recovery (resilient side)."""
        return [t.recovered_at - t.fault_at for t in self.turns if t.fault_at and t.recovered_at]

    def never_reconnected(self) -> int:
        """Faults carried out with no fresh connection served after them, to the end of the run."""
        return sum(1 for t in self.turns if t.fault_at is not None and t.reconnected_at is None)

    def by_fault(self) -> dict[str, dict[str, Any]]:
        """Per fault kind: how many were scheduled and carried out, the recovery times, and the words
        lost, transcribed twice or never said and the sentences not their own user turn from the turn
        it struck to the next fault carried out (``"no fault"``: before any)."""
        kinds: dict[str, dict[str, Any]] = {}

        def entry(kind: str) -> dict[str, Any]:
            return kinds.setdefault(
                kind,
                {"scheduled": 0, "carried_out": 0, "lost": 0, "twice": 0, "not_said": 0, "context_wrong": 0},
            )

        for turn in self.turns:
            if turn.fault is not None:
                counts = entry(turn.fault)
                counts["scheduled"] += 1
                counts["carried_out"] += turn.fault_at is not None
            if turn.lost or turn.twice or turn.not_said or not turn.context_ok:
                counts = entry(turn.since[0] if turn.since else "no fault")
                counts["lost"] += len(turn.lost)
                counts["twice"] += len(turn.twice)
                counts["not_said"] += len(turn.not_said)
                counts["context_wrong"] += not turn.context_ok
        for kind, counts in kinds.items():
            mine = [t for t in self.turns if t.fault == kind and t.fault_at is not None]
            counts["reconnect_s"] = _percentiles(
                [t.reconnected_at - t.fault_at for t in mine if t.fault_at and t.reconnected_at]
            )
            counts["recovery_s"] = _percentiles(
                [t.recovered_at - t.fault_at for t in mine if t.fault_at and t.recovered_at]
            )
        return dict(sorted(kinds.items(), key=lambda item: _kind_order(item[0])))

    def summary(self) -> dict[str, Any]:
        """The figures, for the JSON report."""
        return {
            "caller_words_said": self.said,
            "words_transcribed": self.transcribed,
            "words_lost": len(self.lost),
            "words_transcribed_twice": len(self.twice),
            "words_never_said": len(self.not_said),
            "user_turns_in_context": self.user_turns,
            "user_turns_equal_to_said": self.user_turns_equal,
            "context_equal_to_said": self.context_equal,
            "error_frames": self.errors,
            "connections": self.connections,
            "faults_carried_out": self.faults,
            "faults_never_reconnected": self.never_reconnected(),
            "recoveries": self.recoveries,
            "turns_over_in_time": sum(t.done for t in self.turns),
            "reconnect_s": _percentiles(self.reconnect_s()),
            "recovery_s": _percentiles(self.recovery_s()),
            "by_fault": self.by_fault(),
            "lost": self.lost,
            "twice": self.twice,
            "never_said": self.not_said,
            "context_diff": self.context_diff,
            "context": self.context,
            "run_s": round(self.seconds, 3),
        }


@dataclass
class STTChaosReport:
    """Both sides under one schedule."""

    config: STTChaosConfig
    schedule: list[STTTurn]
    stock: STTSideReport
    resilient: STTSideReport
    elapsed: float

    @property
    def passed(self) -> bool:
        """Whether the resilient side lost no word, repeated none, and its context is what was said."""
        return self.resilient.honest

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        config = asdict(self.config)
        config["resilient_retry"] = asdict(self.config.retry())
        return {
            "config": config,
            "elapsed_s": round(self.elapsed, 3),
            "passed": self.passed,
            "stock": self.stock.summary(),
            "resilient": self.resilient.summary(),
            "schedule": [asdict(turn) for turn in self.schedule],
            "turns": {
                side.name: [
                    {
                        "turn": t.index,
                        "fault": t.fault,
                        "done": t.done,
                        "lost": t.lost,
                        "twice": t.twice,
                        "never_said": t.not_said,
                        "context_ok": t.context_ok,
                        "since_fault": list(t.since) if t.since else None,
                        "reconnect_s": _round(t.reconnected_at, t.fault_at),
                        "recovery_s": _round(t.recovered_at, t.fault_at),
                    }
                    for t in side.turns
                ]
                for side in (self.stock, self.resilient)
            },
        }


def _kind_order(kind: str) -> int:
    return ALL_FAULT_KINDS.index(kind) if kind in ALL_FAULT_KINDS else len(ALL_FAULT_KINDS)


def _round(at: float | None, since: float | None) -> float | None:
    return None if at is None or since is None else round(at - since, 4)


# -- running a side -----------------------------------------------------------


def _emulator(config: STTChaosConfig) -> WebsocketEmulator:
    if config.provider == "deepgram":
        # Unkind: finals of four words (a drop cuts a group), interims misheard.
        return DeepgramSTTEmulator(
            api_key=API_KEY, ms_per_char=config.ms_per_char, words_per_final=4, revise_interims=True
        )
    return AssemblyAIEmulator(api_key=API_KEY, ms_per_char=config.ms_per_char)


def _factory(config: STTChaosConfig, emulator: Any) -> Callable[[], Any]:
    if config.provider == "deepgram":
        from pipecat.services.deepgram.stt import DeepgramSTTService

        return lambda: DeepgramSTTService(api_key=API_KEY, base_url=emulator.url)
    from pipecat.services.assemblyai.stt import AssemblyAISTTService

    return lambda: AssemblyAISTTService(api_key=API_KEY, api_endpoint_base_url=emulator.ws_url)


class _Trigger(_OutageTrigger):
    """Starts an outage at the k-th audio message the emulator receives in a turn (see chaos.py)."""

    def arm(self, mode: str, seconds: float, after_audio_chunks: int) -> None:
        fault = Fault(FaultKind.GO_AWAY, after_audio_received=after_audio_chunks)
        self._planned[id(fault)] = (fault, mode, seconds)
        self.emulator.arm(fault)


def _arm(config: STTChaosConfig, emulator: Any, trigger: _Trigger, turn: STTTurn) -> None:
    """Arm the turn's fault on the emulator's current connection (counted from now)."""
    kind, k = turn.fault, turn.after_messages
    if kind is None or k is None:
        return
    if kind in OUTAGE_KINDS:
        assert turn.outage_seconds is not None
        trigger.arm(kind.removeprefix("outage-"), turn.outage_seconds, k)
    elif kind.startswith("close-"):
        code = int(kind.removeprefix("close-"))
        emulator.arm(Fault.close(code, "NET-0000" if code == 1011 else "", after_audio_received=k))
    elif kind == "abort":
        emulator.arm(Fault.abort(after_audio_received=k))
    elif kind == "stall":
        emulator.arm(Fault.stall(after_audio_received=k))
    elif kind == "refuse-503":
        emulator.arm(Fault.close(1011, "NET-0000", after_audio_received=k))
        emulator.arm(Fault.refuse(503))
    elif kind == "refuse-429":
        emulator.arm(Fault.close(1013, after_audio_received=k))
        emulator.arm(Fault.refuse(429, headers={"Retry-After": "0.2"}))
    elif kind == "hang":
        emulator.arm(Fault.abort(after_audio_received=k))
        emulator.arm(Fault.hang())
    elif kind == "error":
        # Deepgram's Error message leaves the socket open; AssemblyAI's (3005,
        # a server error) is followed by a close with that code.
        code = 1011 if config.provider == "deepgram" else 3005
        emulator.arm(Fault.error("internal server error", code, after_audio_received=k))
    elif kind == "replacement-drop":
        emulator.arm(Fault.close(1011, "NET-0000", after_audio_received=k))
        emulator.arm(Fault.close(1012, after_audio_received=3), on="next")


async def _settle(
    run: STTScenario, emulator: Any, done: Callable[[], bool], *, idle: float, limit: float = 30.0
) -> bool:
    """Wait until ``done()`` holds, or the side went quiet for ``idle`` seconds, or ``limit`` passed.

    Quiet: no transcript, no user turn, no connection attempt at the emulator,
    and none of its handshakes left hanging nor an outage under way (a side
    that waits an outage out, or for a handshake that never completes, is
    not done with the turn; a stock service that lost it is).

    Returns:
        Whether ``done()`` held.
    """
    loop = asyncio.get_running_loop()
    started = changed = loop.time()
    seen: tuple[int, ...] = ()
    while loop.time() - started < limit:
        if done():
            return True
        transcripts = run.transcripts
        activity = (
            len(transcripts.finals),
            len(transcripts.interims),
            run.turns_stopped,
            len(emulator.connections),
        )
        busy = emulator.outage_active or any(c.hung and not c.closed for c in emulator.connections)
        if activity != seen or busy:
            seen, changed = activity, loop.time()
        elif loop.time() - changed > idle:
            return done()
        with contextlib.suppress(TimeoutError):
            await run.wait_until(done, min(0.1, idle))
    return done()


async def _side(
    config: STTChaosConfig, schedule: Sequence[STTTurn], *, resilient: bool, tick: Callable[[], None]
) -> STTSideReport:
    report = STTSideReport(f"ResilientSTT({config.provider})" if resilient else f"stock {config.provider}")
    recovered: list[float] = []
    started = time.monotonic()
    emulator = _emulator(config)
    async with emulator:
        trigger = _Trigger(emulator)
        factory = _factory(config, emulator)
        stt: FrameProcessor
        if resilient:
            from pipecat_resilient.stt import ResilientSTT

            stt = ResilientSTT(
                factory,
                retry=config.retry(),
                stall_timeout=config.stall_timeout,
                finalize_timeout=config.finalize_timeout,
                send_timeout=max(1.0, config.stall_timeout),
            )

            async def on_recovered(processor: Any, recovery: Any) -> None:
                recovered.append(time.monotonic())

            stt.add_event_handler("on_connection_recovered", on_recovered)
        else:
            stt = factory()
        run = STTScenario(stt, sample_rate=SAMPLE_RATE, user_speech_timeout=config.user_speech_timeout)
        await run.start()
        try:
            for turn in schedule:
                report.turns.append(await _run_turn(config, run, emulator, trigger, turn))
                tick()
            # Whatever is still on its way (a recovery under way at the last turn).
            await _settle(run, emulator, lambda: False, idle=config.idle, limit=10.0)
            _collect(report, run, emulator, schedule, recovered)
        finally:
            # A stock service stuck on a half-open socket would spend its close
            # timeouts saying goodbye to it.
            if not resilient:
                await emulator.stop()
            with contextlib.suppress(Exception):
                await run.end(timeout=30.0)
            await run.cancel()
    report.seconds = time.monotonic() - started
    return report


async def _run_turn(
    config: STTChaosConfig, run: STTScenario, emulator: Any, trigger: _Trigger, turn: STTTurn
) -> TurnResult:
    """Say one sentence with its fault armed; over once it is transcribed and the turn ended, or idle."""
    # A turn's fault belongs to that turn: one that did not fire (a side stuck
    # on a dead socket) must not pile up for the next connection.
    emulator.disarm()
    trigger.disarm()
    result = TurnResult(
        turn.index,
        turn.fault,
        armed_at=time.monotonic(),
        finals_from=len(run.transcripts.finals),
    )
    _arm(config, emulator, trigger, turn)
    stopped = run.turns_stopped
    words = len(turn.words)
    finals = run.transcripts.finals

    def done() -> bool:
        arrived = sum(len(t.text.split()) for t in finals[result.finals_from :])
        return arrived >= words and run.turns_stopped > stopped

    await run.speak(_caller(config, turn.sentence), pace=config.pace)
    # Then the line carries silence, as a transport's does, until the turn is over.
    silence = asyncio.create_task(_silence(run, config.pace or 1.0))
    try:
        result.done = await _settle(run, emulator, done, idle=config.idle)
    finally:
        silence.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await silence
    result.ended_at = time.monotonic()
    return result


async def _silence(run: STTScenario, pace: float) -> None:
    """Send 20 ms frames of silence, paced at ``pace`` times real time, until cancelled."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    frames = 0
    while True:
        await run.send(InputAudioRawFrame(audio=_SILENCE, sample_rate=SAMPLE_RATE, num_channels=1))
        frames += 1
        await asyncio.sleep(max(0.0, began + frames * _FRAME_S / pace - loop.time()))


# -- accounting ---------------------------------------------------------------


def _bare(word: str) -> str:
    return word.strip(".,!?;:").lower()


def _collect(
    report: STTSideReport,
    run: STTScenario,
    emulator: Any,
    schedule: Sequence[STTTurn],
    recovered: list[float],
) -> None:
    """Turn the run's records into the side's figures, word by word and turn by turn."""
    turns = report.turns
    said = [(turn.index, word) for turn in schedule for word in turn.words]
    # Each final transcript's words belong to the turn during which it arrived.
    finals: list[tuple[int, str]] = []
    ends = [t.finals_from for t in turns[1:]] + [len(run.transcripts.finals)]
    for result, end in zip(turns, ends, strict=True):
        for transcript in run.transcripts.finals[result.finals_from : end]:
            finals.extend((result.index, word) for word in transcript.text.split())
    matcher = difflib.SequenceMatcher(a=[w for _, w in said], b=[w for _, w in finals], autojunk=False)
    by_index = {t.index: t for t in turns}
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag in ("delete", "replace"):
            for index, word in said[a0:a1]:
                by_index[index].lost.append(word)
        if tag in ("insert", "replace"):
            for index, word in finals[b0:b1]:
                # Twice: a word the caller said in that turn or the one before;
                # otherwise never said (the tail of a cut word, say).
                near = {_bare(w) for i, w in said if i in (index, index - 1)}
                (by_index[index].twice if _bare(word) in near else by_index[index].not_said).append(word)
    report.said = len(said)
    report.transcribed = len(finals)
    for result in turns:
        report.lost.extend(result.lost)
        report.twice.extend(result.twice)
        report.not_said.extend(result.not_said)
    # The user turns committed to the context, against the sentences said.
    messages = run.user_messages
    sentences = [turn.sentence for turn in schedule]
    report.context = list(messages)
    report.user_turns = len(messages)
    lines = difflib.SequenceMatcher(a=sentences, b=messages, autojunk=False)
    report.user_turns_equal = sum(block.size for block in lines.get_matching_blocks())
    for tag, a0, a1, _, _ in lines.get_opcodes():
        if tag != "equal":
            for index in range(a0, a1):
                by_index[schedule[index].index].context_ok = False
    report.context_equal = messages == sentences
    report.context_diff = [
        line
        for line in difflib.unified_diff(sentences, messages, "said", "context", n=0, lineterm="")
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    report.errors = len(run.errors)
    report.connections = len(emulator.connections)
    report.recoveries = len(recovered)
    # Faults: when each was carried out, then the next served connection and recovery after it.
    fault_times = _fault_times(emulator)
    report.faults = len(fault_times)
    served = sorted(
        c.opened_at for c in emulator.connections if c.index in {s.index for s in emulator.streams}
    )
    starts = [t.armed_at for t in turns[1:]] + [math.inf]
    for result, next_start in zip(turns, starts, strict=True):
        fired = [at for at in fault_times if result.armed_at <= at < next_start]
        if not fired:
            continue
        result.fault_at = fired[0]
        result.reconnected_at = next((at for at in served if at > fired[0]), None)
        result.recovered_at = next((at for at in recovered if at > fired[0]), None)
    since = None
    for result in turns:
        if result.fault is not None and result.fault_at is not None:
            since = (result.fault, result.index)
        result.since = since


def _fault_times(emulator: WebsocketEmulator) -> list[float]:
    """When each fault was carried out (a connection's fault or error message, an outage's start)."""
    times = [c.fault_at for c in emulator.connections if c.fault_at is not None]
    times.extend(outage.started_at for outage in emulator.outages)
    return sorted(times)


# -- running both -------------------------------------------------------------


async def run_stt_chaos(
    config: STTChaosConfig, *, progress: Callable[[int], None] | None = None
) -> STTChaosReport:
    """Run the schedule through the stock service and through ResilientSTT at once.

    Args:
        config: What to run.
        progress: Called with 1 whenever either side finishes a turn.
    """
    schedule = make_schedule(config)
    tick = (lambda: progress(1)) if progress else (lambda: None)
    started = time.monotonic()
    stock, resilient = await asyncio.gather(
        _side(config, schedule, resilient=False, tick=tick),
        _side(config, schedule, resilient=True, tick=tick),
    )
    return STTChaosReport(config, schedule, stock, resilient, time.monotonic() - started)


# -- the report ---------------------------------------------------------------


def format_table(report: STTChaosReport) -> str:
    """The readable summary: both sides, then per fault kind."""
    config = report.config
    s, r = report.stock.summary(), report.resilient.summary()
    pacing = "fast" if config.pace is None else f"{config.pace:g}x real time"
    lines = [
        f"speech-to-text chaos: {config.provider}, seed {config.seed}, {len(report.schedule)} turns, "
        f"{sum(1 for t in report.schedule if t.fault)} faults, {pacing}, {report.elapsed:.1f}s",
        f"{'':40}{'stock':>14}{'resilient':>14}",
    ]

    def row(label: str, a: object, b: object) -> None:
        lines.append(f"{label:40}{a!s:>14}{b!s:>14}")

    turns = len(report.schedule)
    row("caller words said", s["caller_words_said"], r["caller_words_said"])
    row("words transcribed", s["words_transcribed"], r["words_transcribed"])
    row("words lost", s["words_lost"], r["words_lost"])
    row("words transcribed twice", s["words_transcribed_twice"], r["words_transcribed_twice"])
    row("words never said (cut words)", s["words_never_said"], r["words_never_said"])
    row("user turns in context", s["user_turns_in_context"], r["user_turns_in_context"])
    row(
        "user turns equal to what was said",
        f"{s['user_turns_equal_to_said']}/{turns}",
        f"{r['user_turns_equal_to_said']}/{turns}",
    )
    row("error frames", s["error_frames"], r["error_frames"])
    row("connections", s["connections"], r["connections"])
    row("recoveries (on_connection_recovered)", "-", r["recoveries"])
    row("faults carried out", s["faults_carried_out"], r["faults_carried_out"])
    row("faults never followed by a connection", s["faults_never_reconnected"], r["faults_never_reconnected"])
    for label, key in (
        ("fault to fresh connection", "reconnect_s"),
        ("fault to recovered (replayed)", "recovery_s"),
    ):
        for stat in ("p50", "p95", "max"):
            row(f"{label} {stat}", _fmt(s[key], stat), _fmt(r[key], stat))
    row("run time", f"{s['run_s']:.1f}s", f"{r['run_s']:.1f}s")
    kinds = sorted(set(s["by_fault"]) | set(r["by_fault"]), key=_kind_order)
    if kinds:
        lines.append("")
        lines.append(
            "by fault kind: words lost, transcribed twice or never said, and sentences not their own user"
        )
        lines.append(
            "turn from the turn it struck to the next fault; resilient recovery, fault to replayed audio:"
        )
        lines.append(
            f"  {'':18}{'n':>4}{'stock lost':>11}{'twice':>6}{'turn':>5}{'resil. lost':>12}{'twice':>6}"
            f"{'turn':>5}{'p50':>8}{'p95':>8}{'max':>8}"
        )
        empty: dict[str, Any] = {
            "scheduled": 0,
            "lost": 0,
            "twice": 0,
            "not_said": 0,
            "context_wrong": 0,
            "recovery_s": _percentiles([]),
        }
        for kind in kinds:
            a, b = s["by_fault"].get(kind, empty), r["by_fault"].get(kind, empty)
            recovery = b["recovery_s"]
            lines.append(
                f"  {kind:18}{max(a['scheduled'], b['scheduled']):>4}{a['lost']:>11}"
                f"{a['twice'] + a['not_said']:>6}{a['context_wrong']:>5}{b['lost']:>12}"
                f"{b['twice'] + b['not_said']:>6}{b['context_wrong']:>5}"
                f"{_fmt(recovery, 'p50'):>8}{_fmt(recovery, 'p95'):>8}{_fmt(recovery, 'max'):>8}"
            )
    if not report.passed:
        lines.append("")
        lines.append(
            "where the resilient side slipped (turn: its fault; the last fault carried out by then):"
        )
        slipped = [t for t in report.resilient.turns if t.lost or t.twice or t.not_said or not t.context_ok]
        for result in slipped[:_SLIPS_SHOWN]:
            turn = report.schedule[result.index]
            since = f"{result.since[0]} (turn {result.since[1]})" if result.since else "-"
            what = [
                f"{label} {words}"
                for label, words in (
                    ("lost", result.lost),
                    ("twice", result.twice),
                    ("never said", result.not_said),
                )
                if words
            ]
            if not result.context_ok:
                what.append("not its own user turn")
            fault = f"{turn.fault} {turn.at}" if turn.fault else "no fault"
            lines.append(f"  turn {result.index}: {fault}; since {since}: {', '.join(what)}")
        if len(slipped) > _SLIPS_SHOWN:
            lines.append(f"  ... and {len(slipped) - _SLIPS_SHOWN} more turns (report.json)")
    lines.append("")
    lines.append(
        "PASS: the resilient side lost no word, transcribed none twice, and its context is what was said."
        if report.passed
        else "FAIL: the resilient side lost, repeated or misreported the caller's words."
    )
    return "\n".join(lines)


def write_report(report: STTChaosReport, out: Path) -> Path:
    """Write report.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(report.to_json(), indent=2))
    return path


# -- the command line ---------------------------------------------------------


def parse_config(argv: list[str] | None = None) -> tuple[STTChaosConfig, argparse.Namespace]:
    """The STT bench's command line, checked.

    Raises:
        SystemExit: With status 2 and argparse's message on a usage error.
    """
    parser = argparse.ArgumentParser(
        prog="pipecat-resilient chaos --side stt",
        description="A caller says a seeded script of sentences through a stock speech-to-text service "
        "and through the same service inside ResilientSTT, both at once, each on its own embedded "
        "emulator, under one seeded schedule of connection faults (closes, aborts, half-open stalls, "
        "refused or unanswered reconnects, the provider's error message, a drop of the replacement, "
        "outages). Prints the caller's words lost and transcribed twice, the user turns that reached "
        "the context against what was said, and recovery times per fault kind; writes a JSON report.",
        epilog="Exit status: 0 when the resilient side lost no word, transcribed none twice and its "
        "context is what was said, 1 when not, 2 on a usage error.",
    )
    parser.add_argument(
        "--provider", choices=PROVIDERS, default="deepgram", help="which STT provider (default deepgram)"
    )
    parser.add_argument("--seed", type=int, default=2026, help="schedule seed (default 2026)")
    parser.add_argument("--turns", type=_count(minimum=1), default=12, help="sentences (default 12)")
    parser.add_argument(
        "--faults",
        type=_count(minimum=0),
        default=None,
        help="number of faults, at most one per turn (default: two thirds of the turns)",
    )
    parser.add_argument(
        "--mix",
        type=_kinds_type(ALL_FAULT_KINDS),
        default=None,
        help=f"comma list of fault kinds (default: all of {','.join(ALL_FAULT_KINDS)})",
    )
    parser.add_argument(
        "--pace",
        type=_positive_number,
        default=None,
        help="speed of the caller's audio against real time (1 = real time; default: as fast as the "
        "pipeline takes it, each sentence once the turn before it is over)",
    )
    parser.add_argument(
        "--ms-per-char",
        type=_positive_number,
        default=20.0,
        help="speech rate (default 20 ms a character; keep it a multiple of 20, so that no replay starts "
        "inside a character, whose tail the emulators would transcribe as a word)",
    )
    parser.add_argument(
        "--outage-seconds",
        type=_positive_number,
        default=1.0,
        help="typical length of an outage: each lasts a seeded 0.5 to 1.5 times this (default 1)",
    )
    parser.add_argument(
        "--user-speech-timeout",
        type=_positive_number,
        default=0.6,
        help="the user aggregator's silence after a VAD stop before a turn may be committed (default 0.6, "
        "Pipecat's)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("chaos-report"), help="output folder (default ./chaos-report)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="show the services' log")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: not a folder: {args.out}")
    try:
        config = STTChaosConfig(
            provider=args.provider,
            seed=args.seed,
            turns=args.turns,
            faults=args.faults if args.faults is not None else (2 * args.turns) // 3,
            mix=args.mix or (),
            pace=args.pace,
            ms_per_char=args.ms_per_char,
            outage_seconds=args.outage_seconds,
            user_speech_timeout=args.user_speech_timeout,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return config, args


async def _with_progress(config: STTChaosConfig, *, enabled: bool) -> STTChaosReport:
    return await _progress_run(
        lambda progress: run_stt_chaos(config, progress=progress),
        total=2 * config.turns,
        desc="chaos stt",
        enabled=enabled,
    )


def main(argv: list[str] | None = None) -> int:
    """``pipecat-resilient chaos --side stt``: run, print, write report.json.

    Returns:
        0 when the resilient side lost no word, transcribed none twice and its
        context is what was said; 1 when not. A usage error exits 2
        (``SystemExit``, from argparse) before anything runs.
    """
    config, args = parse_config(argv)
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "CRITICAL")
    report = asyncio.run(_with_progress(config, enabled=not args.no_progress))
    print(format_table(report))
    print(f"wrote {write_report(report, args.out)}")
    return 0 if report.passed else 1
