"""The chaos bench: a seeded schedule of provider faults, stock Pipecat and ResilientTTS side by side.

``pipecat-resilient chaos`` runs a realistic workload - streamed LLM turns of
several sentences, standalone ``TTSSpeakFrame`` utterances, interruptions,
pauses - through a stock TTS service (``--provider``: ElevenLabs, Cartesia or
Deepgram) and through the same service inside
:class:`~pipecat_resilient.tts.ResilientTTS`, each against its own embedded
emulator, under one seeded schedule of faults (close codes, aborts, half-open
stalls, refused handshakes, the provider's error message, slow first audio, a
drop on the replacement too). Both sides run at once. The emulators are unkind:
Cartesia's word timings come grouped, before or after their audio, in a seeded
mix; Deepgram's audio chunks cut through words and carry no timings at all.

Everything is measured from what a listener at the end of each pipeline heard,
decoded from the audio: words lost, heard twice, context words never heard,
heard words missing from the context, dead air per fault, recovery time, error
frames, and time to first audio without faults. The result is a table, a JSON
report and (with matplotlib) a timeline picture. The exit status is non-zero
when the resilient side lost, repeated or misreported a word - for a provider
without word timings, when it repeated (or left out of the context) more than
the two words per fault its estimate of a cut sentence may cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSSpeakFrame,
)
from pipecat.processors.frame_processor import FrameProcessor

from pipecat_resilient.policy import RetryPolicy
from pipecat_resilient.testing._server import WebsocketEmulator
from pipecat_resilient.testing.faults import Fault
from pipecat_resilient.testing.harness import Scenario
from pipecat_resilient.testing.kits import TTS_KITS, TTSKit, tts_kit
from pipecat_resilient.testing.report import account

__all__ = [
    "FAULT_KINDS",
    "ChaosConfig",
    "ChaosReport",
    "SideReport",
    "TurnPlan",
    "main",
    "make_schedule",
    "run_chaos",
]

SAMPLE_RATE = 24000

FAULT_KINDS: tuple[str, ...] = (
    "close-1000",
    "close-1007",
    "close-1011",
    "close-1012",
    "abort",
    "stall",
    "refuse-503",
    "refuse-429",
    "error",
    "slow-first-audio",
    "replacement-drop",
)
"""Every fault the bench can schedule (``--mix`` takes a comma list of these)."""

_WORDS = (
    "account address afternoon agent answer appointment arrive balance bank bill book booking call "
    "card change check city clinic code confirm customer date day delivery detail doctor email "
    "evening fee flight friday hotel hour invoice item later leave list message minute monday "
    "morning name number office order package payment phone plan price record refund room "
    "schedule seat service ship station store street ticket time today tomorrow total train "
    "transfer travel tuesday update voucher wait week window"
).split()


@dataclass(frozen=True)
class TurnPlan:
    """One turn of the workload.

    Parameters:
        index: Position in the schedule.
        kind: ``"llm"`` (a streamed LLM response) or ``"speak"`` (a ``TTSSpeakFrame``).
        sentences: What the bot says.
        interrupt_after: Interrupt once this many of its words were heard (None: not interrupted).
        pause: Seconds of quiet after the turn.
        fault: The fault kind injected during the turn, if any.
        fault_after_chunks: Audio chunks into the turn at which it strikes.
    """

    index: int
    kind: str
    sentences: tuple[str, ...]
    interrupt_after: int | None = None
    pause: float = 0.0
    fault: str | None = None
    fault_after_chunks: int = 3

    @property
    def words(self) -> list[str]:
        """The turn's words."""
        return " ".join(self.sentences).split()

    def frames(self) -> list[Frame]:
        """The frames that carry the turn into the pipeline."""
        if self.kind == "speak":
            return [TTSSpeakFrame(" ".join(self.sentences))]
        tokens: list[str] = []
        for sentence in self.sentences:
            words = sentence.split()
            tokens.extend(word + " " for word in words)
        return [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in tokens], LLMFullResponseEndFrame()]


