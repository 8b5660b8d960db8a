"""The chaos bench: a seeded schedule of provider faults, stock Pipecat and ResilientTTS side by side.

``pipecat-resilient chaos`` runs a realistic workload - streamed LLM turns of
several sentences, standalone ``TTSSpeakFrame`` utterances, interruptions,
pauses - through a stock TTS service (``--provider``: ElevenLabs, Cartesia or
Deepgram) and through the same service inside
:class:`~pipecat_resilient.tts.ResilientTTS`, each against its own embedded
emulator, under one seeded schedule of faults (close codes, aborts, half-open
stalls, refused handshakes, the provider's error message, slow first audio, a
drop on the replacement too, and outages: the provider down for a few seconds,
cut mid-answer and refusing, stalling or hanging every connection meanwhile).
Both sides run at once. The emulators are unkind: Cartesia's word timings come
grouped, before or after their audio, in a seeded mix; Deepgram's audio chunks
cut through words and carry no timings at all.

With ``--fallback PROVIDER`` the resilient side is given a second provider
(``fallbacks=[...]``, its own emulator, speaking at the same rate so one
listener decodes both) and a fresh health store with breakers scaled to the
bench; outages join the mix and always take the preferred provider down (the
resilient side is given a pause to take it back first, when it is on the
fallback), while a connection's fault strikes the provider in use. The stock
side stays the bare stock service: it has no fallback.

Everything is measured from what a listener at the end of each pipeline heard,
decoded from the audio: words lost, heard twice, context words never heard,
heard words missing from the context, dead air and recovery time per fault
kind, error frames, time to first audio without faults, and with a fallback
the switches (from and to), the half-open probes, the handshakes to the
preferred provider while on the fallback and the time spent on each
provider. The result is a table, a JSON report and (with matplotlib) a
timeline picture. Dead air is meaningful with ``--realtime``: at fast pacing
audio arrives faster than it plays, and the backlog hides a gap. The exit
status is non-zero when the resilient side lost, repeated or misreported a
word - for a provider without word timings, when it repeated (or left out of
the context) more than the two words per fault its estimate of a cut
sentence may cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

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

from pipecat_resilient.health import BreakerPolicy, Health, LocalHealthStore
from pipecat_resilient.policy import RetryPolicy
from pipecat_resilient.testing._server import ConnectionState, WebsocketEmulator
from pipecat_resilient.testing.faults import Fault
from pipecat_resilient.testing.harness import Scenario
from pipecat_resilient.testing.kits import TTS_KITS, TTSKit, tts_kit
from pipecat_resilient.testing.report import account

__all__ = [
    "ALL_FAULT_KINDS",
    "EXTRA_KINDS",
    "FAULT_KINDS",
    "OUTAGE_KINDS",
    "ChaosConfig",
    "ChaosReport",
    "SideReport",
    "TurnPlan",
    "main",
    "make_schedule",
    "parse_config",
    "run_chaos",
]

# What a run given a progress callback returns.
R = TypeVar("R")

SAMPLE_RATE = 24000

# The longest a side on a fallback is given, before an outage turn, to take the
# preferred provider back (the library tries at most every 5 s once healthy).
PRIMARY_WAIT_S = 10.0

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
"""The faults of one connection: the default mix."""

EXTRA_KINDS: tuple[str, ...] = ("close-linger",)
"""Faults only ``--mix`` schedules: ``close-linger`` is a 1011 close whose closing handshake never
completes (a proxy passes the close frame on and hangs), so ``websockets`` raises in ``recv`` only at
the client's close timeout (2 s in Pipecat)."""

OUTAGE_KINDS: tuple[str, ...] = ("outage-refuse", "outage-stall", "outage-hang")
"""Outages: the preferred provider goes down mid-answer (its open connections cut) for a few seconds,
answering every new connection meanwhile with a refusal (503), a stalled websocket (upgraded, then
silent) or a handshake never answered; then it comes back. In the mix with ``--fallback`` (refuse and
stall) or when ``--mix`` names them."""

ALL_FAULT_KINDS: tuple[str, ...] = FAULT_KINDS + EXTRA_KINDS + OUTAGE_KINDS
"""Every fault the bench can schedule (``--mix`` takes a comma list of these)."""

