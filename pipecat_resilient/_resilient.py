"""The shell every resilient processor shares: host an instance, watch it, recover it, or give up once.

:class:`ResilientProcessor` is a ``FrameProcessor`` that owns one live stock
service instance at a time (through :class:`~pipecat_resilient._hosting.Host`)
and a *journal* (the TTS :class:`~pipecat_resilient.ledger.Ledger`, the LLM
:class:`~pipecat_resilient.inference.InferenceJournal`) that decides what to
feed the instance. This module does the parts that do not depend on what the
service does: starting the first instance, the watchdog, the recovery episode
with its retry policy, replacing a failed instance, replaying what the journal
says, and the single ``ErrorFrame`` when recovery is exhausted. Subclasses
translate frames into journal calls and journal actions into frames.

It also does what makes a shell stand in for the service it hosts, whatever
the service: every event the stock service offers can be registered on the
shell and fires from whichever instance is live; settings updates addressed to
the shell reach the live instance in order and every fresh instance before it
goes live; configuration calls (registering a function, adding a text
transform) reach every instance the shell will ever host; and every instance
carries the shell's name, so metrics and service metadata name the processor
in the pipeline before and after any number of reconnects.

A concrete shell subclasses this class *and* the stock service's base class
(``TTSService``, ``LLMService``), so Pipecat's own code and observers that ask
``isinstance(processor, LLMService)`` see the service they expect. The base
class's own lifecycle and state never run on the shell (``setup``,
``process_frame``, ``push_frame``... are the plain ``FrameProcessor``'s here):
each public member of the base class is either delegated explicitly by the
shell or deliberately left out, and ``tests/test_dropin.py`` checks that list
against the installed Pipecat, so a new member cannot silently act on the
shell's unused state. There is no blanket ``__getattr__``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    ServiceUpdateSettingsFrame,
    StartFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup
from pipecat.utils.errors import ErrorCategory

from pipecat_resilient._hosting import (
    STABLE_AFTER_S,
    Episode,
    Host,
    Hosted,
    HostedState,
    ReusedInstance,
    now,
    socket_open,
)
from pipecat_resilient.errors import ReplayFailed
from pipecat_resilient.failures import Failure, Verdict
from pipecat_resilient.health import Health, HealthStore, default_store
from pipecat_resilient.ledger import State
from pipecat_resilient.policy import DEFAULT_RETRY, RetryPolicy

__all__ = ["Abandoned", "Journal", "RecoveryReport", "ResilientProcessor"]

# Enum members read on every frame, bound once (a class attribute lookup on an
# Enum costs ten times a global's).
_CONNECTING = HostedState.CONNECTING
_DRAINING = HostedState.DRAINING
_RETIRED = HostedState.RETIRED

S = TypeVar("S", bound=FrameProcessor)

# Events every FrameProcessor raises for itself: the shell raises its own, so
# the hosted instance's are not forwarded.
_PROCESSOR_EVENTS = frozenset(
    {
        "on_before_process_frame",
        "on_after_process_frame",
        "on_before_push_frame",
        "on_after_push_frame",
        "on_error",
        "on_usable_changed",
    }
)
# The shell's own events.
_SHELL_EVENTS = (
    "on_connection_lost",
    "on_connection_recovered",
    "on_connection_given_up",
    "on_provider_switched",
)

# How a conversation goes back to a preferred provider after falling back.
SWITCH_BACK = ("boundary", "never")

# How often (seconds) a shell with fallbacks looks at its providers' health
# while idle, and tries a preferred provider again at most.
HEALTH_POLL_S = 1.0
SWITCH_BACK_INTERVAL_S = 5.0

# How often (seconds) a warm standby is looked at, and how long to wait
# before connecting another after connecting one failed (doubling).
STANDBY_CHECK_S = 0.25
STANDBY_RETRY_S = 0.5
STANDBY_RETRY_MAX_S = 30.0


class Journal(Protocol):
    """What the shell needs of a journal (the TTS ledger, the LLM inference journal)."""

    state: State

    def connection_lost(self, *, now: float) -> None: ...

    def revived(self) -> None: ...

    def overdue(self, *, now: float) -> str | None: ...

    def to_feed(self) -> Sequence[Any]: ...


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What one recovery did, passed to ``on_connection_recovered``.

    Parameters:
        failure: The failure that started it.
        attempts: Connection attempts it took.
        downtime: Seconds from the drop being detected to the fresh instance
            being fed the replay.
        replayed_utterances: Utterances (or inferences) replayed, in part or whole.
        replayed_chars: Characters of text replayed.
    """

    failure: Failure | None
    attempts: int
    downtime: float
    replayed_utterances: int
    replayed_chars: int


@dataclass(frozen=True)
class Abandoned:
    """What was left when recovery gave up (built by a subclass's ``_abandon``).

    Parameters:
        unspoken: Text accepted and never heard, one entry per utterance.
        closing: Frames to push downstream before the error (closing what was open).
        passing: Frames owed downstream, pushed after the error.
        lost: What was lost, in words, when it is not text to speak.
    """

    unspoken: tuple[str, ...] = ()
    closing: tuple[Frame, ...] = ()
    passing: tuple[Frame, ...] = ()
    lost: str | None = None