@dataclass(frozen=True)
class ChaosConfig:
    """What to run.

    Parameters:
        seed: Seed of the schedule (same seed, same schedule).
        turns: Number of turns.
        faults: Number of faults (at most one per turn).
        mix: Fault kinds to draw from.
        realtime: Pace the emulators' audio at its duration (dead air is
            meaningful); otherwise as fast as possible.
        ms_per_char: Speech rate of the emulated voice.
        first_audio_delay: The emulators' own time to first audio.
        interruptions: Share of turns interrupted by the user.
        out: Folder for report.json and timeline.png (None: no files).
        first_audio_timeout: ResilientTTS watchdog (seconds).
        stall_timeout: ResilientTTS watchdog (seconds).
        provider: Which TTS provider's stock service and emulator.
    """

    seed: int = 1
    turns: int = 12
    faults: int = 8
    mix: tuple[str, ...] = FAULT_KINDS
    realtime: bool = False
    ms_per_char: float = 4.0
    first_audio_delay: float = 0.05
    interruptions: float = 0.1
    out: Path | None = None
    first_audio_timeout: float = 1.0
    stall_timeout: float = 1.0
    provider: str = "elevenlabs"

    def __post_init__(self) -> None:
        tts_kit(self.provider)  # raises ValueError for an unknown one
        unknown = set(self.mix) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {', '.join(sorted(unknown))}")
        if self.turns < 1 or self.faults < 0 or self.faults > self.turns:
            raise ValueError("need turns >= 1 and 0 <= faults <= turns")
        if not self.mix and self.faults:
            raise ValueError("faults need a non-empty mix")


def make_schedule(config: ChaosConfig) -> list[TurnPlan]:
    """The seeded workload: turns, their faults and interruptions."""
    rng = random.Random(config.seed)
    faulted = sorted(rng.sample(range(config.turns), config.faults))
    # Every kind in the mix comes up as evenly as the count allows, in a seeded order.
    kinds = list(config.mix) * (config.faults // max(1, len(config.mix)) + 1)
    kinds = rng.sample(kinds[: config.faults], config.faults) if config.faults else []
    fault_of = dict(zip(faulted, kinds, strict=True))
    plans = []
    for index in range(config.turns):
        kind = "llm" if rng.random() < 0.7 else "speak"
        count = rng.randint(2, 4) if kind == "llm" else rng.randint(1, 2)
        sentences = tuple(_sentence(rng) for _ in range(count))
        fault = fault_of.get(index)
        total = len(" ".join(sentences).split())
        # Interrupted turns carry no fault, so each fault's effect is measured alone.
        interrupt = None
        if fault is None and rng.random() < config.interruptions:
            interrupt = rng.randint(2, max(2, total // 2))
        plans.append(
            TurnPlan(
                index=index,
                kind=kind,
                sentences=sentences,
                interrupt_after=interrupt,
                pause=round(rng.uniform(0.0, 0.3), 3) if config.realtime else 0.0,
                fault=fault,
                fault_after_chunks=rng.randint(1, 8),
            )
        )
    return plans


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 10))]
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice([".", ".", ".", "?", "!"])


def _arm(emulator: WebsocketEmulator, plan: TurnPlan) -> None:
    """Arm the turn's fault on the emulator's current connection."""
    k = plan.fault_after_chunks
    kind = plan.fault
    if kind is None:
        return
    if kind.startswith("close-"):
        code = int(kind.split("-")[1])
        emulator.arm(Fault.close(code, "invalid payload" if code == 1007 else "", after_audio_chunks=k))
    elif kind == "abort":
        emulator.arm(Fault.abort(after_audio_chunks=k))
    elif kind == "stall":
        emulator.arm(Fault.stall(after_audio_chunks=k))
    elif kind == "refuse-503":
        emulator.arm(Fault.close(1012, after_audio_chunks=k))
        emulator.arm(Fault.refuse(503))
    elif kind == "refuse-429":
        emulator.arm(Fault.close(1013, after_audio_chunks=k))
        emulator.arm(Fault.refuse(429, headers={"Retry-After": "0.2"}))
    elif kind == "error":
        emulator.arm(Fault.error("internal server error", 500, after_audio_chunks=k))
    elif kind == "slow-first-audio":
        emulator.arm(Fault.delay_first_audio(0.5))
    elif kind == "replacement-drop":
        emulator.arm(Fault.close(1011, after_audio_chunks=k))
        emulator.arm(Fault.close(1012, after_audio_chunks=2), on="next")