FALLBACK_MIX: tuple[str, ...] = FAULT_KINDS + ("outage-refuse", "outage-stall")
"""The default mix with a fallback provider."""

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
        outage_seconds: How long an outage lasts (outage kinds only).
    """

    index: int
    kind: str
    sentences: tuple[str, ...]
    interrupt_after: int | None = None
    pause: float = 0.0
    fault: str | None = None
    fault_after_chunks: int = 3
    outage_seconds: float | None = None

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
        fallback: Another TTS provider the resilient side falls back on
            (``fallbacks=[...]``, against its own emulator); the stock side has
            none, as a stock Pipecat service has none.
        outage_seconds: Typical length of an outage: each lasts a seeded
            0.5 to 1.5 times this.
        standby: Give the resilient side a warm standby (``standby=True``):
            a connection's fault strikes whichever connection speaks, and the
            replay goes to the standby at once.
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
    fallback: str | None = None
    outage_seconds: float = 2.0
    standby: bool = False

    def __post_init__(self) -> None:
        tts_kit(self.provider)  # raises ValueError for an unknown one
        if self.fallback is not None:
            tts_kit(self.fallback)
            if self.fallback == self.provider:
                raise ValueError(f"the fallback must be another provider than {self.provider!r}")
        if not (math.isfinite(self.outage_seconds) and self.outage_seconds > 0):
            raise ValueError(f"outage_seconds must be a number more than 0, got {self.outage_seconds!r}")
        unknown = set(self.mix) - set(ALL_FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {', '.join(sorted(unknown))}")
        if self.turns < 1 or self.faults < 0 or self.faults > self.turns:
            raise ValueError("need turns >= 1 and 0 <= faults <= turns")
        if not self.mix and self.faults:
            raise ValueError("faults need a non-empty mix")

    @property
    def outages(self) -> bool:
        """Whether the mix has outages."""
        return any(kind in OUTAGE_KINDS for kind in self.mix)


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
        outage_seconds = None
        if fault in OUTAGE_KINDS:
            # A generator of its own, so outages leave the rest of the schedule as it was.
            share = random.Random(f"{config.seed}:outage:{index}").uniform(0.5, 1.5)
            outage_seconds = round(share * config.outage_seconds, 3)
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
                outage_seconds=outage_seconds,
            )
        )
    return plans


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 10))]
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice([".", ".", ".", "?", "!"])


class _OutageTrigger:
    """Starts an outage on an emulator at the k-th audio message of a turn.

    The emulators carry out a fault at exactly the k-th audio message, in the
    task that sends it; an outage has no trigger of its own. So the bench
    arms a go-away fault (a message none of these TTS protocols has: their
    emulators send nothing for it) and starts the outage when it fires: the
    connection is cut then and there, mid-answer, as by any other fault.
    """

    def __init__(self, emulator: WebsocketEmulator) -> None:
        self.emulator = emulator
        self._planned: dict[int, tuple[Fault, str, float]] = {}
        self._send_go_away = emulator.send_go_away
        emulator.send_go_away = self._fired  # type: ignore[method-assign]

    def arm(self, mode: str, seconds: float, after_audio_chunks: int) -> None:
        fault = Fault.go_away(after_audio_chunks=after_audio_chunks)
        self._planned[id(fault)] = (fault, mode, seconds)
        self.emulator.arm(fault)

    def disarm(self) -> None:
        self._planned.clear()

    async def _fired(self, state: ConnectionState, fault: Fault) -> None:
        planned = self._planned.pop(id(fault), None)
        if planned is None:
            await self._send_go_away(state, fault)
            return
        _, mode, seconds = planned
        self.emulator.outage(mode, seconds=seconds, drop_existing=True)  # type: ignore[arg-type]


def _arm(
    emulator: WebsocketEmulator,
    plan: TurnPlan,
    trigger: _OutageTrigger | None = None,
    *,
    standby: bool = False,
) -> None:
    """Arm the turn's fault on the emulator's connection in use.

    With a standby connected beside it, the fault is armed on every open
    connection and carried out by the one that speaks; a replacement's drop
    strikes the standby (the newest connection: the replacement there is).
    """
    k = plan.fault_after_chunks
    kind = plan.fault
    if kind is None:
        return
    on = "open" if standby else "current"
    if kind in OUTAGE_KINDS:
        assert trigger is not None and plan.outage_seconds is not None
        trigger.arm(kind.removeprefix("outage-"), plan.outage_seconds, k)
    elif kind == "close-linger":
        emulator.arm(Fault.close(1011, after_audio_chunks=k, linger=True), on=on)
    elif kind.startswith("close-"):
        code = int(kind.split("-")[1])
        emulator.arm(
            Fault.close(code, "invalid payload" if code == 1007 else "", after_audio_chunks=k), on=on
        )
    elif kind == "abort":
        emulator.arm(Fault.abort(after_audio_chunks=k), on=on)
    elif kind == "stall":
        emulator.arm(Fault.stall(after_audio_chunks=k), on=on)
    elif kind == "refuse-503":
        emulator.arm(Fault.close(1012, after_audio_chunks=k), on=on)
        emulator.arm(Fault.refuse(503))
    elif kind == "refuse-429":
        emulator.arm(Fault.close(1013, after_audio_chunks=k), on=on)
        emulator.arm(Fault.refuse(429, headers={"Retry-After": "0.2"}))
    elif kind == "error":
        emulator.arm(Fault.error("internal server error", 500, after_audio_chunks=k), on=on)
    elif kind == "slow-first-audio":
        emulator.arm(Fault.delay_first_audio(0.5), on=on)
    elif kind == "replacement-drop":
        if standby:
            # The standby (the newest connection) is the replacement.
            emulator.arm(Fault.close(1012, after_audio_chunks=2), on="current")
            emulator.arm(Fault.close(1011, after_audio_chunks=k), on="open")
        else:
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
    provider: int = 0  # the provider in use when the turn began (its fault struck that one)
    heard_from: int = 0  # where its words start in what the listener heard
    # An outage that took the preferred provider down while the side was on a
    # fallback: not a fault in the middle of its answer (no recovery to time).
    outage_off_air: bool = False


@dataclass(frozen=True)
class Switch:
    """The resilient side moved to another provider of its chain (``on_provider_switched``)."""

    at: float
    turn: int
    old: str
    new: str
    reason: str


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
    # The fallback chain, preferred first (one provider: the stock side, or no --fallback).
    providers: list[str] = field(default_factory=list)
    connections_by_provider: dict[str, int] = field(default_factory=dict)
    switches: list[Switch] = field(default_factory=list)
    # Probe leases the health store granted while a provider's breaker was half-open.
    probes: list[tuple[float, str]] = field(default_factory=list)
    # Handshakes to the preferred provider while a fallback was in use (probes, switch-back tries).
    primary_handshakes_on_fallback: int = 0
    # Handshakes an outage answered (refused, stalled or left hanging), on every provider.
    outage_handshakes: int = 0
    # Seconds spent before outage turns waiting for the side to take its preferred provider back.
    waited_for_primary: float = 0.0
    # Recoveries that took over on a warm standby (--standby), and whether one was kept.
    standby: bool = False
    standbys_used: int = 0
    outages: list[dict[str, Any]] = field(default_factory=list)
    breaker_changes: list[tuple[float, str, str, str]] = field(default_factory=list)
    time_by_provider: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0
    ended_at: float = 0.0

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
            "dead_air_by_fault_s": self.dead_air_by_fault(),
            "providers": self.providers,
            "connections_by_provider": self.connections_by_provider,
            "outages": len(self.outages),
            "outage_handshakes": self.outage_handshakes,
            "switches": len(self.switches),
            "switches_by_route": self.switch_routes(),
            "probes": len(self.probes),
            "primary_handshakes_on_fallback": self.primary_handshakes_on_fallback,
            "waited_for_primary_s": round(self.waited_for_primary, 3),
            "standby": self.standby,
            "standbys_used": self.standbys_used,
            "outages_while_on_fallback": sum(1 for t in self.turns if t.outage_off_air),
            "run_s": round(self.run_seconds, 3),
            "time_on_fallback_s": round(self.time_on_fallback, 3),
            "time_on_fallback_share": round(self.time_on_fallback / self.run_seconds, 4)
            if self.run_seconds
            else 0.0,
            "time_by_provider_s": {name: round(t, 3) for name, t in self.time_by_provider.items()},
        }

    @property
    def run_seconds(self) -> float:
        """From the first turn to the end of the last one's audio."""
        return max(0.0, self.ended_at - self.started_at)

    @property
    def time_on_fallback(self) -> float:
        """Seconds a provider other than the preferred one was in use."""
        return sum(
            t for name, t in self.time_by_provider.items() if self.providers and name != self.providers[0]
        )

    def switch_routes(self) -> dict[str, int]:
        """Switches counted by ``from -> to``."""
        routes: dict[str, int] = {}
        for switch in self.switches:
            key = f"{switch.old} -> {switch.new}"
            routes[key] = routes.get(key, 0) + 1
        return routes

    def details(self) -> dict[str, Any]:
        """Switches, probes, outages and breaker changes one by one (seconds from the first turn)."""

        def rel(t: float) -> float:
            return round(t - self.started_at, 3)

        return {
            "switches": [
                {"at_s": rel(s.at), "turn": s.turn, "from": s.old, "to": s.new, "reason": s.reason}
                for s in self.switches
            ],
            "probes": [{"at_s": rel(at), "provider": name} for at, name in self.probes],
            "outages": self.outages,
            "breaker_changes": [
                {"at_s": rel(at), "provider": name, "from": old, "to": new}
                for at, name, old, new in self.breaker_changes
            ],
        }

    def dead_air_by_fault(self) -> dict[str, dict[str, float | int | None]]:
        """Dead air (the longest silence from the fault to the end of the turn) per fault kind."""
        by_kind: dict[str, list[float]] = {}
        for turn in self.turns:
            if turn.fault and turn.dead_air is not None:
                by_kind.setdefault(turn.fault, []).append(turn.dead_air)
        return {kind: _percentiles(values) for kind, values in sorted(by_kind.items())}

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
        config["resilient_retry"] = asdict(_retry_policy(self.config))
        config["resilient_breaker"] = asdict(_breaker_policy(self.config))
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
                    "outage_s": t.outage_seconds,
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
                        "provider": side.providers[r.provider] if side.providers else None,
                    }
                    for r in side.turns
                ]
                for side in (self.stock, self.resilient)
            },
            "events": {side.name: side.details() for side in (self.stock, self.resilient)},
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