class ResilientProcessor(FrameProcessor, Generic[S]):
    """Base of the resilient shells. Subclass it; do not instantiate directly.

    Event handlers:
        on_connection_lost: ``(processor, failure: Failure)``.
        on_connection_recovered: ``(processor, report: RecoveryReport)``.
        on_connection_given_up: ``(processor, error: ReplayFailed)``.
        on_provider_switched: ``(processor, from_name: str, to_name: str, reason: str)``:
            the processor moved to another provider of its fallback chain.
        Every event of the stock service (``on_connected``,
        ``on_function_calls_started``...): forwarded from the live instance,
        with the shell as the processor argument.

    Args:
        factory: Zero-argument callable returning a new stock service.
        expected: The class the factory must return instances of.
        journal: The journal deciding what to feed.
        retry: The retry policy (``DEFAULT_RETRY`` when None).
        watchdog_tick: Seconds between watchdog checks.
        fallbacks: Factories of the providers to fall back on, in order.
        health: Where provider health (circuit breakers) is kept and shared
            (:func:`~pipecat_resilient.health.default_store` when None).
        switch_back: ``"boundary"`` or ``"never"`` (see the subclasses).
        switch_after: Failed connection attempts on one provider, within a
            recovery, before the next provider of the chain is tried.
        standby: Keep one more instance of the provider in use connected,
            to take over at the next drop without a handshake.
        **kwargs: Passed to ``FrameProcessor``.
    """

    def __init__(
        self,
        factory: Callable[[], S],
        expected: type[S],
        *,
        journal: Journal,
        retry: RetryPolicy | None,
        watchdog_tick: float,
        fallbacks: Sequence[Callable[[], S]] = (),
        health: HealthStore | None = None,
        switch_back: str = "boundary",
        switch_after: int = 1,
        standby: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create the shell; validates ``retry`` and (by calling them) ``factory`` and ``fallbacks``."""
        # The stock service base class's __init__ (the shell subclasses it for
        # isinstance checks); its state is never used.
        super().__init__(**{"enable_direct_mode": self._direct_mode, **kwargs})
        if retry is None:
            retry = DEFAULT_RETRY
        if not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
        if switch_back not in SWITCH_BACK:
            raise ValueError(f"switch_back must be one of {', '.join(SWITCH_BACK)}, got {switch_back!r}")
        if isinstance(switch_after, bool) or not isinstance(switch_after, int) or switch_after < 1:
            raise ValueError(f"switch_after must be a whole number of at least 1, got {switch_after!r}")
        if not isinstance(standby, bool):
            raise TypeError(f"standby must be True or False, got {standby!r}")
        if health is not None and not all(
            callable(getattr(health, name, None))
            for name in ("state", "record_failure", "record_success", "try_acquire_probe")
        ):
            raise TypeError(f"health must be a HealthStore, got {type(health).__name__}")
        self._retry = retry
        self._journal = journal
        self._health: HealthStore = health if health is not None else default_store()
        self._switch_back = switch_back
        self._switch_after = switch_after
        # The provider of the chain in use (live, or being recovered to).
        self._chain_at = 0
        self._health_tasks: set[asyncio.Task[Any]] = set()
        self._health_checked_at = 0.0
        self._switch_back_tried_at = 0.0
        self._switching: asyncio.Task[None] | None = None
        # A warm standby: an instance connected ahead of time, taken at the
        # next drop instead of paying for a handshake then.
        self._standby_wanted = standby
        self._standby: Hosted[S] | None = None
        self._standby_task: asyncio.Task[None] | None = None
        self._standby_changed = asyncio.Event()
        self.standbys_used = 0
        self._watchdog_tick = watchdog_tick
        self._live: Hosted[S] | None = None
        self._setup_data: FrameProcessorSetup | None = None
        self._start_frame: StartFrame | None = None
        self._first_failure: Failure | None = None
        self._episode: Episode | None = None
        self._lost_at: float | None = None
        self._ended = False
        self._rng = random.Random()
        self._feed_lock = asyncio.Lock()
        self._watchdog_task: asyncio.Task[None] | None = None
        self._recovery_task: asyncio.Task[None] | None = None
        self._draining: Hosted[S] | None = None
        # Calls that configure an instance (registering a function...), keyed
        # so that a later call for the same thing replaces an earlier one, in
        # the order they were made: replayed on every fresh instance.
        self._configuration: dict[object, Callable[[S], Any]] = {}
        # Settings updates the live instance has applied, per provider (a
        # voice of one provider means nothing to another), replayed on every
        # fresh instance of that provider before it goes live.
        self._settings_by_provider: dict[int, list[ServiceUpdateSettingsFrame]] = {}
        for event in _SHELL_EVENTS:
            self._register_event_handler(event)
        self._host: Host[S] = Host(
            self,
            factory,
            expected,
            downstream=self._on_instance_downstream,
            upstream=self._on_instance_upstream,
            prepare=self._prepare_hosted,
            spare=self._spare_instance,
            fallbacks=fallbacks,
        )

    @property
    def _applied_settings(self) -> list[ServiceUpdateSettingsFrame]:
        """Settings updates applied while the current provider was in use."""
        return self._settings_by_provider.setdefault(self._chain_at, [])

    @property
    def provider_name(self) -> str:
        """The name of the provider in use (a stock service class name, ``#n`` for a repeat)."""
        return self._host.names[self._chain_at]

    @property
    def standby_ready(self) -> bool:
        """Whether a warm standby (``standby=True``) is connected and could take over now."""
        standby = self._standby
        return standby is not None and self._standby_usable(standby, self._chain_at)

    @property
    def providers(self) -> list[str]:
        """The fallback chain's provider names, preferred first (the keys of their health)."""
        return list(self._host.names)

    # ------------------------------------------------------------------
    # Public state
    # ------------------------------------------------------------------

    @property
    def service(self) -> S | None:
        """The live stock service instance, or None while recovering."""
        return self._live.service if self._live is not None else None

    @property
    def state(self) -> State:
        """Whether it is live, recovering, or has given up."""
        return self._journal.state

    @property
    def _reference(self) -> S:
        """The instance that answers questions about the service: the live one, else the newest."""
        live = self._live
        return live.service if live is not None else self._host.latest.service

    def _configure(self, key: object, call: Callable[[S], Any]) -> Any:
        """Apply a configuration call to every instance now hosted, and to every fresh one later.

        Args:
            key: What the call configures; a later call with the same key
                replaces this one in the replay.
            call: Applied to an instance.

        Returns:
            What the call returned on the reference instance.
        """
        self._configuration.pop(key, None)
        self._configuration[key] = call
        reference = self._reference
        result = call(reference)
        for hosted in self._host.all:
            if hosted.speaks_for_owner and hosted.service is not reference:
                call(hosted.service)
        return result

    # ------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        """Set up the processor and its first service instance (which may connect here)."""
        await FrameProcessor.setup(self, setup)
        self._setup_data = setup
        self._first_failure = await self._host.set_up(self._host.first, setup, self._retry.attempt_timeout)

    async def cleanup(self) -> None:
        """Tear down every service instance."""
        await FrameProcessor.cleanup(self)
        self._ended = True
        await self._stop_tasks()
        self._live = None
        await self._host.close()

    async def set_usable(self, is_usable: bool) -> None:
        """Bring the processor back after it gave up (or write it off).

        Setting it usable again after recovery gave up connects a fresh
        instance for what comes next.
        """
        await FrameProcessor.set_usable(self, is_usable)
        if is_usable and self.state is State.FAILED and self._start_frame is not None and not self._ended:
            self._journal.revived()
            self._lost_at = now()
            self._episode = None
            self._recovery_task = self.create_task(self._recover(None), name="recovery")

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Start, cancel, or route the frame (see :meth:`_route`)."""
        await FrameProcessor.process_frame(self, frame, direction)
        if isinstance(frame, StartFrame):
            await self._start(frame)
        elif isinstance(frame, CancelFrame):
            await self._cancel(frame)
        else:
            await self._route(frame, direction)

    # A frame is pushed on as by a plain ``FrameProcessor``: the hosted
    # instance did the service's part. Assigned rather than overridden, so
    # that every frame costs no extra call.
    push_frame = FrameProcessor.push_frame

    def can_generate_metrics(self) -> bool:
        """Whether the hosted service reports metrics (it does, under this processor's name)."""
        return self._reference.can_generate_metrics()

    async def _route(self, frame: Frame, direction: FrameDirection) -> None:
        """Journal and feed any frame but a StartFrame or a CancelFrame (subclasses)."""
        await self._pass(frame, direction)

    # Whether frames are handled in the task that pushed them (Pipecat's direct
    # mode): then the hosted instance's input queue is the only queue a frame
    # crosses, as with the stock service.
    _direct_mode = True

    # Whether to keep an instance built ahead of time for the next recovery
    # (subclasses whose stock services are slow to construct).
    _spare_instance = False

    # The settings frame type the hosted service applies (subclasses).
    _settings_frame: type[ServiceUpdateSettingsFrame] = ServiceUpdateSettingsFrame

    def _is_own_settings(self, frame: Frame) -> bool:
        """Whether ``frame`` is a settings update for this processor (and so for its instance)."""
        return isinstance(frame, self._settings_frame) and frame.service in (None, self)

    async def _apply_settings(self, hosted: Hosted[S], frame: ServiceUpdateSettingsFrame) -> None:
        """Have the live instance apply a settings update, and every fresh one after it."""
        self._applied_settings.append(frame)
        self._standby_changed.set()  # the standby must catch up
        await hosted.service.queue_frame(_settings_for_instance(frame))

    async def _start(self, frame: StartFrame) -> None:
        """Pass the StartFrame on and start the first instance (or recover it)."""
        self._start_frame = frame
        await self.push_frame(frame)
        self._watchdog_task = self.create_task(self._watchdog(), name="watchdog")
        if self._standby_wanted:
            self._standby_task = self.create_task(self._keep_standby(), name="standby")
        first = self._host.first
        first.state = HostedState.LIVE
        first.live_since = now()
        self._live = first
        self._instance_live(first)
        if self._first_failure is not None:
            await self._lost(first, self._first_failure)
            return
        first.swallow.add(id(frame))
        await first.service.queue_frame(frame)

    async def _cancel(self, frame: CancelFrame) -> None:
        """Stop at once: no more recovery; the live instance is cancelled too."""
        self._ended = True
        await self._stop_tasks()
        live = self._live
        await self.push_frame(frame)
        if live is not None:
            live.stopping = True
            live.swallow.add(id(frame))
            await live.service.queue_frame(frame)

    async def _pass(self, frame: Frame, direction: FrameDirection) -> None:
        """Hand a frame the journal need not track to the live instance, or pass it on."""
        live = self._live
        if live is not None and live.state is HostedState.LIVE:
            await live.service.queue_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    # ------------------------------------------------------------------
    # Subclass hooks
    # ------------------------------------------------------------------

    def _prepare_hosted(self, hosted: Hosted[S]) -> None:
        """Hook into a new instance before it is set up: events, configuration, the subclass's hooks."""
        service = hosted.service
        for event in list(getattr(service, "_event_handlers", {})):
            if event in _PROCESSOR_EVENTS or event in _SHELL_EVENTS:
                continue
            if event not in self._event_handlers:
                # Every event the stock service offers can be registered here.
                self._register_event_handler(event)
            service.add_event_handler(event, partial(self._forward_event, hosted, event))
        for call in self._configuration.values():
            call(service)
        self._prepare_instance(hosted)

    async def _forward_event(
        self, hosted: Hosted[S], event: str, service: S, *args: Any, **kwargs: Any
    ) -> None:
        """Raise an instance's event as this processor's, unless the instance has failed."""
        if hosted.speaks_for_owner and not self._ended:
            await self._call_event_handler(event, *args, **kwargs)

    def _prepare_instance(self, hosted: Hosted[S]) -> None:
        """Hook into a new instance before it is set up."""

    def _instance_live(self, hosted: Hosted[S]) -> None:
        """A (first) instance was made live."""

    async def _deliver(self, hosted: Hosted[S], frame: Frame) -> None:
        """Record what a downstream frame from an instance says, then pass it on."""
        await self.push_frame(frame)

    async def _drain(self, hosted: Hosted[S]) -> None:
        """Let a failed instance push out what it had already received (TTS audio)."""

    async def _drain_marker_out(self, hosted: Hosted[S]) -> None:
        """The marker appended by :meth:`_drain` came out: what the instance had received is out."""
        hosted.drained.set()

    async def _before_retire(self, hosted: Hosted[S]) -> None:
        """Last chance to let a failed instance finish something (a running tool) before teardown."""

    async def _from_failed(self, hosted: Hosted[S], frame: Frame) -> None:
        """A frame came out of an instance that failed (dropped unless a subclass needs it)."""

    async def _from_connecting(self, hosted: Hosted[S], frame: Frame) -> None:
        """A frame came out of an instance still being connected (dropped unless a subclass keeps it)."""

    def _before_connect(self, hosted: Hosted[S]) -> None:
        """Configure a fresh instance before it is set up (e.g. to resume a session)."""

    async def _after_lost(self, hosted: Hosted[S]) -> None:
        """The live instance was just cut off (e.g. close what it left open downstream)."""

    async def _after_restore(self, hosted: Hosted[S]) -> None:
        """A fresh instance is live and was fed the replay."""

    def _restore_journal(self, hosted: Hosted[S]) -> None:
        """Tell the journal a fresh instance is live (before the replay is fed)."""
        raise NotImplementedError

    async def _feed(self, hosted: Hosted[S], action: Any) -> None:
        """Feed one journal action to ``hosted``."""
        raise NotImplementedError

    def _action_size(self, action: Any) -> tuple[object | None, int]:
        """What a fed action replays: its unit (utterance, inference) and characters."""
        return None, 0

    async def _abandon(self, reason: str, episode: Episode) -> Abandoned:
        """Recovery gave up: empty the journal and say what was left."""
        raise NotImplementedError

    # ------------------------------------------------------------------
    # Frames out of the hosted instances
    # ------------------------------------------------------------------

    # Whether a failed instance may push out what it had already received
    # (TTS audio); otherwise it is cut off the moment it fails.
    _drains = False

    async def _on_instance_downstream(self, hosted: Hosted[S], frame: Frame) -> None:
        if hosted is self._live:
            # (Never draining: an instance stops being the live one first.)
            swallow = hosted.swallow
            if swallow and id(frame) in swallow:
                swallow.discard(id(frame))
                return
            if isinstance(frame, EndFrame):
                self._ended = True
            await self._deliver(hosted, frame)
            return
        state = hosted.state
        if state is _DRAINING and self._drains:
            # A failed instance pushes out what it had received before it
            # failed, up to a marker the subclass appended.
            if id(frame) == hosted.drain_marker:
                await self._drain_marker_out(hosted)
            else:
                await self._deliver(hosted, frame)
        elif state is _DRAINING or state is _RETIRED:
            await self._from_failed(hosted, frame)
        elif state is _CONNECTING:
            await self._from_connecting(hosted, frame)

    async def _on_instance_upstream(self, hosted: Hosted[S], frame: Frame) -> None:
        if hosted.state is HostedState.CONNECTING:
            if isinstance(frame, ErrorFrame):
                failure = Host.failure_from(hosted, frame)
                if failure is not None:
                    hosted.failures.append(failure)
                else:
                    logger.debug(f"{self}: {hosted} reported while connecting: {frame.error}")
            return
        if hosted is not self._live:
            return
        if isinstance(frame, ErrorFrame) and frame.processor in (None, hosted.service):
            failure = Host.failure_from(hosted, frame)
            if failure is not None:
                if not self._ended:
                    await self._lost(hosted, failure)
                return
            # Not about the connection: pass it on as this processor's, so a
            # ServiceSwitcher judges it by this processor's usability.
            category = frame.category
            if category is not None and category.is_permanent:
                category = ErrorCategory.UNKNOWN
            error = ErrorFrame(
                error=frame.error, exception=frame.exception, processor=self, category=category
            )
            await self.push_frame(error, FrameDirection.UPSTREAM)
            return
        await self.push_frame(frame, FrameDirection.UPSTREAM)

    def _hook_errors(self, hosted: Hosted[S]) -> None:
        """Take connection errors from ``hosted`` before the stock service logs them at ERROR.

        The stock service would log each at ERROR although it is about to be
        recovered (or, once given up, reported by this processor, once).
        """
        service = hosted.service
        push_error_frame = service.push_error_frame

        async def push_error_frame_observed(
            error: ErrorFrame, force_treat_as_permanent: bool = False
        ) -> None:
            if hosted.state in (HostedState.DRAINING, HostedState.RETIRED):
                logger.debug(f"{self}: {service} (retired) reported: {error.error}")
                return
            if Host.failure_from(hosted, error) is not None:
                logger.debug(f"{self}: {service} reported: {error.error}")
                error.processor = error.processor or service
                await self._on_instance_upstream(hosted, error)
                return
            await push_error_frame(error, force_treat_as_permanent=force_treat_as_permanent)

        service.push_error_frame = push_error_frame_observed  # type: ignore[method-assign]

    def _progress(self, hosted: Hosted[S]) -> None:
        """The live instance made progress: the recovery episode is over, its provider is healthy."""
        if hosted is self._live and not hosted.produced:
            hosted.produced = True
            self._episode = None
            self._note_health(hosted.provider, None)

    # ------------------------------------------------------------------
    # Provider health and the fallback chain
    # ------------------------------------------------------------------

    def _note_health(self, provider: int, failure: Failure | None) -> None:
        """Record a success (``failure`` None) or a provider's failure in the health store, in the background.

        Failures of our own making (the application's) say nothing about the
        provider and are not recorded. A store that fails is logged at DEBUG;
        a call never waits on it.
        """
        if failure is not None and failure.category == "application":
            return
        name = self._host.names[provider]
        store = self._health
        if failure is None:
            call = store.record_success(name)
        else:
            call = store.record_failure(name, permanent=failure.is_permanent)

        async def record() -> None:
            try:
                await call
            except Exception as exc:
                logger.debug(f"{self}: health store failed ({type(exc).__name__}: {exc})")

        task = asyncio.get_running_loop().create_task(record())
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def _health_of(self, provider: int) -> Health:
        """A provider's health (CLOSED when the store cannot tell)."""
        try:
            return await self._health.state(self._host.names[provider])
        except Exception as exc:
            logger.debug(f"{self}: health store failed ({type(exc).__name__}: {exc})")
            return Health.CLOSED

    async def _next_provider(self, current: int, excluded: set[int]) -> int | None:
        """The provider to try after ``current`` failed: the next in the chain (wrapping) not excluded
        and not known to be down; failing that, the next not excluded; None when all are excluded."""
        count = len(self._host.names)
        order = [(current + step) % count for step in range(1, count + 1)]
        candidates = [index for index in order if index not in excluded]
        for index in candidates:
            if await self._health_of(index) is not Health.OPEN:
                return index
        return candidates[0] if candidates else None

    async def _switched(self, old: int, new: int, reason: str) -> None:
        """Say the processor moved from provider ``old`` to ``new``."""
        names = self._host.names
        if new > old:
            # Just left a preferred provider: not taken back on its word alone
            # (its breaker may not have opened yet) before the interval.
            self._switch_back_tried_at = now()
        logger.warning(f"{self}: switching from {names[old]} to {names[new]} ({reason})")
        await self._call_event_handler("on_provider_switched", names[old], names[new], reason)

    def _idle(self) -> bool:
        """Whether nothing is in flight: a boundary where the provider may change (subclasses)."""
        return False

    def _connecting_proves_health(self, hosted: Hosted[S]) -> bool:
        """Whether a connected instance proves its provider works (a handshake it answered).

        Not for a service that connects nothing until asked (HTTP): there the
        first real request is the probe, and its outcome is recorded then.
        """
        return True

    async def _look_at_health(self) -> None:
        """While idle, move to a better provider of the chain: away from one the fleet found down,
        or back to a preferred one that is healthy again (``switch_back="boundary"``)."""
        if len(self._host.names) < 2 or self._switching is not None:
            return
        t = now()
        if t - self._health_checked_at < HEALTH_POLL_S:
            return
        live = self._live
        if live is None or live.state is not HostedState.LIVE or not self._idle():
            return  # looked at again at the first tick that is a boundary
        self._health_checked_at = t
        current = live.provider
        if await self._health_of(current) is Health.OPEN:
            # Another processor (another bot of the fleet) found it down.
            target = await self._next_provider(current, {current})
            if target is not None and await self._health_of(target) is not Health.OPEN:
                self._start_switch(target, f"{self._host.names[current]} is down (health store)", probe=False)
                return
        if self._switch_back != "boundary" or current == 0:
            return
        for preferred in range(current):
            state = await self._health_of(preferred)
            probe = state is Health.HALF_OPEN
            if state is Health.OPEN:
                continue
            if not probe and t - self._switch_back_tried_at < SWITCH_BACK_INTERVAL_S:
                # The store does not gate it (its breaker is closed): our own pace.
                continue
            if probe:
                try:
                    won = await self._health.try_acquire_probe(self._host.names[preferred])
                except Exception:
                    won = False
                if not won:
                    continue
            self._switch_back_tried_at = t
            self._start_switch(preferred, f"{self._host.names[preferred]} is healthy again", probe=probe)
            return

    def _start_switch(self, target: int, reason: str, *, probe: bool) -> None:
        self._switching = self.create_task(self._planned_switch(target, reason, probe), name="switch")

    async def _planned_switch(self, target: int, reason: str, probe: bool) -> None:
        """Connect ``target`` (the probe: a handshake, nothing billed) and make it live at a boundary."""
        try:
            hosted, failure = await self._connect_once(None, target)
            if hosted is None:
                assert failure is not None
                logger.info(f"{self}: {self._host.names[target]} not taken ({failure.description})")
                self._note_health(target, failure)
                return
            if probe and self._connecting_proves_health(hosted):
                self._note_health(target, None)
            async with self._feed_lock:
                live = self._live
                if (
                    self._ended
                    or live is None
                    or live.state is not HostedState.LIVE
                    or self.state is not State.LIVE
                    or not self._idle()
                ):
                    # Not at a boundary any more: try again later.
                    self._host.retire(hosted)
                    return
                old = live.provider
                self._live = None
                self._journal.connection_lost(now=now())
                live.state = HostedState.DRAINING
                self._chain_at = target
                hosted.state = HostedState.LIVE
                hosted.live_since = now()
                self._live = hosted
                self._restore_journal(hosted)
            self._host.retire(live, abort=False)
            await self._switched(old, target, reason)
            await self._feed_pending()
        except Exception:
            logger.exception(f"{self}: switching providers failed")
        finally:
            self._switching = None

    # ------------------------------------------------------------------
    # Feeding
    # ------------------------------------------------------------------

    async def _feed_pending(self) -> tuple[int, int]:
        """Feed the live instance whatever the journal says is due.

        Returns:
            How many units (utterances, inferences) and characters were fed.
        """
        units: set[int] = set()
        chars = 0
        async with self._feed_lock:
            live = self._live
            while live is not None and live is self._live and self.state is State.LIVE:
                actions = self._journal.to_feed()
                if not actions:
                    break
                for action in actions:
                    if live is not self._live:
                        break
                    unit, size = self._action_size(action)
                    if unit is not None and size:
                        units.add(id(unit))
                        chars += size
                    await self._feed(live, action)
        return len(units), chars

    # ------------------------------------------------------------------
    # Failure and recovery
    # ------------------------------------------------------------------

    async def _lost(self, hosted: Hosted[S], failure: Failure) -> None:
        """The live instance failed: stop feeding it, drain it, and start recovering."""
        if hosted is not self._live:
            return
        # Decide synchronously, before any await lets the failed instance emit.
        self._live = None
        hosted.state = HostedState.DRAINING
        self._draining = hosted
        self._journal.connection_lost(now=now())
        self._lost_at = now()
        self._note_health(hosted.provider, failure)
        logger.warning(f"{self}: lost {hosted} ({failure.description}); recovering")
        self.create_task(self._drain_then_retire(hosted), name="drain")
        await self._after_lost(hosted)
        if self._ended:
            return
        self._recovery_task = self.create_task(self._recover(failure), name="recovery")
        await self._call_event_handler("on_connection_lost", failure)
        # The failed instance's own events are cut off from here on; the stock
        # service would have said it was disconnected, so the shell does.
        await self._call_event_handler("on_disconnected")

    async def _drain_then_retire(self, hosted: Hosted[S]) -> None:
        try:
            await self._drain(hosted)
        except Exception as exc:
            logger.debug(f"{self}: draining {hosted.service} ended early ({type(exc).__name__})")
        finally:
            hosted.drained.set()
            hosted.drain_done.set()
        try:
            await self._before_retire(hosted)
        finally:
            self._host.retire(hosted)

    async def _drained(self) -> None:
        """Wait until the last failed instance is drained (its evidence counts for the replay)."""
        draining = self._draining
        if draining is not None:
            await draining.drain_done.wait()

    async def _recover(self, failure: Failure | None) -> None:
        # Failed connection attempts on the current provider in this episode
        # (the drop itself is not one: a dropped socket is usually just that;
        # but an instance that connected and failed again before producing
        # anything is: an HTTP service "connects" without asking anything).
        failed_here = 0
        if self._episode is None:
            self._episode = Episode(self._retry, started=now(), rng=self._rng)
        elif self._episode.provider == self._chain_at:
            failed_here = self._episode.failed_here + 1
        episode = self._episode
        chain = len(self._host.names) > 1
        # Providers of the chain out of this recovery (failed for good).
        excluded: set[int] = set()
        # Providers tried since the last wait: the first attempt on a provider
        # just switched to is made at once, but once the whole chain failed
        # in turn, the policy's waits apply (no ping-pong through an outage
        # of every provider, spending the attempts in a second).
        tried = {self._chain_at}
        switched = False
        try:
            reason = episode.record(failure) if failure is not None else None
            while True:
                if reason is not None and chain and failure_permanent(episode):
                    # This provider is out (a bad key, an unknown voice); the others may not be.
                    excluded.add(self._chain_at)
                    reason = None
                if (
                    reason is None
                    and chain
                    and (
                        self._chain_at in excluded
                        or failed_here >= self._switch_after
                        or await self._health_of(self._chain_at) is Health.OPEN
                    )
                ):
                    target = await self._next_provider(self._chain_at, excluded)
                    if target is None:
                        reason = "every provider of the chain failed"
                    elif target != self._chain_at:
                        old, self._chain_at = self._chain_at, target
                        failed_here = 0
                        switched = target not in tried
                        tried.add(target)
                        last = episode.failures[-1].description if episode.failures else "down"
                        await self._switched(old, target, last)
                if reason is not None:
                    break
                wait = episode.next_wait(now())
                if wait is None:
                    over = episode.attempts >= self._retry.attempts
                    reason = "attempts exhausted" if over else "recovery deadline passed"
                    break
                if wait > 0 and not switched:
                    # (A provider of the chain just switched to is tried at once.)
                    await asyncio.sleep(wait)
                    tried = {self._chain_at}
                switched = False
                episode.attempts += 1
                hosted = self._take_standby(self._chain_at)
                from_standby = hosted is not None
                attempt_failure = None
                if hosted is None:
                    hosted, attempt_failure = await self._connect_once(episode.deadline(), self._chain_at)
                if hosted is not None:
                    episode.provider, episode.failed_here = self._chain_at, failed_here
                    if from_standby and "on_connected" in self._event_handlers:
                        # Its own was kept quiet when it connected as the standby.
                        await self._call_event_handler("on_connected")
                    await self._go_live(hosted, episode, failure)
                    return
                assert attempt_failure is not None
                logger.warning(
                    f"{self}: connection attempt {episode.attempts} failed ({attempt_failure.description})"
                )
                self._note_health(self._chain_at, attempt_failure)
                failed_here += 1
                reason = episode.record(attempt_failure)
        except Exception as exc:
            # A bug here must not leave the processor recovering forever with
            # an EndFrame stuck behind it: give up, once, and say so, and tear
            # down whatever the failed attempt had connected.
            logger.exception(f"{self}: recovery failed unexpectedly")
            reason = f"unexpected {type(exc).__name__} in recovery"
            for hosted in list(self._host.all):
                if hosted.state is HostedState.CONNECTING:
                    self._host.retire(hosted)
        await self._give_up(reason, episode)

    async def _connect_once(
        self, deadline: float | None = None, provider: int | None = None, *, standby: bool = False
    ) -> tuple[Hosted[S] | None, Failure | None]:
        """Make, set up and start a fresh instance of ``provider`` (the current one when None),
        all within ``attempt_timeout`` and ``deadline`` (as a warm standby: its events kept quiet)."""
        assert self._setup_data is not None and self._start_frame is not None
        if provider is None:
            provider = self._chain_at
        try:
            hosted = self._host.make(provider)
            hosted.standby = standby
        except (TypeError, ReusedInstance) as exc:
            return None, Failure(Verdict.PERMANENT, "application", f"factory: {exc}")
        except Exception as exc:
            logger.opt(exception=exc).debug(f"{self}: the factory of {self._host.names[provider]} raised")
            return None, Failure(Verdict.TRANSIENT, "application", f"factory raised {type(exc).__name__}")
        limit = self._retry.attempt_timeout
        if deadline is not None:
            limit = min(limit, deadline - now()) if limit is not None else deadline - now()
        loop = asyncio.get_running_loop()
        failure: Failure | None
        try:
            async with asyncio.timeout_at(None if limit is None else loop.time() + max(0.0, limit)):
                self._before_connect(hosted)
                unapplied = await self._preconfigure(hosted)
                failure = await self._host.set_up(hosted, self._setup_data, None)
                if failure is None:
                    failure = await self._host.start(hosted, self._start_frame, None)
                if failure is None:
                    failure = await self._set_up_settings(hosted, unapplied, None)
                if failure is None:
                    failure = await self._connected(hosted)
        except TimeoutError:
            assert limit is not None
            failure = Failure(Verdict.TRANSIENT, "connectivity", f"connecting took more than {limit:.3g}s")
        if failure is not None:
            self._host.retire(hosted)
            return None, failure
        return hosted, None

    async def _preconfigure(self, hosted: Hosted[S]) -> list[ServiceUpdateSettingsFrame]:
        """Give a fresh instance the settings the live one had applied, before it connects.

        The instance applies them as it would a settings update, except that a
        reconnect it would make for them (a new voice, say) is skipped: it has
        not connected yet, and connects once, with the new settings, when it is
        set up. No second handshake during a recovery.

        Returns:
            The updates it could not apply this way (its settings code needed a
            connection); they are applied once it is connected instead.
        """
        frames = _merged(self._settings_by_provider.get(hosted.provider, []))
        service: Any = hosted.service
        update = getattr(service, "_update_settings", None)
        settings = getattr(service, "_settings", None)
        if not frames or update is None or settings is None:
            return frames

        async def nothing() -> None:
            """No connection to make or drop yet."""

        service._connect = service._disconnect = nothing
        applied = 0
        try:
            for frame in frames:
                delta = frame.delta
                if delta is None:
                    delta = type(settings).from_mapping(frame.settings)
                await update(delta)
                applied += 1
        except Exception as exc:
            logger.debug(f"{self}: settings applied after connecting instead ({type(exc).__name__}: {exc})")
        finally:
            del service._connect, service._disconnect
        return frames[applied:]

    async def _set_up_settings(
        self, hosted: Hosted[S], frames: list[ServiceUpdateSettingsFrame], timeout: float | None
    ) -> Failure | None:
        """Give a connected fresh instance the settings :meth:`_preconfigure` could not, and wait.

        A service that reconnects on a settings change does it here, before
        the instance goes live, so that reconnect is never taken for a drop.
        """
        if not frames:
            return None
        applied = asyncio.Event()
        last = frames[-1]

        async def done(processor: FrameProcessor, frame: Frame, direction: FrameDirection) -> None:
            if frame is last:
                applied.set()

        for frame in frames:
            await hosted.service.queue_frame(frame, FrameDirection.DOWNSTREAM, done)
        try:
            async with asyncio.timeout(timeout):
                await applied.wait()
        except TimeoutError:
            return Failure(
                Verdict.TRANSIENT, "connectivity", f"applying settings took more than {timeout:g}s"
            )
        return self._host.connection_failure(hosted)

    async def _connected(self, hosted: Hosted[S]) -> Failure | None:
        """A fresh instance is set up and started (before it is made live); a failure fails the attempt."""
        return None

    async def _go_live(self, hosted: Hosted[S], episode: Episode, failure: Failure | None) -> None:
        if self._ended:
            self._host.retire(hosted)
            return
        await self._drained()
        hosted.state = HostedState.LIVE
        hosted.live_since = now()
        self._live = hosted
        self._restore_journal(hosted)
        hosted.going_live = True
        try:
            units, chars = await self._feed_pending()
        finally:
            hosted.going_live = False
        # Live again: a standby taken over (or missing) is replaced now, not at the next check.
        self._standby_changed.set()
        await self._after_restore(hosted)
        downtime = now() - (self._lost_at or now())
        report = self._recovery_report(failure, episode.attempts, downtime, units, chars)
        logger.info(
            f"{self}: recovered on attempt {episode.attempts} after {downtime:.3f}s; "
            f"replayed {self._replay_summary(report)}"
        )
        await self._call_event_handler("on_connection_recovered", report)

    def _recovery_report(
        self, failure: Failure | None, attempts: int, downtime: float, units: int, chars: int
    ) -> RecoveryReport:
        """What one recovery did, for ``on_connection_recovered`` (a subclass may add its own figures)."""
        return RecoveryReport(failure, attempts, downtime, units, chars)

    def _replay_summary(self, report: RecoveryReport) -> str:
        """What was replayed, for the log."""
        return f"{report.replayed_chars} characters in {report.replayed_utterances} unit(s)"

    async def _give_up(self, reason: str, episode: Episode) -> None:
        await self._drained()
        abandoned = await self._abandon(reason, episode)
        self._episode = None
        error = ReplayFailed(
            unspoken=abandoned.unspoken, attempts=episode.attempts, reason=reason, lost=abandoned.lost
        )
        last = episode.failures[-1] if episode.failures else None
        try:
            category = ErrorCategory(last.category) if last is not None else ErrorCategory.CONNECTIVITY
        except ValueError:
            category = ErrorCategory.UNKNOWN
        detail = f"; last failure: {last.description}" if last is not None else ""
        logger.debug(f"{self}: could not deliver {list(abandoned.unspoken)}")
        for frame in abandoned.closing:
            await self.push_frame(frame)
        await self.push_error_frame(
            ErrorFrame(error=f"{self} {error}{detail}", exception=error, category=category),
            force_treat_as_permanent=True,
        )
        for frame in abandoned.passing:
            if isinstance(frame, EndFrame):
                self._ended = True
            await self.push_frame(frame)
        await self._call_event_handler("on_connection_given_up", error)

    async def _watchdog(self) -> None:
        """Declare the live instance dead when it owes output and has gone quiet."""
        while True:
            await asyncio.sleep(self._watchdog_tick)
            hosted = self._live
            if hosted is None or hosted.state is not HostedState.LIVE:
                continue
            t = now()
            reason = self._journal.overdue(now=t)
            if reason is not None:
                await self._lost(hosted, Failure(Verdict.TRANSIENT, "connectivity", reason))
                continue
            await self._look_at_health()
            if (
                self._episode is not None
                and hosted.live_since is not None
                and t - hosted.live_since > STABLE_AFTER_S
            ):
                # Up long enough without failing: the recovery is over.
                self._episode = None

    async def _stop_tasks(self) -> None:
        for task in (self._watchdog_task, self._recovery_task, self._switching, self._standby_task):
            if task is not None and task is not asyncio.current_task():
                await self.cancel_task(task)
        self._watchdog_task = self._recovery_task = self._switching = self._standby_task = None
        standby, self._standby = self._standby, None
        if standby is not None:
            self._host.retire(standby)

    # ------------------------------------------------------------------
    # The warm standby
    # ------------------------------------------------------------------

    def _standby_usable(self, hosted: Hosted[S], provider: int) -> bool:
        """Whether a standby can take over for ``provider`` now: connected, same provider, same settings."""
        return (
            hosted.state is HostedState.CONNECTING
            and hosted.provider == provider
            and not hosted.failures
            and socket_open(hosted.service) is not False
            and hosted.settings_seen == len(self._settings_by_provider.get(provider, []))
        )

    def _take_standby(self, provider: int) -> Hosted[S] | None:
        """The standby, if it can take over for ``provider`` (a new one is connected in the background)."""
        standby = self._standby
        if standby is None:
            return None
        self._standby = None
        self._standby_changed.set()
        if not self._standby_usable(standby, provider):
            logger.debug(
                f"{self}: the standby {standby} cannot take over ({standby.state.value}, provider "
                f"{standby.provider}, {len(standby.failures)} failures, socket open: "
                f"{socket_open(standby.service)}, settings {standby.settings_seen}/"
                f"{len(self._settings_by_provider.get(provider, []))}); connecting a fresh instance"
            )
            self._host.retire(standby)
            return None
        self.standbys_used += 1
        standby.standby = False
        logger.debug(f"{self}: taking over on the standby {standby}")
        return standby

    async def _keep_standby(self) -> None:
        """Keep one instance of the provider in use connected and healthy, replacing it when it dies,
        falls behind a settings change or the chain moves; its own keep-alive keeps it open."""
        wait = 0.0
        while not self._ended:
            # Cleared before looking, so a change while connecting is seen at once.
            self._standby_changed.clear()
            standby = self._standby
            if standby is not None and not self._standby_usable(standby, self._chain_at):
                logger.debug(f"{self}: the standby {standby} died or fell behind; replacing it")
                self._standby = None
                self._host.retire(standby)
                standby = None
            if (
                standby is None
                and self._live is not None
                and self._live.state is HostedState.LIVE
                and self.state is State.LIVE
                and await self._health_of(self._chain_at) is not Health.OPEN
            ):
                provider = self._chain_at
                seen = len(self._settings_by_provider.get(provider, []))
                hosted, failure = await self._connect_once(None, provider, standby=True)
                if hosted is not None:
                    hosted.settings_seen = seen
                    if self._ended or provider != self._chain_at:
                        self._host.retire(hosted)
                    else:
                        self._standby = hosted
                        wait = 0.0
                else:
                    assert failure is not None
                    logger.debug(f"{self}: connecting a standby failed ({failure.description})")
                    wait = min(STANDBY_RETRY_MAX_S, max(STANDBY_RETRY_S, wait * 2))
            try:
                await asyncio.wait_for(self._standby_changed.wait(), wait or STANDBY_CHECK_S)
            except TimeoutError:
                pass


def failure_permanent(episode: Episode) -> bool:
    """Whether the episode's last failure was permanent (which ends it for one provider only)."""
    return bool(episode.failures) and episode.failures[-1].is_permanent


def _settings_for_instance(frame: ServiceUpdateSettingsFrame) -> ServiceUpdateSettingsFrame:
    """A copy of a settings update (addressed to the shell or to nobody) for the hosted instance."""
    # The instance converts some fields in place (a language to its own code).
    delta = frame.delta.copy() if frame.delta is not None else None
    return type(frame)(settings=dict(frame.settings), delta=delta)


def _merged(frames: Sequence[ServiceUpdateSettingsFrame]) -> list[ServiceUpdateSettingsFrame]:
    """Settings updates for a fresh instance, consecutive deltas of one type merged into one.

    A service that reconnects on each change then reconnects once, not once
    per update the live instance went through.
    """
    merged: list[ServiceUpdateSettingsFrame] = []
    for frame in frames:
        copy = _settings_for_instance(frame)
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and previous.delta is not None
            and copy.delta is not None
            and type(previous.delta) is type(copy.delta)
            and not previous.settings
            and not copy.settings
        ):
            delta = previous.delta.copy()
            delta.apply_update(copy.delta)
            merged[-1] = type(copy)(delta=delta)
        else:
            merged.append(copy)
    return merged