@dataclass
class TurnResult:
    """What one side did with one turn."""

    index: int
    fault: str | None
    interrupted: bool
    expected: list[str]
    heard: list[str]
    started_at: float
    first_audio_at: float | None
    ended_at: float
    fault_at: float | None = None
    recovered_at: float | None = None
    dead_air: float | None = None
    cut_off: bool = False


@dataclass
class SideReport:
    """One side's figures."""

    name: str
    words_expected: int = 0
    words_heard: int = 0
    lost: list[str] = field(default_factory=list)
    repeated: list[str] = field(default_factory=list)
    unheard_in_context: list[str] = field(default_factory=list)
    heard_not_in_context: list[str] = field(default_factory=list)
    interruption_boundary: int = 0
    errors: int = 0
    connections: int = 0
    faults: int = 0
    turns_cut_off: int = 0
    unusable_from: int | None = None  # the turn after which the service said it can no longer work
    dead_air: list[float] = field(default_factory=list)
    recovery: list[float] = field(default_factory=list)
    first_audio: list[float] = field(default_factory=list)
    turns: list[TurnResult] = field(default_factory=list)
    audio: list[tuple[float, float]] = field(default_factory=list)  # playout intervals
    fault_times: list[float] = field(default_factory=list)

    # Words per fault that may be said again (and so missing from the context
    # once): 0 with word timings; without them, the estimate of a cut
    # sentence's heard part may fall a word or two short.
    repeat_allowance: int = 0

    @property
    def honest(self) -> bool:
        """No word lost or put in the context unheard; none repeated or left out beyond the allowance."""
        allowed = self.repeat_allowance * self.faults
        return not (
            self.lost
            or self.unheard_in_context
            or len(self.repeated) > allowed
            or len(self.heard_not_in_context) > allowed
        )

    def summary(self) -> dict[str, Any]:
        """The figures, for the JSON report."""
        return {
            "words_expected": self.words_expected,
            "words_heard": self.words_heard,
            "words_lost": len(self.lost),
            "words_heard_twice": len(self.repeated),
            "context_words_never_heard": len(self.unheard_in_context),
            "heard_words_not_in_context": len(self.heard_not_in_context),
            "interruption_boundary_words": self.interruption_boundary,
            "error_frames": self.errors,
            "connections": self.connections,
            "faults": self.faults,
            "turns_cut_off": self.turns_cut_off,
            "unusable_from_turn": self.unusable_from,
            "dead_air_s": _percentiles(self.dead_air),
            "recovery_s": _percentiles(self.recovery),
            "first_audio_no_fault_s": _percentiles(self.first_audio),
            "recovery_by_fault_s": self.recovery_by_fault(),
        }

    def recovery_by_fault(self) -> dict[str, dict[str, float | int | None]]:
        """Recovery time (fault to replayed audio) per fault kind."""
        by_kind: dict[str, list[float]] = {}
        for turn in self.turns:
            if turn.fault and turn.fault_at is not None and turn.recovered_at is not None:
                by_kind.setdefault(turn.fault, []).append(turn.recovered_at - turn.fault_at)
        return {kind: _percentiles(values) for kind, values in sorted(by_kind.items())}