class _BenchHealth(LocalHealthStore):
    """A fresh health store for one side of one run, that also notes the probes it let through."""

    def __init__(self, policy: BreakerPolicy) -> None:
        self.probes: list[tuple[float, str]] = []
        self.changes: list[tuple[float, str, str, str]] = []
        super().__init__(policy=policy, on_change=self._changed_state)

    def _changed_state(self, provider: str, old: Health, new: Health) -> None:
        self.changes.append((time.monotonic(), provider, old.value, new.value))

    async def try_acquire_probe(self, provider: str) -> bool:
        won = await super().try_acquire_probe(provider)
        if won:
            self.probes.append((time.monotonic(), provider))
        return won


def _retry_policy(config: ChaosConfig) -> RetryPolicy:
    """The resilient side's retry policy.

    With outages in the mix, one that waits an outage out (a connection
    attempt at most every half second, for up to four typical outages); a
    provider down that long with no fallback is what it is for.
    """
    if config.outages:
        return RetryPolicy(attempts=100, wait_max=0.5, timeout=max(20.0, 4 * config.outage_seconds))
    return RetryPolicy(attempts=6, timeout=20.0)


def _breaker_policy(config: ChaosConfig) -> BreakerPolicy:
    """The resilient side's circuit breakers, scaled to the bench (a conversation of minutes runs in
    seconds, so the library's 30 s window would count every fault of the run).

    Two failures within a typical outage open one (a drop and a failed
    reconnect: what makes the chain move on), so a provider left for a
    fallback is tried again by half-open probes; the cooldown is a quarter
    of a typical outage and doubles after a failed probe, up to a whole one.
    """
    cooldown = max(0.1, config.outage_seconds / 4)
    return BreakerPolicy(
        failures=2,
        window=config.outage_seconds,
        cooldown=cooldown,
        cooldown_max=max(cooldown, config.outage_seconds),
    )


