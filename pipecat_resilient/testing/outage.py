"""Outages: take an emulated provider down for a while, then bring it back.

Every emulator of the kit has the same switch, :class:`OutageSwitch` (mixed
into :class:`~pipecat_resilient.testing._server.WebsocketEmulator` and the HTTP
emulators :class:`~pipecat_resilient.testing.openai.OpenAIEmulator` and
:class:`~pipecat_resilient.testing.openai_tts.OpenAITTSEmulator`)::

    async with ElevenLabsEmulator() as emulator:
        outage = emulator.outage("refuse", status=503, seconds=0.5)
        ...                                # every handshake is refused with 503
        await emulator.wait_restored()     # 0.5 s later, by the event loop's clock
        assert outage.ended_at == outage.ends_at
        emulator.outage("stall")           # until restore()
        ...
        emulator.restore()
        print(emulator.time_in_outage())   # for a bench: seconds spent down

The API, the same on every emulator:

* ``outage(mode="refuse", *, status=503, seconds=None, retry_after=None,
  headers=None, drop_existing=True) -> Outage``: start one now;
* ``restore() -> Outage | None``: end the one under way now;
* ``outage_active`` and ``current_outage``;
* ``outages``: every :class:`Outage`, in order; ``time_in_outage(now=None)``;
* ``await wait_restored(timeout)``, ``await wait_outage_until(predicate, timeout)``.

Modes, for every connection (websocket handshake, or HTTP request) that
arrives while the outage lasts:

* ``"refuse"``: answered with HTTP ``status`` (503 by default; 429 with
  ``retry_after=`` sets ``Retry-After``) and ``headers``, like a provider's
  edge that sheds load;
* ``"stall"``: accepted and never answered - a websocket upgrade completes,
  then the emulator reads what the client sends and sends nothing at all (no
  message, no pong, no close frame: half-open); an HTTP request gets its
  response headers (200) and never a byte of body;
* ``"hang"``: the TCP connection is accepted and the handshake never
  completes - no websocket upgrade, no HTTP status line. (The websockets
  server drops a handshake still open after its ``open_timeout``, 10 s, as it
  does for a :meth:`~.faults.Fault.hang` fault; clients usually give up
  sooner.)

A stalled or hung connection stays that way after the outage ends, until its
client gives up or the emulator stops (:meth:`stop` ends them at once); new
connections are served normally again. With ``drop_existing=True`` (the
default) the connections open when the outage starts are cut too (the TCP
connection is aborted, the client sees 1006 or a reset), so an outage in the
middle of an answer is a drop followed by refusals, stalls or hangs.

Outages are independent of fault plans and take precedence over them. A
connection that arrives during an outage keeps its index (connections and
requests are counted in arrival order, whatever answered them), and the
outage answers it instead of the plan: the plan's faults for that index never
happen, and refusals, hangs and faults armed with ``arm()`` wait for the first
connection the outage lets through.

Times are the event loop's clock (``loop.time()``, which is
``time.monotonic()`` on the standard loops): a timed outage ends exactly
``seconds`` after it started, by that clock, whether or not its timer callback
has run yet, so a test waits on :meth:`OutageSwitch.wait_restored` and never
sleeps. :attr:`OutageSwitch.outages` keeps every outage (:class:`Outage`):
when it started and ended, which connections it cut and which it answered;
:meth:`OutageSwitch.time_in_outage` adds them up for a bench.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from aiohttp import web
from loguru import logger

__all__ = ["Outage", "OutageMode", "OutageSwitch"]

OutageMode = Literal["refuse", "stall", "hang"]
"""How a provider that is down answers a new connection."""

_MODES: tuple[str, ...] = get_args(OutageMode)


@dataclass
class Outage:
    """One outage, for tests and benches to inspect.

    Parameters:
        mode: How new connections were answered.
        status: The HTTP status of a refusal (``"refuse"``).
        headers: Headers sent with a refusal (``Retry-After``...).
        started_at: When it started (event loop clock).
        ends_at: When it was planned to end (event loop clock); None for an
            outage that lasts until ``restore()``.
        ended_at: When it ended (event loop clock), None while it lasts. A
            timed outage ends exactly at ``ends_at``.
        dropped: Indices of the connections (or requests) cut when it started.
        met: Indices of the connections (or requests) it answered: refused,
            stalled or hung.
        messages_read: Messages read, and dropped, on its stalled websockets.
        withheld: Bytes its stalled websockets would have sent on their own
            (pongs, close frames) and did not.
    """

    mode: OutageMode
    status: int
    headers: dict[str, str]
    started_at: float
    ends_at: float | None = None
    ended_at: float | None = None
    dropped: list[int] = field(default_factory=list)
    met: list[int] = field(default_factory=list)
    messages_read: int = 0
    withheld: int = 0

    @property
    def active(self) -> bool:
        """Whether it has not ended yet."""
        return self.ended_at is None

    @property
    def seconds(self) -> float | None:
        """The planned duration; None for an outage that lasts until ``restore()``."""
        return None if self.ends_at is None else self.ends_at - self.started_at

    @property
    def duration(self) -> float | None:
        """How long it lasted; None while it lasts."""
        return None if self.ended_at is None else self.ended_at - self.started_at


class OutageSwitch:
    """Take an emulator down (:meth:`outage`) and bring it back (:meth:`restore`).

    A mixin of every emulator of the kit. An emulator implements
    :meth:`_cut_open_connections`, asks :meth:`_outage_for` how to answer
    each new connection, and calls :meth:`_end_outage_at_stop` when it stops.
    """

    name = "emulator"

    def __init__(self) -> None:
        """Start with no outage."""
        self.outages: list[Outage] = []
        """Every outage, in the order they started."""
        self._outage: Outage | None = None
        self._outage_timer: asyncio.TimerHandle | None = None
        self._outage_wakeup = asyncio.Event()

    # -- the switch ----------------------------------------------------------

    def outage(
        self,
        mode: OutageMode = "refuse",
        *,
        status: int = 503,
        seconds: float | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
        drop_existing: bool = True,
    ) -> Outage:
        """Start an outage now; an outage already under way ends first.

        Call it from the event loop the emulator runs on.

        Args:
            mode: ``"refuse"``, ``"stall"`` or ``"hang"`` (see the module docstring).
            status: The HTTP status of a refusal, 400 to 599.
            seconds: How long it lasts (event loop clock); None: until :meth:`restore`.
            retry_after: Seconds to send as ``Retry-After`` with a refusal.
            headers: More headers to send with a refusal.
            drop_existing: Also cut the connections open now (TCP abort).

        Returns:
            The outage's record (also appended to :attr:`outages`).

        Raises:
            ValueError: On an unknown mode, a status out of range, or a
                duration or ``retry_after`` that is not positive.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, not {mode!r}")
        if not 400 <= status <= 599:
            raise ValueError(f"an outage refuses with an HTTP status between 400 and 599, not {status}")
        if seconds is not None and not seconds > 0:
            raise ValueError("seconds must be positive (or None: until restore())")
        if retry_after is not None and not retry_after >= 0:
            raise ValueError("retry_after must not be negative")
        sent = dict(headers or {})
        if retry_after is not None:
            sent["Retry-After"] = f"{retry_after:g}"
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.current_outage is not None:
            self._end_outage(now)
        outage = Outage(
            mode=mode,
            status=status,
            headers=sent,
            started_at=now,
            ends_at=None if seconds is None else now + seconds,
        )
        self._outage = outage
        self.outages.append(outage)
        if outage.ends_at is not None:
            self._outage_timer = loop.call_at(outage.ends_at, self._outage_due, outage)
        logger.debug(f"{self.name}: outage ({mode}) for {'ever' if seconds is None else f'{seconds} s'}")
        if drop_existing:
            outage.dropped.extend(self._cut_open_connections())
        self._outage_changed()
        return outage

    def restore(self) -> Outage | None:
        """End the outage under way now, if there is one; returns it."""
        outage = self.current_outage
        if outage is not None:
            self._end_outage(asyncio.get_running_loop().time())
        return outage

    @property
    def current_outage(self) -> Outage | None:
        """The outage under way, if any."""
        outage = self._outage
        if outage is not None and outage.ends_at is not None:
            try:
                now = asyncio.get_running_loop().time()
            except RuntimeError:
                return outage
            if now >= outage.ends_at:
                self._end_outage(outage.ends_at)
                return None
        return outage

    @property
    def outage_active(self) -> bool:
        """Whether an outage is under way."""
        return self.current_outage is not None

    def time_in_outage(self, now: float | None = None) -> float:
        """Seconds spent in outages, the one under way counted up to ``now`` (the loop's time)."""
        current = self.current_outage
        total = sum(o.duration or 0.0 for o in self.outages if o is not current)
        if current is not None:
            total += (asyncio.get_running_loop().time() if now is None else now) - current.started_at
        return total

    async def wait_restored(self, timeout: float = 10.0) -> None:
        """Wait until no outage is under way.

        Raises:
            TimeoutError: If one still is after ``timeout`` seconds.
        """
        await self.wait_outage_until(lambda: not self.outage_active, timeout)

    async def wait_outage_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds.

        Checked when an outage starts or ends, answers a connection or cuts
        one, when a stalled websocket reads or withholds something, and when
        any connection (or request) ends.

        Raises:
            TimeoutError: If it does not hold within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._outage_wakeup.wait()

    # -- for the emulators ---------------------------------------------------

    def _outage_for(self, index: int) -> Outage | None:
        """The outage that answers new connection ``index``, if one is under way (recorded)."""
        outage = self.current_outage
        if outage is not None:
            outage.met.append(index)
            logger.debug(f"{self.name}: connection {index}: outage ({outage.mode})")
            self._outage_changed()
        return outage

    def _cut_open_connections(self) -> list[int]:
        """Abort every open connection; returns their indices. Implemented by emulators."""
        raise NotImplementedError

    def _end_outage_at_stop(self) -> None:
        """End the outage under way, if any (the emulator is stopping)."""
        if self.current_outage is not None:
            self._end_outage(asyncio.get_running_loop().time())

    def _outage_changed(self) -> None:
        """Wake everything waiting in :meth:`wait_outage_until`."""
        event, self._outage_wakeup = self._outage_wakeup, asyncio.Event()
        event.set()

    def _outage_due(self, outage: Outage) -> None:
        if self._outage is outage and outage.ends_at is not None:
            self._end_outage(outage.ends_at)

    def _end_outage(self, when: float) -> None:
        outage, self._outage = self._outage, None
        if self._outage_timer is not None:
            self._outage_timer.cancel()
            self._outage_timer = None
        if outage is not None:
            outage.ended_at = when
            logger.debug(f"{self.name}: outage ({outage.mode}) over after {when - outage.started_at:.3f} s")
            self._outage_changed()


async def answer_http_outage(
    request: web.Request,
    outage: Outage,
    *,
    refusal: Callable[[int, Mapping[str, str]], web.Response],
    content_type: str,
    stopping: Callable[[], Awaitable[object]],
) -> web.StreamResponse:
    """Answer an HTTP request the way ``outage`` says.

    Args:
        request: The request.
        outage: The outage under way.
        refusal: Builds the provider's error response from a status and headers.
        content_type: The ``Content-Type`` of a stalled response's headers.
        stopping: Waits until the emulator stops.

    Returns:
        The refusal (``"refuse"``).

    Raises:
        asyncio.CancelledError: Once a stalled or hung request ends (its
            client hung up, or the emulator stopped): aiohttp must not finish
            a response on the aborted transport.
    """
    if outage.mode == "refuse":
        return refusal(outage.status, outage.headers)
    if outage.mode == "stall":
        response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        await response.prepare(request)
    # Nothing (more) is sent; the socket stays up until the client hangs up
    # (which cancels this handler) or the emulator stops.
    await stopping()
    if request.transport is not None:
        request.transport.abort()
    raise asyncio.CancelledError()