@dataclass
class ChaosReport:
    """Both sides, with the schedule they ran."""

    config: ChaosConfig
    schedule: list[TurnPlan]
    stock: SideReport
    resilient: SideReport
    elapsed: float

    @property
    def passed(self) -> bool:
        """Whether the resilient side lost, repeated or misreported nothing."""
        return self.resilient.honest

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        config = asdict(self.config)
        config["out"] = str(self.config.out) if self.config.out else None
        return {
            "config": config,
            "elapsed_s": round(self.elapsed, 3),
            "passed": self.passed,
            "stock": self.stock.summary(),
            "resilient": self.resilient.summary(),
            "schedule": [
                {
                    "turn": t.index,
                    "kind": t.kind,
                    "words": len(t.words),
                    "fault": t.fault,
                    "fault_after_chunks": t.fault_after_chunks if t.fault else None,
                    "interrupt_after": t.interrupt_after,
                }
                for t in self.schedule
            ],
            "turns": {
                side.name: [
                    {
                        "turn": r.index,
                        "fault": r.fault,
                        "heard": len(r.heard),
                        "expected": len(r.expected),
                        "dead_air_s": _round(r.dead_air),
                        "recovery_s": _round(
                            None
                            if r.recovered_at is None or r.fault_at is None
                            else r.recovered_at - r.fault_at
                        ),
                        "cut_off": r.cut_off,
                    }
                    for r in side.turns
                ]
                for side in (self.stock, self.resilient)
            },
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 4),
        "p95": round(p95, 4),
        "max": round(ordered[-1], 4),
    }


async def _run_side(
    config: ChaosConfig,
    schedule: list[TurnPlan],
    *,
    resilient: bool,
    progress: Callable[[], None],
) -> SideReport:
    from pipecat_resilient.tts import ResilientTTS

    kit = tts_kit(config.provider)
    name = "resilient" if resilient else "stock"
    report = SideReport(name, repeat_allowance=0 if kit.timings else 2)
    async with kit.emulator(**_emulator_options(config, kit)) as emulator:
        make = kit.factory(emulator, api_key="chaos-key", voice="chaos")
        tts: FrameProcessor
        if resilient:
            tts = ResilientTTS(
                make,
                retry=RetryPolicy(attempts=6, timeout=20.0),
                first_audio_timeout=config.first_audio_timeout,
                stall_timeout=config.stall_timeout,
                # The emulated voice's rate, as a bot is told its voice's:
                # what a first cut sentence's audio covered can be estimated
                # before the session has timed a word of its own.
                speaking_rate=1000 / config.ms_per_char,
            )
        else:
            tts = make()
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE), sample_rate=SAMPLE_RATE)
        await run.start()
        for plan in schedule:
            report.turns.append(await _run_turn(run, emulator, plan))
            if report.unusable_from is None and not tts.is_usable:
                report.unusable_from = plan.index
            progress()
            if plan.pause:
                await asyncio.sleep(plan.pause)
        await _quiet(run, idle=0.3)
        if not resilient:
            # A stock service stuck on a half-open socket would spend its close
            # timeouts saying goodbye to it.
            await emulator.stop()
        await run.end(timeout=60.0)
        _collect(report, run, emulator)
    return report


def _emulator_options(config: ChaosConfig, kit: TTSKit) -> dict[str, Any]:
    """The emulator as unkind as its real provider: timings and audio grouped and ordered as it may."""
    options: dict[str, Any] = {
        "ms_per_char": config.ms_per_char,
        "realtime": config.realtime,
        "first_audio_delay": config.first_audio_delay,
    }
    if kit.name == "cartesia":
        options.update(timestamps="shuffled", words_per_timestamps=3, seed=config.seed)
    elif kit.name == "deepgram":
        options.update(auto_generate_chars=30)
    return options