async def _run_side(
    config: ChaosConfig,
    schedule: list[TurnPlan],
    *,
    resilient: bool,
    progress: Callable[[], None],
) -> SideReport:
    from pipecat_resilient.tts import ResilientTTS

    kits = [tts_kit(config.provider)]
    if resilient and config.fallback is not None:
        kits.append(tts_kit(config.fallback))
    name = "resilient" if resilient else "stock"
    report = SideReport(name, repeat_allowance=0 if all(kit.timings for kit in kits) else 2)
    async with contextlib.AsyncExitStack() as stack:
        emulators: list[WebsocketEmulator] = [
            await stack.enter_async_context(kit.emulator(**_emulator_options(config, kit))) for kit in kits
        ]
        triggers = [_OutageTrigger(emulator) for emulator in emulators]
        rates = {emulator.samples_per_char(SAMPLE_RATE) for emulator in emulators}
        if len(rates) != 1:
            raise RuntimeError(
                f"the emulators speak at different rates ({sorted(rates)} samples a character)"
            )
        makes = [
            kit.factory(emulator, api_key="chaos-key", voice="chaos")
            for kit, emulator in zip(kits, emulators, strict=True)
        ]
        now_at = {"turn": -1}
        store: _BenchHealth | None = None
        tts: FrameProcessor

        def in_use() -> int:
            return 0

        if resilient:
            store = _BenchHealth(_breaker_policy(config))
            shell = ResilientTTS(
                makes[0],
                fallbacks=makes[1:],
                health=store,
                retry=_retry_policy(config),
                standby=config.standby,
                first_audio_timeout=config.first_audio_timeout,
                stall_timeout=config.stall_timeout,
                # The emulated voice's rate, as a bot is told its voice's:
                # what a first cut sentence's audio covered can be estimated
                # before the session has timed a word of its own.
                speaking_rate=1000 / config.ms_per_char,
            )
            tts = shell
            report.providers = shell.providers
            if len(makes) > 1:

                def in_use() -> int:
                    return shell.providers.index(shell.provider_name)

                @shell.event_handler("on_provider_switched")
                async def switched(processor: Any, old: str, new: str, reason: str) -> None:
                    report.switches.append(Switch(time.monotonic(), now_at["turn"], old, new, reason))

        else:
            tts = makes[0]()
            report.providers = [type(tts).__name__]
        run = Scenario(tts, spc=rates.pop(), sample_rate=SAMPLE_RATE)
        await run.start()
        report.started_at = time.monotonic()
        for plan in schedule:
            now_at["turn"] = plan.index
            if plan.fault in OUTAGE_KINDS and in_use() != 0:
                # An outage takes the preferred provider down mid-answer: give
                # the side the pause it needs to take it back first.
                report.waited_for_primary += await _wait_for(lambda: in_use() == 0, PRIMARY_WAIT_S)
            report.turns.append(
                await _run_turn(
                    run,
                    emulators,
                    triggers,
                    in_use(),
                    plan,
                    idle=_turn_idle(config, plan),
                    standby=resilient and config.standby,
                )
            )
            if report.unusable_from is None and not tts.is_usable:
                report.unusable_from = plan.index
            progress()
            if plan.pause:
                await asyncio.sleep(plan.pause)
        await _quiet(run, idle=0.3)
        report.ended_at = time.monotonic()
        if not resilient:
            # A stock service stuck on a half-open socket would spend its close
            # timeouts saying goodbye to it.
            for emulator in emulators:
                await emulator.stop()
        await run.end(timeout=60.0)
        if resilient and config.standby:
            report.standby = True
            report.standbys_used = getattr(tts, "standbys_used", 0)
        _collect(report, run, emulators, store)
    return report


