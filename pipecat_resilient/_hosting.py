"""Hosting one stock Pipecat service instance at a time inside a processor.

Shared by the resilient shells (:mod:`pipecat_resilient.tts`,
:mod:`pipecat_resilient.llm`): make an instance with the user's factory,
take reconnection over from it, link it between two ports that call back
into the shell, connect it (set-up plus ``StartFrame``) within a deadline,
retire it so nothing it emits later gets through, and retry connecting under
a :class:`~pipecat_resilient.policy.RetryPolicy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any, Generic, TypeVar

from loguru import logger
from pipecat.frames.frames import ErrorFrame, Frame, StartFrame
from pipecat.processors.frame_processor import (
    FrameCallback,
    FrameDirection,
    FrameProcessor,
    FrameProcessorSetup,
)
from pipecat.utils.errors import ErrorCategory
from websockets.protocol import State as SocketState

from pipecat_resilient.failures import Failure, Verdict, classify_close, classify_exception
from pipecat_resilient.policy import RetryPolicy

__all__ = ["Episode", "Host", "Hosted", "HostedState", "Port", "ReusedInstance"]

S = TypeVar("S", bound=FrameProcessor)

# How long a retired instance may take to tear itself down in the background.
RETIRE_TIMEOUT_S = 10.0

# A replacement that has been up this long without failing ends the recovery
# episode, even if it had nothing to say (Pipecat's quick-failure window).
STABLE_AFTER_S = 5.0


class ReusedInstance(Exception):
    """The factory returned an instance it had returned before (a cache, a shared object)."""


class Port(FrameProcessor):
    """Where a hosted instance's frames come out: straight into a callback.

    Linked on each side of the instance in place of its neighbours. It
    overrides ``queue_frame`` so a frame costs one call, with no queue, task
    or observer notification of its own (the owner's push is the one observed).
    """

    def __init__(self, receive: Callable[[Frame], Awaitable[None]], *, name: str) -> None:
        """Create a port that hands every frame to ``receive``."""
        super().__init__(name=name, enable_direct_mode=True)
        self._receive = receive

    async def queue_frame(
        self,
        frame: Frame,
        direction: FrameDirection = FrameDirection.DOWNSTREAM,
        callback: FrameCallback | None = None,
    ) -> None:
        """Hand the frame over at once."""
        await self._receive(frame)


# Read on every frame: bound once (an Enum class attribute lookup is slow).
_DOWNSTREAM = FrameDirection.DOWNSTREAM

# The private method every FrameProcessor pushes through (name-mangled).
_INTERNAL_PUSH = "_FrameProcessor__internal_push_frame"


def _push_straight(
    service: FrameProcessor,
    downstream: Callable[[Frame], Awaitable[None]],
    upstream: Callable[[Frame], Awaitable[None]],
) -> None:
    """Make the instance's pushes reach the shell in one call: no extra hop per frame.

    A stock ``push_frame`` does the service's own work, then hands the frame
    to its neighbour through ``FrameProcessor``'s internal push, which reads
    the clock, formats a trace line (the frame and both processors as text,
    even with tracing off) and notifies observers. A hosted instance has no
    observers (the shell's push is the one observed) and its neighbours are
    the shell's ports, so its internal push is replaced by a direct call to
    the port's callback, on this instance only. The ports stay linked, for
    code that looks at the instance's neighbours. Skipped, harmlessly, if
    Pipecat no longer has that method.
    """
    if not callable(getattr(FrameProcessor, _INTERNAL_PUSH, None)):
        return

    async def push(frame: Frame, direction: FrameDirection) -> None:
        try:
            if direction is _DOWNSTREAM:
                await downstream(frame)
            else:
                await upstream(frame)
        except Exception as exc:
            # What the stock internal push does with a failing neighbour.
            await service.push_error(
                error_msg=f"Uncaught exception: {exc}", exception=exc, category=ErrorCategory.UNKNOWN
            )

    setattr(service, _INTERNAL_PUSH, push)


class HostedState(Enum):
    """Where one hosted instance stands."""

    CONNECTING = "connecting"
    LIVE = "live"
    DRAINING = "draining"  # failed; still pushing out what it had already received
    RETIRED = "retired"


@dataclass(eq=False)
class Hosted(Generic[S]):
    """One stock service instance and what the shell knows about it."""

    service: S
    # Which provider of the fallback chain it is (0: the primary).
    provider: int = 0
    # How many of its provider's settings updates it was built with (a warm
    # standby that missed one cannot take over).
    settings_seen: int = 0
    # A warm standby, until it takes over: its events are not the shell's.
    standby: bool = False
    # What logs call it: the stock instance's own name, before the shell gave
    # it its own (so metrics and metadata keep one name across instances).
    label: str = ""
    state: HostedState = HostedState.CONNECTING
    inlet: Port | None = None
    outlet: Port | None = None
    # Failures reported while connecting.
    failures: list[Failure] = field(default_factory=list)
    # Frames to drop when they come back out (fed only to drive the instance).
    swallow: set[int] = field(default_factory=set)
    # What each fed frame belongs to, until the instance processes it.
    fed: dict[int, Any] = field(default_factory=dict)
    # What the frame being processed belongs to.
    current: Any = None
    # Context ids of a replay, mapped to the context already open downstream.
    rewrite: dict[str, str] = field(default_factory=dict)
    stopping: bool = False
    live_since: float | None = None
    produced: bool = False  # made progress (audio, text) since going live
    # Provider contexts that were handed text through this instance (its own
    # word frames for them are replaced by the shell's).
    tracked_contexts: set[str] = field(default_factory=set)
    # Contexts the provider reported an error for (their stop is not an end).
    failed_contexts: set[str] = field(default_factory=set)
    failed_all: bool = False
    # Context commits (LLMAssistantPushAggregationFrame) held until the words
    # they commit have been told to the context.
    held_commits: list[Frame] = field(default_factory=list)
    # Set once a failed instance has pushed out what it had received.
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # its received audio is out
    drain_done: asyncio.Event = field(default_factory=asyncio.Event)  # and its evidence is counted
    drain_marker: int | None = None
    drain_counted: bool = False  # what the drain voiced was told to the context (once)
    # Being fed its replay as it goes live (nothing else handed to it yet).
    going_live: bool = False
    # Sessions (speech-to-speech): set once the session takes input, or fails.
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    resumes: bool = False
    asked_to_answer: bool = False  # seeded so that the model answers at once

    def __str__(self) -> str:
        return self.label or f"{self.service}"

    @property
    def speaks_for_owner(self) -> bool:
        """Whether its events are the shell's: live, or being connected (not as a standby)."""
        return self.state is HostedState.LIVE or (self.state is HostedState.CONNECTING and not self.standby)


def _websocket_of(service: object) -> object | None:
    """The websocket a stock service talks over: its own (Pipecat's websocket
    services) or its SDK session's (google-genai's Live session)."""
    websocket = getattr(service, "_websocket", None)
    if websocket is None:
        websocket = getattr(getattr(service, "_session", None), "_ws", None)
    return websocket


def socket_open(service: object) -> bool | None:
    """Whether a websocket service's socket is open; None for other services."""
    if not hasattr(service, "_websocket"):
        return None
    websocket = service._websocket
    return websocket is not None and websocket.state is SocketState.OPEN


def socket_close(service: object) -> tuple[int | None, str]:
    """The close code and reason of a websocket service's socket, if it closed."""
    websocket = getattr(service, "_websocket", None)
    if websocket is None:
        return None, ""
    return getattr(websocket, "close_code", None), getattr(websocket, "close_reason", None) or ""


class Host(Generic[S]):
    """Makes, connects and retires instances of one stock service.

    Args:
        owner: The resilient processor hosting the instances.
        factory: Zero-argument callable returning a fresh service instance.
        expected: The class every instance must be an instance of.
        downstream: Called with ``(hosted, frame)`` for each frame an instance
            pushes downstream.
        upstream: Called with ``(hosted, frame)`` for each frame an instance
            pushes upstream.
        prepare: Called with each new instance before it is set up, to hook
            into it.
        fallbacks: Factories of the providers to fall back on, in order of
            preference (validated like ``factory``); provider 0 is
            ``factory``, provider ``i`` is ``fallbacks[i - 1]``.
        spare: Keep an instance of each provider built ahead of time for
            the next :meth:`make` of it (the one built at construction to
            check its factory, then one built by :meth:`replenish`), for
            services whose construction is slow: a recovery, or a switch to a
            fallback, then does not wait for the factory.
    """

    def __init__(
        self,
        owner: FrameProcessor,
        factory: Callable[[], S],
        expected: type[S],
        *,
        downstream: Callable[[Hosted[S], Frame], Awaitable[None]],
        upstream: Callable[[Hosted[S], Frame], Awaitable[None]],
        prepare: Callable[[Hosted[S]], None],
        spare: bool = False,
        fallbacks: Sequence[Callable[[], S]] = (),
    ) -> None:
        """Validate ``factory`` and every fallback by calling them; raises on bad input."""
        if isinstance(fallbacks, (str, bytes)) or not isinstance(fallbacks, Sequence):
            raise TypeError(
                f"{type(owner).__name__}: fallbacks must be a list of factories, "
                f"got {type(fallbacks).__name__}"
            )
        for index, candidate in enumerate([factory, *fallbacks]):
            if not callable(candidate):
                what = "factory" if index == 0 else f"fallbacks[{index - 1}]"
                raise TypeError(
                    f"{type(owner).__name__}: {what} must be a zero-argument callable returning a new "
                    f"{expected.__name__}, got {type(candidate).__name__}"
                )
        self._owner = owner
        self.factories: list[Callable[[], S]] = [factory, *fallbacks]
        self._expected = expected
        self._downstream = downstream
        self._upstream = upstream
        self._prepare = prepare
        self._retiring: set[asyncio.Task[None]] = set()
        self._made = 0
        # Every instance the factory ever returned: a dead one handed back
        # again could never be connected afresh.
        self._seen: weakref.WeakSet[S] = weakref.WeakSet()
        self.all: list[Hosted[S]] = []
        # Build the first instance now, so a factory that raises, returns the
        # wrong thing or returns the same object twice fails at construction
        # rather than in the middle of a call.
        built: list[S] = []
        self.names: list[str] = []
        # The class each provider's factory builds.
        self.classes: list[type] = []
        for index in range(len(self.factories)):
            first = self._call_factory(index, construction=True)
            try:
                second: S = self._call_factory(index, construction=True)
            except ReusedInstance:
                what = "factory" if index == 0 else f"fallbacks[{index - 1}]"
                raise ValueError(
                    f"{type(owner).__name__}: {what} returned the same {type(first).__name__} twice; "
                    "it must build a new instance on every call (e.g. `lambda: Service(...)`)"
                ) from None
            built.append(second)
            self.classes.append(type(first))
            name = type(first).__name__
            if name in self.names:
                name = f"{name}#{index + 1}"
            self.names.append(name)
            if index == 0:
                primary = first
        self._keep_spare = spare
        # Instances built ahead of time, by provider, each for its next make().
        self._spares: dict[int, S] = dict(enumerate(built)) if spare else {}
        self._replenishing: set[int] = set()
        self.first: Hosted[S] = self._host(primary)

    # -- making ----------------------------------------------------------------

    def _call_factory(self, provider: int = 0, *, construction: bool = False) -> S:
        try:
            service = self.factories[provider]()
        except Exception as exc:
            if construction:
                what = "service factory" if provider == 0 else f"fallback factory {provider - 1}"
                raise ValueError(
                    f"{type(self._owner).__name__}: the {what} raised {type(exc).__name__}: {exc}"
                ) from exc
            raise
        return self._checked(service)

    def _checked(self, service: S) -> S:
        if not isinstance(service, self._expected):
            raise TypeError(
                f"{type(self._owner).__name__}: factory must return a {self._expected.__name__}, "
                f"got {type(service).__name__}"
            )
        if service in self._seen:
            raise ReusedInstance(
                f"the factory returned a {type(service).__name__} it had returned before; it must build "
                "a new instance on every call (e.g. `lambda: Service(...)`)"
            )
        self._seen.add(service)
        return service

    def make(self, provider: int = 0) -> Hosted[S]:
        """Build a fresh instance of ``provider``, or take its spare (raises what the factory raises)."""
        service = self._spares.pop(provider, None)
        hosted = self._host(service if service is not None else self._call_factory(provider), provider)
        return hosted

    async def replenish(self, provider: int = 0) -> None:
        """Build the spare for the next :meth:`make` of ``provider``, if spares are kept and it has none.

        The factory runs in a worker thread, so that a slow constructor (an SDK
        loading its CA bundle) does not hold up the event loop.
        """
        if not self._keep_spare or provider in self._spares or provider in self._replenishing:
            return
        self._replenishing.add(provider)
        try:
            service = await asyncio.to_thread(self.factories[provider])
            if provider not in self._spares:
                self._spares[provider] = self._checked(service)
        except Exception as exc:
            # The next make() calls the factory itself, and reports it there.
            logger.debug(f"{self._owner}: building a spare instance failed ({type(exc).__name__}: {exc})")
        finally:
            self._replenishing.discard(provider)

    @property
    def latest(self) -> Hosted[S]:
        """The most recently made instance still hosted (the first one before any other)."""
        return self.all[-1] if self.all else self.first

    def _host(self, service: S, provider: int = 0) -> Hosted[S]:
        self._made += 1
        hosted: Hosted[S] = Hosted(
            service, label=f"{type(service).__name__} (instance {self._made})", provider=provider
        )
        # Recovery is ours: a stock websocket service that reconnects on its
        # own hides the drop and never resends what was in flight.
        if hasattr(service, "_reconnect_on_error"):
            service._reconnect_on_error = False
        # One name for every instance: the shell's. Metrics frames, service
        # metadata (which a ServiceSwitcher matches by name) and logs then
        # name the processor in the pipeline, before and after any reconnect.
        service._name = self._owner.name
        sync_metrics_name = getattr(service, "_sync_model_name_to_metrics", None)
        if callable(sync_metrics_name):
            sync_metrics_name()
        name = f"{self._owner}::{hosted.label}"
        hosted.inlet = Port(partial(self._upstream, hosted), name=f"{name}::inlet")
        hosted.outlet = Port(partial(self._downstream, hosted), name=f"{name}::outlet")
        hosted.inlet.link(service)
        service.link(hosted.outlet)
        _push_straight(service, partial(self._downstream, hosted), partial(self._upstream, hosted))
        self._prepare(hosted)
        self.all.append(hosted)
        return hosted

    # -- connecting ------------------------------------------------------------

    async def set_up(
        self, hosted: Hosted[S], setup: FrameProcessorSetup, timeout: float | None
    ) -> Failure | None:
        """Set ``hosted`` up (a websocket service connects here).

        Returns:
            The failure, if setting up failed or reported a connection error.
        """
        # The hosted instance stays out of the pipeline's observers: they see
        # its frames once, pushed by the owner, as if the owner were the service.
        setup = dataclasses.replace(setup, observer=None)
        try:
            async with asyncio.timeout(timeout):
                await hosted.service.setup(setup)
        except TimeoutError:
            return Failure(Verdict.TRANSIENT, "connectivity", f"setting up took more than {timeout:g}s")
        except Exception as exc:
            return classify_exception(exc) or Failure(
                Verdict.SUSPECT, "unknown", f"set-up raised {type(exc).__name__}"
            )
        return self.connection_failure(hosted)

    async def start(self, hosted: Hosted[S], frame: StartFrame, timeout: float | None) -> Failure | None:
        """Give ``hosted`` the ``StartFrame`` and wait until it has processed it.

        Returns:
            The failure, if starting reported a connection error.
        """
        started = asyncio.Event()

        async def done(processor: FrameProcessor, frame: Frame, direction: FrameDirection) -> None:
            started.set()

        hosted.swallow.add(id(frame))
        await hosted.service.queue_frame(frame, FrameDirection.DOWNSTREAM, done)
        try:
            async with asyncio.timeout(timeout):
                await started.wait()
        except TimeoutError:
            return Failure(Verdict.TRANSIENT, "connectivity", f"starting took more than {timeout:g}s")
        return self.connection_failure(hosted)

    @staticmethod
    def connection_failure(hosted: Hosted[S]) -> Failure | None:
        if hosted.failures:
            # The most telling failure: a permanent one wins.
            return next((f for f in hosted.failures if f.is_permanent), hosted.failures[-1])
        if socket_open(hosted.service) is False:
            return Failure(Verdict.TRANSIENT, "connectivity", "no connection after setting up")
        return None

    # -- retiring --------------------------------------------------------------

    def retire(self, hosted: Hosted[S], *, abort: bool = True) -> None:
        """Cut ``hosted`` off (nothing it emits gets through) and tear it down in the background.

        Args:
            hosted: The instance.
            abort: Drop its socket at once instead of closing it politely: a
                failed connection has nothing to say, and a half-open one
                would hold the teardown for the service's close timeouts.
        """
        if hosted.state is HostedState.RETIRED:
            return
        hosted.state = HostedState.RETIRED
        if abort:
            transport = getattr(_websocket_of(hosted.service), "transport", None)
            if transport is not None:
                transport.abort()
            if getattr(hosted.service, "_websocket", None) is not None:
                # Gone: its teardown must not try a closing handshake on it
                # (and log an ERROR when that fails).
                setattr(hosted.service, "_websocket", None)  # noqa: B010 (a stock service's own)
        task = asyncio.get_running_loop().create_task(self._tear_down(hosted))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _tear_down(self, hosted: Hosted[S]) -> None:
        try:
            async with asyncio.timeout(RETIRE_TIMEOUT_S):
                await hosted.service.cleanup()
        except Exception as exc:
            logger.debug(f"{self._owner}: tearing down {hosted} ended with {type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(ValueError):
                self.all.remove(hosted)

    async def close(self) -> None:
        """Tear down every instance still hosted and wait for the ones retiring."""
        for hosted in list(self.all):
            if hosted.state is not HostedState.RETIRED:
                hosted.state = HostedState.RETIRED
                await self._tear_down(hosted)
        if self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)

    @staticmethod
    def failure_from(hosted: Hosted[S], error: ErrorFrame) -> Failure | None:
        """Whether an error frame from ``hosted`` reports a connection failure.

        Args:
            hosted: The instance that pushed it.
            error: The error frame.

        Returns:
            The classified failure, or None when the error is not about the
            connection (the shell passes those on).
        """
        failure = classify_exception(error.exception)
        if failure is not None:
            return failure
        category = error.category.value if error.category is not None else "unknown"
        if error.category is not None and error.category.is_permanent:
            return Failure(Verdict.PERMANENT, category, error.error[:200])
        if socket_open(hosted.service) is False:
            # Pipecat reports a clean close ("connection closed by server")
            # with no exception; the socket tells the code.
            code, reason = socket_close(hosted.service)
            return classify_close(code, reason)
        if category in ("connectivity", "server", "rate_limit"):
            return Failure(Verdict.TRANSIENT, category, error.error[:200])
        if not hosted.service.is_usable:
            return Failure(Verdict.TRANSIENT, category, "the service wrote itself off")
        return None


@dataclass
class Episode:
    """One recovery: from the first drop until a replacement proves itself.

    A replacement that dies before it made progress counts against the same
    budget, so a provider that accepts connections and drops them at once
    cannot loop forever.
    """

    policy: RetryPolicy
    started: float
    attempts: int = 0
    failures: list[Failure] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)
    # The provider of the chain the last replacement was of, and the failed
    # attempts on it so far (its dying before progress is one more).
    provider: int = 0
    failed_here: int = 0

    def deadline(self) -> float | None:
        """When the recovery must be over, or None for no limit."""
        return None if self.policy.timeout is None else self.started + self.policy.timeout

    def record(self, failure: Failure) -> str | None:
        """Record a failure; return why to give up, or None to keep trying."""
        previous = self.failures[-1] if self.failures else None
        self.failures.append(failure)
        if failure.is_permanent:
            return failure.category
        if failure.verdict is Verdict.SUSPECT and failure.same_as(previous):
            return "the same failure twice in a row (poison input)"
        return None

    def next_wait(self, now: float) -> float | None:
        """Seconds to wait before the next attempt, or None when the budget is spent."""
        if self.attempts >= self.policy.attempts:
            return None
        wait = 0.0
        if self.attempts:
            bound = self.policy.wait_bound(self.attempts)
            wait = self.rng.uniform(0.0, bound) if self.policy.jitter and bound > 0 else bound
        last = self.failures[-1] if self.failures else None
        if last is not None and last.retry_after is not None:
            wait = max(wait, last.retry_after)
        deadline = self.deadline()
        if deadline is not None and now + wait >= deadline:
            return None
        return wait


def now() -> float:
    """The monotonic clock the shells use."""
    return time.monotonic()