async def _run_turn(run: Scenario, emulator: WebsocketEmulator, plan: TurnPlan) -> TurnResult:
    listener = run.listener
    heard_before = len(listener.heard)
    stopped_before = listener.stopped
    audio_before = len(listener.audio_times)
    faults_before = sum(1 for c in emulator.connections if c.fault_at is not None)
    # A turn's fault belongs to that turn: one that did not fire (a side stuck
    # on a dead socket) must not pile up for the next connection.
    emulator.disarm()
    _arm(emulator, plan)
    started = time.monotonic()
    await run.send(*plan.frames())
    interrupted = False
    if plan.interrupt_after is not None:
        try:
            await run.wait_until(
                lambda: len(listener.heard) - heard_before >= (plan.interrupt_after or 0), 5.0
            )
        except TimeoutError:
            pass
        await run.send(InterruptionFrame())
        interrupted = True
        await _quiet(run, idle=0.15)
    else:
        words = len(plan.words)
        try:
            await _wait_done(run, heard_before + words, stopped_before + 1)
        except TimeoutError:
            pass
    ended = time.monotonic()
    heard = listener.heard[heard_before:]
    first_audio = listener.audio_times[audio_before][0] if len(listener.audio_times) > audio_before else None
    result = TurnResult(
        index=plan.index,
        fault=plan.fault,
        interrupted=interrupted,
        expected=heard if interrupted else plan.words,
        heard=heard,
        started_at=started,
        first_audio_at=first_audio,
        ended_at=ended,
    )
    fired = [c for c in emulator.connections if c.fault_at is not None][faults_before:]
    if fired:
        result.fault_at = fired[0].fault_at
        later = [
            c.first_audio_at
            for c in emulator.connections
            if c.first_audio_at and c.first_audio_at > (result.fault_at or 0)
        ]
        result.recovered_at = min(later) if later and min(later) <= ended else None
    result.cut_off = not interrupted and len(heard) < len(plan.words)
    return result


async def _wait_done(run: Scenario, heard: int, stopped: int) -> None:
    """Wait until the turn was heard and stopped, or nothing happened for a while."""
    listener = run.listener
    if not await listener.settle(
        lambda: len(listener.heard) >= heard and listener.stopped >= stopped, idle=1.5, limit=30.0
    ):
        raise TimeoutError


async def _quiet(run: Scenario, *, idle: float) -> None:
    """Wait until no frame reached the listener for ``idle`` seconds."""
    await run.listener.settle(lambda: False, idle=idle, limit=60.0)


def _collect(report: SideReport, run: Scenario, emulator: WebsocketEmulator) -> None:
    """Turn the run's records into the side's figures."""
    listener = run.listener
    expected: list[str] = []
    heard: list[str] = []
    for turn in report.turns:
        expected.extend(turn.expected)
        heard.extend(turn.heard)
    # Words heard after the last turn finished still count.
    heard.extend(listener.heard[len(heard) :])
    context = run.context_words
    words = account(expected, heard, context)
    report.words_expected = len(expected)
    report.words_heard = len(heard)
    report.lost = list(words.lost)
    report.repeated = list(words.repeated)
    report.unheard_in_context = list(words.unheard_in_context)
    # The last word heard before an interruption may be missing from the
    # context: the listener stands where a transport would, and a transport
    # drops the audio it had not played yet, so in a real call that word was
    # not heard either. Counted apart, not as a misreport.
    report.heard_not_in_context, report.interruption_boundary = excuse_interruption_boundaries(
        list(words.heard_not_in_context), report.turns
    )
    report.errors = len(run.errors)
    report.connections = len(emulator.connections)
    report.faults = sum(1 for c in emulator.connections if c.fault_at is not None)
    report.turns_cut_off = sum(1 for t in report.turns if t.cut_off and t.fault)
    # Playout timeline: each frame plays at arrival or when the last one ends.
    playing_until: float | None = None
    for arrived, size in listener.audio_times:
        start = arrived if playing_until is None else max(arrived, playing_until)
        playing_until = start + size / (2 * SAMPLE_RATE)
        if report.audio and abs(report.audio[-1][1] - start) < 1e-3:
            report.audio[-1] = (report.audio[-1][0], playing_until)
        else:
            report.audio.append((start, playing_until))
    report.fault_times = [c.fault_at for c in emulator.connections if c.fault_at is not None]
    for turn in report.turns:
        if turn.fault is None and not turn.interrupted and turn.first_audio_at is not None:
            report.first_audio.append(turn.first_audio_at - turn.started_at)
        if turn.fault_at is None:
            continue
        if turn.recovered_at is not None:
            report.recovery.append(turn.recovered_at - turn.fault_at)
        if not turn.cut_off:
            turn.dead_air = _dead_air(report.audio, turn.fault_at, turn.ended_at)
            report.dead_air.append(turn.dead_air)