def _emulator_options(config: ChaosConfig, kit: TTSKit) -> dict[str, Any]:
    """The emulator as unkind as its real provider: timings and audio grouped and ordered as it may.

    Every provider speaks at ``config.ms_per_char``, so one listener decodes a
    primary and its fallback alike.
    """
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


def _fault_times(emulators: Sequence[WebsocketEmulator]) -> list[float]:
    """When each fault was carried out (a connection's fault, or an outage's start), in order."""
    times = [c.fault_at for e in emulators for c in e.connections if c.fault_at is not None]
    times.extend(outage.started_at for e in emulators for outage in e.outages)
    return sorted(times)


def _turn_idle(config: ChaosConfig, plan: TurnPlan) -> float:
    """How long a turn may be quiet before it is over: through an outage, a side that waits it out
    is quiet for as long (and a handshake left hanging costs a connection attempt's timeout)."""
    idle = 1.5
    if plan.outage_seconds is not None:
        idle += 1.5 * plan.outage_seconds
        if plan.fault == "outage-hang":
            idle += _retry_policy(config).attempt_timeout or 0.0
    return idle


async def _wait_for(condition: Callable[[], bool], limit: float) -> float:
    """Wait until ``condition()`` holds or ``limit`` seconds passed; returns the seconds waited."""
    started = time.monotonic()
    while not condition() and time.monotonic() - started < limit:
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def _run_turn(
    run: Scenario,
    emulators: Sequence[WebsocketEmulator],
    triggers: Sequence[_OutageTrigger],
    provider: int,
    plan: TurnPlan,
    *,
    idle: float = 1.5,
    standby: bool = False,
) -> TurnResult:
    """Run one turn; its fault strikes ``provider`` (the one in use), an outage always the preferred one.

    The turn is over once all its words were heard, or nothing reached the
    listener for ``idle`` seconds.
    """
    listener = run.listener
    heard_before = len(listener.heard)
    stopped_before = listener.stopped
    audio_before = len(listener.audio_times)
    # A turn's fault belongs to that turn: one that did not fire (a side stuck
    # on a dead socket) must not pile up for the next connection.
    for emulator, trigger in zip(emulators, triggers, strict=True):
        emulator.disarm()
        trigger.disarm()
    armed_at = time.monotonic()
    if plan.fault in OUTAGE_KINDS and provider != 0:
        # Still on a fallback: the preferred provider goes down now, not mid-answer.
        assert plan.outage_seconds is not None
        emulators[0].outage(plan.fault.removeprefix("outage-"), seconds=plan.outage_seconds)  # type: ignore[arg-type]
    else:
        # A connection's fault strikes the provider in use (with a fallback, maybe not the preferred one).
        _arm(emulators[provider], plan, triggers[provider], standby=standby)
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
            await _wait_done(run, heard_before + words, stopped_before + 1, idle=idle)
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
        provider=provider,
        heard_from=heard_before,
    )
    result.outage_off_air = plan.fault in OUTAGE_KINDS and provider != 0
    fired = [at for at in _fault_times(emulators) if at >= armed_at]
    if fired and not result.outage_off_air:
        result.fault_at = fired[0]
        later = [
            c.first_audio_at
            for e in emulators
            for c in e.connections
            if c.first_audio_at and c.first_audio_at > (result.fault_at or 0)
        ]
        result.recovered_at = min(later) if later and min(later) <= ended else None
    result.cut_off = not interrupted and len(heard) < len(plan.words)
    return result


async def _wait_done(run: Scenario, heard: int, stopped: int, *, idle: float = 1.5) -> None:
    """Wait until the turn was heard and stopped, or nothing happened for a while."""
    listener = run.listener
    if not await listener.settle(
        lambda: len(listener.heard) >= heard and listener.stopped >= stopped, idle=idle, limit=30.0
    ):
        raise TimeoutError