def excuse_interruption_boundaries(missing: list[str], turns: Sequence[TurnResult]) -> tuple[list[str], int]:
    """Split heard words missing from the context into real misreports and interruption boundaries.

    Each interrupted turn may excuse its own last heard word once (see the
    comment in ``_collect``). Returns the words still missing and how many
    were excused.
    """
    boundary = [turn.heard[-1] for turn in turns if turn.interrupted and turn.heard]
    left = []
    excused = 0
    for word in missing:
        if word in boundary:
            boundary.remove(word)
            excused += 1
        else:
            left.append(word)
    return left, excused


def _dead_air(audio: list[tuple[float, float]], since: float, until: float) -> float:
    """The longest silence in the playout timeline between ``since`` and the end of the turn's audio."""
    longest = 0.0
    previous_end: float | None = None
    for start, end in audio:
        if end < since:
            previous_end = end
            continue
        if start > until + 5.0:
            break
        if previous_end is not None and start > previous_end:
            longest = max(longest, start - max(previous_end, since))
        previous_end = end if previous_end is None else max(previous_end, end)
    return max(0.0, longest)


async def run_chaos(
    config: ChaosConfig, *, progress: Callable[[int], None] | None = None, stock: bool = True
) -> ChaosReport:
    """Run the schedule on both sides at once.

    Args:
        config: What to run.
        progress: Called with 1 whenever either side finishes a turn.
        stock: Run the stock side too (False: only the resilient side, for a CI gate).

    Returns:
        The report (an empty stock side when ``stock`` is False).
    """
    schedule = make_schedule(config)
    tick = (lambda: progress(1)) if progress else (lambda: None)
    started = time.monotonic()
    if stock:
        stock_side, resilient_side = await asyncio.gather(
            _run_side(config, schedule, resilient=False, progress=tick),
            _run_side(config, schedule, resilient=True, progress=tick),
        )
    else:
        stock_side = SideReport("stock")
        resilient_side = await _run_side(config, schedule, resilient=True, progress=tick)
    return ChaosReport(config, schedule, stock_side, resilient_side, time.monotonic() - started)


def _fmt(stats: dict[str, float | int | None], key: str) -> str:
    value = stats[key]
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if isinstance(value, float) else str(value)


def _or_dash(value: object) -> object:
    return "-" if value is None else value


def format_table(report: ChaosReport) -> str:
    """The readable summary table."""
    s, r = report.stock.summary(), report.resilient.summary()
    lines = [
        f"chaos bench: {report.config.provider}, seed {report.config.seed}, {len(report.schedule)} turns, "
        f"{sum(1 for t in report.schedule if t.fault)} faults, "
        f"{'real-time' if report.config.realtime else 'fast'} pacing, {report.elapsed:.1f}s",
        f"{'':34}{'stock':>14}{'resilient':>14}",
    ]

    def row(label: str, a: object, b: object) -> None:
        lines.append(f"{label:34}{a!s:>14}{b!s:>14}")

    row("words expected", s["words_expected"], r["words_expected"])
    row("words heard", s["words_heard"], r["words_heard"])
    row("words lost", s["words_lost"], r["words_lost"])
    row("words heard twice", s["words_heard_twice"], r["words_heard_twice"])
    row("context words never heard", s["context_words_never_heard"], r["context_words_never_heard"])
    row("heard words missing from context", s["heard_words_not_in_context"], r["heard_words_not_in_context"])
    row("error frames", s["error_frames"], r["error_frames"])
    row("faults carried out", s["faults"], r["faults"])
    row("turns cut off by a fault", s["turns_cut_off"], r["turns_cut_off"])
    row(
        "gave up for good (unusable) at turn",
        _or_dash(s["unusable_from_turn"]),
        _or_dash(r["unusable_from_turn"]),
    )
    for label, key in (
        ("dead air per fault", "dead_air_s"),
        ("recovery, fault to replayed audio", "recovery_s"),
        ("first audio, no fault", "first_audio_no_fault_s"),
    ):
        for stat in ("p50", "p95", "max"):
            row(f"{label} {stat}", _fmt(s[key], stat), _fmt(r[key], stat))
    by_kind = r["recovery_by_fault_s"]
    if by_kind:
        lines.append("")
        lines.append("resilient recovery by fault (fault to replayed audio):")
        for kind, stats in by_kind.items():
            lines.append(
                f"  {kind:20} n={stats['n']:<4} p50 {_fmt(stats, 'p50'):>7}  p95 {_fmt(stats, 'p95'):>7}"
                f"  max {_fmt(stats, 'max'):>7}"
            )
    lines.append("")
    lines.append(
        "PASS: the resilient side lost, repeated and misreported nothing."
        if report.passed
        else "FAIL: the resilient side lost, repeated or misreported words."
    )
    return "\n".join(lines)