async def _quiet(run: Scenario, *, idle: float) -> None:
    """Wait until no frame reached the listener for ``idle`` seconds."""
    await run.listener.settle(lambda: False, idle=idle, limit=60.0)


def _collect(
    report: SideReport,
    run: Scenario,
    emulators: Sequence[WebsocketEmulator],
    store: _BenchHealth | None,
) -> None:
    """Turn the run's records into the side's figures."""
    listener = run.listener
    # A turn's words are what the listener heard from its start to the next
    # turn's: words that came late (during a pause, or after the turn gave up
    # waiting) still count, and where they were said.
    ends = [turn.heard_from for turn in report.turns[1:]] + [len(listener.heard)]
    for turn, end in zip(report.turns, ends, strict=True):
        turn.heard = listener.heard[turn.heard_from : end]
        if turn.interrupted:
            turn.expected = turn.heard
    expected: list[str] = []
    heard: list[str] = []
    for turn in report.turns:
        expected.extend(turn.expected)
        heard.extend(turn.heard)
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
    report.connections = sum(len(e.connections) for e in emulators)
    report.connections_by_provider = {
        name: len(e.connections) for name, e in zip(report.providers, emulators, strict=False)
    }
    report.fault_times = _fault_times(emulators)
    report.faults = len(report.fault_times)
    report.turns_cut_off = sum(1 for t in report.turns if t.cut_off and t.fault)
    _collect_fallback(report, emulators, store)
    # Playout timeline: each frame plays at arrival or when the last one ends.
    playing_until: float | None = None
    played: list[tuple[float, float]] = []  # (arrival, end of its playout), frame by frame
    for arrived, size in listener.audio_times:
        start = arrived if playing_until is None else max(arrived, playing_until)
        playing_until = start + size / (2 * SAMPLE_RATE)
        played.append((arrived, playing_until))
        if report.audio and abs(report.audio[-1][1] - start) < 1e-3:
            report.audio[-1] = (report.audio[-1][0], playing_until)
        else:
            report.audio.append((start, playing_until))
    starts = [turn.started_at for turn in report.turns[1:]] + [math.inf]
    for turn, next_start in zip(report.turns, starts, strict=True):
        if turn.fault is None and not turn.interrupted and turn.first_audio_at is not None:
            report.first_audio.append(turn.first_audio_at - turn.started_at)
        if turn.fault_at is None:
            continue
        if turn.recovered_at is not None:
            report.recovery.append(turn.recovered_at - turn.fault_at)
        if not turn.cut_off:
            # Up to the end of the turn's own audio: what arrived before the next turn began.
            own = [end for arrived, end in played if turn.started_at <= arrived < next_start]
            until = max(own, default=turn.ended_at)
            turn.dead_air = _dead_air(report.audio, turn.fault_at, until)
            report.dead_air.append(turn.dead_air)


def _collect_fallback(
    report: SideReport, emulators: Sequence[WebsocketEmulator], store: _BenchHealth | None
) -> None:
    """Outages, switches, probes and the time spent on each provider."""
    at_end = time.monotonic()
    for index, emulator in enumerate(emulators):
        emulator.time_in_outage()  # ends an outage whose time is up
        provider = report.providers[index] if index < len(report.providers) else str(index)
        for outage in emulator.outages:
            turn = max((t.index for t in report.turns if t.started_at <= outage.started_at), default=None)
            report.outage_handshakes += len(outage.met)
            report.outages.append(
                {
                    "provider": provider,
                    "mode": outage.mode,
                    "turn": turn,
                    "at_s": round(outage.started_at - report.started_at, 3),
                    "planned_s": _round(outage.seconds),
                    "lasted_s": _round(
                        outage.duration if outage.duration is not None else at_end - outage.started_at
                    ),
                    "still_down_at_end": outage.ended_at is None,
                    "connections_cut": len(outage.dropped),
                    "handshakes_met": len(outage.met),
                }
            )
    # Which provider was in use when: the preferred one first, then as the switches say.
    spans: list[tuple[float, float, str]] = []
    if report.providers:
        current, since = report.providers[0], report.started_at
        for switch in report.switches:
            at = min(max(switch.at, report.started_at), report.ended_at)
            spans.append((since, at, current))
            current, since = switch.new, at
        spans.append((since, max(since, report.ended_at), current))
    report.time_by_provider = {name: 0.0 for name in report.providers}
    for start, end, name in spans:
        report.time_by_provider[name] = report.time_by_provider.get(name, 0.0) + end - start
    if len(emulators) > 1:
        preferred = report.providers[0]
        report.primary_handshakes_on_fallback = sum(
            1
            for c in emulators[0].connections
            if any(start <= c.opened_at < end and name != preferred for start, end, name in spans)
        )
    if store is not None:
        report.probes = list(store.probes)
        report.breaker_changes = list(store.changes)


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
    """The longest silence in the playout timeline between ``since`` and ``until`` (the end of the
    turn's audio): later turns' silences are theirs."""
    longest = 0.0
    previous_end: float | None = None
    for start, end in audio:
        if end < since:
            previous_end = end
            continue
        if start >= until:
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
    config = report.config
    chain = f"{config.provider} (fallback {config.fallback})" if config.fallback else config.provider
    if config.standby:
        chain += ", warm standby"
    lines = [
        f"chaos bench: {chain}, seed {report.config.seed}, {len(report.schedule)} turns, "
        f"{sum(1 for t in report.schedule if t.fault)} faults, "
        f"{'real-time' if report.config.realtime else 'fast'} pacing, {report.elapsed:.1f}s",
        f"{'':38}{'stock':>14}{'resilient':>14}",
    ]

    def row(label: str, a: object, b: object) -> None:
        lines.append(f"{label:38}{a!s:>14}{b!s:>14}")

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
    if config.standby:
        # A stock Pipecat service has no standby.
        row("recoveries taken over by the standby", "-", r["standbys_used"])
    if config.outages:
        row("outages (provider down for a while)", s["outages"], r["outages"])
        row("handshakes met by an outage", s["outage_handshakes"], r["outage_handshakes"])
    if config.fallback:
        # A stock Pipecat service has no fallback: nothing to switch to.
        row("fallback provider", "none", config.fallback)
        row("provider switches", "-", r["switches"])
        row("probes (half-open leases)", "-", r["probes"])
        row("primary handshakes while on fallback", "-", r["primary_handshakes_on_fallback"])
        share = f"{r['time_on_fallback_s']:.1f}s ({100 * r['time_on_fallback_share']:.0f}%)"
        row("time on the fallback (share of run)", "-", share)
        row("waited for the primary before outages", "-", f"{r['waited_for_primary_s']:.1f}s")
        if r["outages_while_on_fallback"]:
            row("outages while still on the fallback", "-", r["outages_while_on_fallback"])
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
    dead_stock, dead_resilient = s["dead_air_by_fault_s"], r["dead_air_by_fault_s"]
    if dead_stock or dead_resilient:
        lines.append("")
        lines.append("dead air by fault (longest silence, fault to end of turn; turns not cut off):")
        lines.append(f"  {'':20}{'stock n':>8}{'p50':>8}{'max':>8}{'resilient n':>13}{'p50':>8}{'max':>8}")
        empty = {"n": 0, "p50": None, "max": None}
        for kind in sorted(set(dead_stock) | set(dead_resilient)):
            a, b = dead_stock.get(kind, empty), dead_resilient.get(kind, empty)
            lines.append(
                f"  {kind:20}{a['n']:>8}{_fmt(a, 'p50'):>8}{_fmt(a, 'max'):>8}"
                f"{b['n']:>13}{_fmt(b, 'p50'):>8}{_fmt(b, 'max'):>8}"
            )
    if r["switches_by_route"]:
        lines.append("")
        lines.append("resilient provider switches:")
        for route, count in r["switches_by_route"].items():
            lines.append(f"  {route}: {count}")
        for provider, seconds in r["time_by_provider_s"].items():
            lines.append(f"  time on {provider}: {seconds:.1f}s")
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
        for switch in side.switches:
            axis.axvline(switch.at - origin, color="#2ca02c", linewidth=1.2, linestyle="--")
        for outage in side.outages:
            start = side.started_at + outage["at_s"] - origin
            axis.axvspan(start, start + (outage["lasted_s"] or 0.0), color="#d62728", alpha=0.12)
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
    axes[-1].set_xlabel(
        "seconds (blue: audio playing; red: fault; shaded: outage; green dashes: provider switch; "
        "dotted: turn start)"
    )
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
        instead (:func:`pipecat_resilient.chaos_llm.main`), ``--side stt`` the
        speech-to-text one (:func:`pipecat_resilient.chaos_stt.main`).
    """
    side = argparse.ArgumentParser(prog="pipecat-resilient chaos", add_help=False)
    side.add_argument("--side", choices=("tts", "llm", "stt"), default="tts")
    known, rest = side.parse_known_args(argv)
    if known.side == "llm":
        from pipecat_resilient.chaos_llm import main as llm_main

        return llm_main(rest)
    if known.side == "stt":
        from pipecat_resilient.chaos_stt import main as stt_main

        return stt_main(rest)
    config, args = parse_config(argv)
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "CRITICAL")
    report = asyncio.run(_with_progress(config, enabled=not args.no_progress))
    print(format_table(report))
    if config.out is not None:
        for path in write_outputs(report, config.out):
            print(f"wrote {path}")
    return 0 if report.passed else 1


def parse_config(argv: list[str] | None = None) -> tuple[ChaosConfig, argparse.Namespace]:
    """The TTS bench's command line, checked: the run's configuration and the other options.

    Raises:
        SystemExit: With status 2 and argparse's message on a usage error.
    """
    parser = argparse.ArgumentParser(
        prog="pipecat-resilient chaos",
        description="Run a seeded schedule of provider faults (close codes, dropped connections, "
        "half-open stalls, refused reconnects, the provider's error message, slow first audio, and "
        "outages: the provider down for a few seconds) through "
        "a stock TTS service and through the same service inside ResilientTTS, both at once, each on "
        "its own embedded emulator. With --fallback, ResilientTTS falls back on a second provider "
        "(its own emulator) and takes the first back once healthy; the stock side has no fallback. "
        "Prints words lost, heard twice and misreported to the context, dead air and recovery time per "
        "fault, switches, probes and time on the fallback, and writes a JSON report and a timeline picture.",
        epilog="Exit status: 0 when the resilient side lost, repeated and misreported nothing, 1 when "
        "it did, 2 on a usage error.",
    )
    parser.add_argument(
        "--side",
        choices=("tts", "llm", "stt"),
        default="tts",
        help="tts (default): a TTS service; llm: a speech-to-speech session; stt: a speech-to-text "
        "service (`--side llm --help`, `--side stt --help` for their options)",
    )
    parser.add_argument(
        "--provider",
        choices=list(TTS_KITS),
        default="elevenlabs",
        help="which TTS provider's stock service and emulator (default elevenlabs)",
    )
    parser.add_argument(
        "--fallback",
        choices=list(TTS_KITS),
        default=None,
        metavar="PROVIDER",
        help=f"another provider ({', '.join(TTS_KITS)}; not --provider) the resilient side falls back on, "
        "on its own emulator at the same speech rate; adds outages to the default mix. The stock side "
        "has none (a stock service has no fallback)",
    )
    parser.add_argument(
        "--standby",
        action="store_true",
        help="give the resilient side a warm standby (standby=True): one more connection kept open, so "
        "a recovery costs no handshake; a fault strikes whichever connection speaks",
    )
    parser.add_argument(
        "--outage-seconds",
        type=_positive_number,
        default=2.0,
        help="how long an outage keeps the preferred provider down: each lasts a seeded 0.5 to 1.5 "
        "times this (default 2); with outages in the mix the resilient side retries for up to 4 times "
        "this (at least 20 s), every half second at most",
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
        default=None,
        help=f"comma list of fault kinds (default: {','.join(FAULT_KINDS)}; with --fallback also "
        "outage-refuse,outage-stall). Also: outage-hang (handshakes never answered) and close-linger "
        "(a 1011 close whose closing handshake never completes). An outage cuts the preferred provider "
        "mid-answer and refuses (503), stalls (upgrade, then silence) or hangs every connection for "
        "--outage-seconds",
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
    mix = args.mix if args.mix is not None else FALLBACK_MIX if args.fallback else FAULT_KINDS
    try:
        config = ChaosConfig(
            seed=args.seed,
            turns=turns,
            faults=args.faults if args.faults is not None else (2 * turns) // 3,
            mix=mix,
            realtime=args.realtime,
            ms_per_char=args.ms_per_char or (20.0 if args.realtime else 4.0),
            first_audio_delay=0.1 if args.realtime else 0.05,
            out=args.out,
            provider=args.provider,
            fallback=args.fallback,
            outage_seconds=args.outage_seconds,
            standby=args.standby,
        )
    except ValueError as exc:
        if args.fallback is not None and args.fallback == args.provider:
            parser.error(f"argument --fallback: must be another provider than --provider ({args.provider})")
        parser.error(str(exc))
    return config, args


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


def _kinds_type(known: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma list of ``known`` fault kinds (empty items are skipped)."""

    def convert(text: str) -> tuple[str, ...]:
        kinds = tuple(kind.strip() for kind in text.split(",") if kind.strip())
        unknown = [kind for kind in kinds if kind not in known]
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            raise argparse.ArgumentTypeError(
                f"unknown fault kind{plural}: {', '.join(unknown)} (choose from {', '.join(known)})"
            )
        return kinds

    return convert


_fault_kinds = _kinds_type(ALL_FAULT_KINDS)


async def _with_progress(config: ChaosConfig, *, enabled: bool) -> ChaosReport:
    return await _progress_run(
        lambda progress: run_chaos(config, progress=progress),
        total=2 * config.turns,
        desc="chaos",
        enabled=enabled,
    )


async def _progress_run(
    run: Callable[[Callable[[int], None] | None], Awaitable[R]], *, total: int, desc: str, enabled: bool
) -> R:
    """Await ``run(progress)`` with a progress bar of ``total`` steps on stderr (when ``enabled`` and
    tqdm is installed; ``progress`` is None otherwise)."""
    bar: Any = None
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            logger.warning("tqdm is not installed: no progress bar (pip install 'pipecat-resilient[chaos]')")
        else:
            bar = tqdm(total=total, unit="turn", desc=desc, file=sys.stderr)
    try:
        return await run(bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