def write_outputs(report: ChaosReport, out: Path) -> list[Path]:
    """Write report.json (and timeline.png when matplotlib is installed) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json"]
    written[0].write_text(json.dumps(report.to_json(), indent=2))
    try:
        picture = _timeline(report, out / "timeline.png")
    except ImportError:
        logger.warning(
            "matplotlib is not installed: no timeline picture (pip install 'pipecat-resilient[chaos]')"
        )
    else:
        written.append(picture)
    return written


def _timeline(report: ChaosReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = (report.stock, report.resilient)
    origin = min((side.turns[0].started_at for side in sides if side.turns), default=0.0)
    end = max((t.ended_at for side in sides for t in side.turns), default=origin + 1) - origin
    figure, axes = plt.subplots(2, 1, figsize=(max(10.0, min(60.0, end * 1.5)), 4.0), sharex=True)
    for axis, side in zip(axes, sides, strict=True):
        axis.broken_barh([(a - origin, b - a) for a, b in side.audio], (0.2, 0.6), color="#3b7dd8")
        for at in side.fault_times:
            axis.axvline(at - origin, color="#d62728", linewidth=1.2)
        for turn in side.turns:
            axis.axvline(turn.started_at - origin, color="#999999", linewidth=0.5, linestyle=":")
        axis.set_yticks([0.5], [side.name])
        axis.set_ylim(0, 1)
        figures = side.summary()
        axis.set_title(
            f"{side.name}: {figures['words_lost']} words lost, {figures['words_heard_twice']} heard twice, "
            f"{figures['context_words_never_heard']} unheard in context",
            fontsize=9,
            loc="left",
        )
    axes[-1].set_xlabel("seconds (blue: audio playing; red: fault; dotted: turn start)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pipecat-resilient chaos``.

    Returns:
        0 when the resilient side lost, repeated and misreported nothing, 1
        when it did. A usage error exits 2 (``SystemExit``, from argparse)
        before anything runs. ``--side llm`` runs the speech-to-speech bench
        instead (:func:`pipecat_resilient.chaos_llm.main`).
    """
    side = argparse.ArgumentParser(prog="pipecat-resilient chaos", add_help=False)
    side.add_argument("--side", choices=("tts", "llm"), default="tts")
    known, rest = side.parse_known_args(argv)
    if known.side == "llm":
        from pipecat_resilient.chaos_llm import main as llm_main

        return llm_main(rest)
    parser = argparse.ArgumentParser(
        prog="pipecat-resilient chaos",
        description="Run a seeded schedule of provider faults (close codes, dropped connections, "
        "half-open stalls, refused reconnects, the provider's error message, slow first audio) through "
        "a stock TTS service and through the same service inside ResilientTTS, both at once, each on "
        "its own embedded emulator. Prints words lost, heard twice and misreported to the context, dead air "
        "and recovery time, and writes a JSON report and a timeline picture.",
        epilog="Exit status: 0 when the resilient side lost, repeated and misreported nothing, 1 when "
        "it did, 2 on a usage error.",
    )
    parser.add_argument(
        "--side",
        choices=("tts", "llm"),
        default="tts",
        help="tts (default): a TTS service; llm: a speech-to-speech session "
        "(`--side llm --help` for its options)",
    )
    parser.add_argument(
        "--provider",
        choices=list(TTS_KITS),
        default="elevenlabs",
        help="which TTS provider's stock service and emulator (default elevenlabs)",
    )
    parser.add_argument("--seed", type=int, default=1, help="schedule seed (default 1)")
    parser.add_argument("--turns", type=_count(minimum=1), default=12, help="number of turns (default 12)")
    parser.add_argument(
        "--faults",
        type=_count(minimum=0),
        default=None,
        help="number of faults, at most one per turn (default: two thirds of the turns)",
    )
    parser.add_argument(
        "--mix",
        type=_fault_kinds,
        default=FAULT_KINDS,
        help=f"comma list of fault kinds (default: all: {','.join(FAULT_KINDS)})",
    )
    parser.add_argument(
        "--realtime", action="store_true", help="pace audio in real time (dead air is meaningful)"
    )
    parser.add_argument(
        "--ms-per-char",
        type=_positive_number,
        default=None,
        help="speech rate (default 4, or 20 with --realtime)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("chaos-report"), help="output folder (default ./chaos-report)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="show the services' log")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: not a folder: {args.out}")
    turns = args.turns
    try:
        config = ChaosConfig(
            seed=args.seed,
            turns=turns,
            faults=args.faults if args.faults is not None else (2 * turns) // 3,
            mix=args.mix,
            realtime=args.realtime,
            ms_per_char=args.ms_per_char or (20.0 if args.realtime else 4.0),
            first_audio_delay=0.1 if args.realtime else 0.05,
            out=args.out,
            provider=args.provider,
        )
    except ValueError as exc:
        parser.error(str(exc))
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "CRITICAL")
    report = asyncio.run(_with_progress(config, enabled=not args.no_progress))
    print(format_table(report))
    if config.out is not None:
        for path in write_outputs(report, config.out):
            print(f"wrote {path}")
    return 0 if report.passed else 1


def _count(*, minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return convert


def _positive_number(text: str) -> float:
    """An argparse type: a finite number above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number more than 0, got {text!r}")
    return value


def _fault_kinds(text: str) -> tuple[str, ...]:
    """An argparse type: a comma list of :data:`FAULT_KINDS` (empty items are skipped)."""
    kinds = tuple(kind.strip() for kind in text.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in FAULT_KINDS]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise argparse.ArgumentTypeError(
            f"unknown fault kind{plural}: {', '.join(unknown)} (choose from {', '.join(FAULT_KINDS)})"
        )
    return kinds


async def _with_progress(config: ChaosConfig, *, enabled: bool) -> ChaosReport:
    bar: Any = None
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            logger.warning("tqdm is not installed: no progress bar (pip install 'pipecat-resilient[chaos]')")
        else:
            bar = tqdm(total=2 * config.turns, unit="turn", desc="chaos", file=sys.stderr)
    try:
        return await run_chaos(config, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
