"""The websocket server all emulators share: connections, records, faults and outages.

An emulator subclasses :class:`WebsocketEmulator` and implements
:meth:`WebsocketEmulator.serve_connection` for its protocol. This module
counts handshakes, refuses the ones a :class:`~.faults.FaultPlan` says to
refuse, checks the API key, and carries out the planned close, abort and stall
faults on each connection, on the triggers the plan names.

It also takes the whole provider down for a while
(:meth:`~.outage.OutageSwitch.outage`, then
:meth:`~.outage.OutageSwitch.restore`; see :mod:`.outage`): while an outage
lasts, every handshake is refused with its status, accepted and then stalled
(the emulator reads and sends nothing, not even a pong), or hung (never
answered), before the plan, the API key or the path are looked at.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from loguru import logger
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from pipecat_resilient.testing.faults import Fault, FaultKind, FaultPlan
from pipecat_resilient.testing.outage import Outage, OutageMode, OutageSwitch
from pipecat_resilient.testing.speech import samples_per_char

__all__ = ["ConnectionRecord", "ConnectionState", "WorkFailed", "WebsocketEmulator"]


@dataclass
class ConnectionRecord:
    """What happened on one connection, for tests to inspect.

    Parameters:
        index: The connection's number (0-based, in handshake order).
        path: The request path and query.
        refused: The HTTP status it was refused with, if it was.
        hung: Whether its handshake was never answered (a HANG fault).
        texts: Text messages received, as ``(context_id, text)``.
        messages: Every parsed message received, in order.
        audio_chunks: Audio messages sent.
        audio_received: Audio messages received (speech-to-text emulators).
        fault: The fault carried out on it, if any (the last one, when an
            error message left the connection open for more).
        errors: Provider error messages sent on it (ERROR faults).
        closed: Whether the connection has ended.
        opened_at: When its handshake arrived (``time.monotonic``).
        first_audio_at: When it sent its first audio, if it did.
        fault_at: When its fault was carried out, if one was.
        outage: The mode of the outage that answered its handshake, if one did
            (``"refuse"``, ``"stall"``, ``"hang"``).
        cut_by_outage: Whether an outage that started while it was open cut it.
        finished: How many times the emulator said all of a context's (or a
            flush's) audio was sent (``isFinal``, ``done``, ``Flushed``).
    """

    index: int
    path: str = ""
    refused: int | None = None
    hung: bool = False
    texts: list[tuple[str | None, str]] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)
    audio_chunks: int = 0
    audio_received: int = 0
    fault: Fault | None = None
    errors: list[Fault] = field(default_factory=list)
    closed: bool = False
    opened_at: float = field(default_factory=time.monotonic)
    first_audio_at: float | None = None
    fault_at: float | None = None
    outage: OutageMode | None = None
    cut_by_outage: bool = False
    finished: int = 0


class _Connection(ServerConnection):
    """A server connection that can go mute: it reads as usual and sends nothing at all."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.withhold: Callable[[int], None] | None = None
        self._mute_next: Callable[[int], None] | None = None

    def mute_after_handshake(self, withhold: Callable[[int], None]) -> None:
        """Send the handshake response, then nothing: ``withhold`` gets the size of what is not sent."""
        self._mute_next = withhold

    def send_data(self) -> None:
        if self.withhold is None:
            super().send_data()
            if self._mute_next is not None and self.protocol.state is not State.CONNECTING:
                # The handshake response just went out; nothing else will.
                self.withhold, self._mute_next = self._mute_next, None
            return
        for data in self.protocol.data_to_send():
            self.withhold(len(data))


class _Faulted(Exception):
    """Raised inside a connection's tasks once a fault has been carried out."""


class WorkFailed(Exception):
    """Raised to the task whose message triggered a provider error (ERROR fault).

    The connection stays open; the emulator abandons the work in progress (a
    context being synthesized, a stream being transcribed) and goes on serving.
    """


@dataclass
class _Armed:
    """A fault waiting on one connection, its triggers counted from ``*_base``."""

    fault: Fault
    audio_base: int = 0
    text_base: int = 0
    received_base: int = 0
    once: bool = False  # armed while running: a delay applies to one message
    # Shared by the connections one fault was armed on together: the first
    # to meet its trigger carries it out, the others then never do.
    group: list[bool] | None = None

    def claim(self) -> bool:
        """Whether this connection may carry the fault out (its group's first)."""
        if self.group is None:
            return True
        if self.group[0]:
            return False
        self.group[0] = True
        return True


class ConnectionState:
    """Per-connection fault bookkeeping, handed to the protocol handler."""

    def __init__(self, emulator: WebsocketEmulator, ws: ServerConnection, record: ConnectionRecord) -> None:
        self.emulator = emulator
        self.ws = ws
        self.record = record
        self.text_messages = 0
        self.faulted = asyncio.Event()
        self._errored = False
        self.closing: asyncio.Task[None] | None = None
        self._armed: list[_Armed] = []
        self._timers: list[asyncio.Task[None]] = []
        self._fired: set[int] = set()
        for fault in emulator.plan.for_connection(record.index):
            if fault.kind not in (FaultKind.REFUSE, FaultKind.HANG):
                self._armed.append(_Armed(fault))

    @property
    def faults(self) -> list[Fault]:
        """Every fault planned or armed for this connection."""
        return [entry.fault for entry in self._armed]

    @property
    def first_audio_delay(self) -> float:
        """Extra delay before the first audio of every message (planned delays)."""
        return sum(
            e.fault.seconds for e in self._armed if e.fault.kind is FaultKind.DELAY_FIRST_AUDIO and not e.once
        )

    def take_first_audio_delay(self) -> float:
        """The delay before the next message's first audio; armed one-shot delays are used up."""
        once = [e for e in self._armed if e.fault.kind is FaultKind.DELAY_FIRST_AUDIO and e.once]
        for entry in once:
            self._armed.remove(entry)
        return self.first_audio_delay + sum(e.fault.seconds for e in once)

    def arm(self, fault: Fault, group: list[bool] | None = None) -> None:
        """Add a fault whose triggers count from now (a delay applies to the next message only);
        ``group`` is shared with the other connections it was armed on together."""
        entry = _Armed(
            fault,
            self.record.audio_chunks,
            self.text_messages,
            self.record.audio_received,
            once=True,
            group=group,
        )
        self._armed.append(entry)
        self._start_timer(entry)

    def disarm(self) -> None:
        """Drop the faults armed at run time that have not fired (plan faults stay)."""
        self._armed = [entry for entry in self._armed if not entry.once]

    def start_timers(self) -> None:
        for entry in self._armed:
            self._start_timer(entry)

    def _start_timer(self, entry: _Armed) -> None:
        fault = entry.fault
        if fault.kind is FaultKind.DELAY_FIRST_AUDIO:
            return
        if fault.after_seconds is not None:
            self._timers.append(asyncio.create_task(self._after(entry, fault.after_seconds)))
        elif fault.immediate:
            self._timers.append(asyncio.create_task(self._after(entry, 0.0)))

    async def _after(self, entry: _Armed, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if any(e is entry for e in self._armed) and entry.claim():  # not disarmed meanwhile
            await self.fire(id(entry), entry.fault)

    def stop_timers(self) -> None:
        for task in self._timers:
            task.cancel()

    async def audio_sent(self) -> None:
        """Count an audio message; carry out a fault it triggers. Raises if faulted."""
        self.record.audio_chunks += 1
        if self.record.first_audio_at is None:
            self.record.first_audio_at = time.monotonic()
        await self._check("after_audio_chunks")

    async def text_received(self) -> None:
        """Count a text message; carry out a fault it triggers. Raises if faulted."""
        self.text_messages += 1
        await self._check("after_text_messages")

    async def audio_received(self) -> None:
        """Count an audio message received; carry out a fault it triggers. Raises if faulted."""
        self.record.audio_received += 1
        await self._check("after_audio_received")

    async def _check(self, trigger: str) -> None:
        self._errored = False
        for entry in list(self._armed):
            wanted = getattr(entry.fault, trigger)
            if wanted is None:
                continue
            if trigger == "after_audio_chunks":
                count = self.record.audio_chunks - entry.audio_base
            elif trigger == "after_text_messages":
                count = self.text_messages - entry.text_base
            else:
                count = self.record.audio_received - entry.received_base
            if count == wanted and entry.claim():
                await self.fire(id(entry), entry.fault)
        if self.faulted.is_set():
            raise _Faulted()
        if self._errored:
            self._errored = False
            raise WorkFailed()

    async def fire(self, key: int, fault: Fault) -> None:
        """Carry out ``fault`` on this connection (once per ``key``)."""
        if key in self._fired or self.faulted.is_set() and fault.kind is not FaultKind.GO_AWAY:
            return
        self._fired.add(key)
        if fault.kind is FaultKind.GO_AWAY:
            await self.emulator.send_go_away(self, fault)
            return
        if fault.kind is FaultKind.DELAY_FIRST_AUDIO:
            return
        if fault.kind is FaultKind.ERROR:
            # The provider reports an error and keeps the socket open; the
            # task whose message triggered it abandons its work (WorkFailed).
            self.record.fault = fault
            self.record.fault_at = time.monotonic()
            self.record.errors.append(fault)
            self._errored = True
            logger.debug(f"{self.emulator.name}: connection {self.record.index}: error {fault.code}")
            await self.emulator.send_error(self, fault)
            return
        self.record.fault = fault
        self.record.fault_at = time.monotonic()
        self.faulted.set()
        logger.debug(
            f"{self.emulator.name}: connection {self.record.index}: {fault.kind.value} {fault.code or ''}"
        )
        if fault.kind is FaultKind.CLOSE and fault.linger:
            # The close frame goes out; the client's reply is never read.
            self.ws.protocol.send_close(fault.code, fault.reason)
            self.ws.send_data()
            self.ws.transport.pause_reading()
        elif fault.kind is FaultKind.CLOSE:
            # Closed in the background (the caller may be the reader); the
            # handler waits for it, so its own return cannot close with 1000.
            self.closing = asyncio.create_task(self.ws.close(fault.code, fault.reason))
            self.emulator.track(self.closing)
        elif fault.kind is FaultKind.ABORT:
            self.ws.transport.abort()
        elif fault.kind is FaultKind.STALL:
            # Half-open: nothing read (so no pings answered), nothing sent.
            self.ws.transport.pause_reading()

    async def send(self, message: str | bytes) -> None:
        """Send unless a fault has silenced the connection."""
        if self.faulted.is_set():
            raise _Faulted()
        await self.ws.send(message)


async def _drain(ws: ServerConnection) -> None:
    """Read and drop what the client still sends, until the connection closes."""
    with contextlib.suppress(Exception):
        async for _ in ws:
            pass


class WebsocketEmulator(OutageSwitch):
    """Base class of the provider emulators: a websocket server on 127.0.0.1, port 0.

    Use as an async context manager, or call :meth:`start` and :meth:`stop`.
    Take it down with :meth:`outage` and bring it back with :meth:`restore`
    (see :mod:`pipecat_resilient.testing.outage`).

    Args:
        plan: The faults to inject; none when omitted.
        api_key: When set, handshakes must carry it (in :attr:`api_key_header`)
            or are refused with HTTP 401.
        ssl_context: Serve TLS (``wss``) with this server context.
    """

    name = "emulator"
    api_key_header = "x-api-key"
    scheme = "ws"
    # The speech code's rate, and the sample rate its audio is usually read at.
    ms_per_char = 10.0
    default_sample_rate = 24000

    def __init__(
        self,
        *,
        plan: FaultPlan | None = None,
        api_key: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Create a stopped emulator."""
        super().__init__()
        self.plan = plan or FaultPlan()
        self.api_key = api_key
        self._ssl = ssl_context
        self.connections: list[ConnectionRecord] = []
        self._server: Server | None = None
        self._states: list[ConnectionState] = []
        self._records: dict[int, ConnectionRecord] = {}
        self._pending: list[Fault] = []
        self._pending_refusals: list[Fault] = []
        self._pending_hangs: list[Fault] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connected = asyncio.Condition()
        # Handshakes never answered, and connections stalled by an outage.
        self._held: dict[ServerConnection, ConnectionRecord] = {}
        self._stalled: dict[ServerConnection, ConnectionRecord] = {}
        self._stopping = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> Self:
        """Start listening on an ephemeral port of 127.0.0.1."""
        self._stopping = asyncio.Event()
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._handshake,
            ssl=self._ssl,
            ping_interval=None,
            max_size=None,
            close_timeout=1.0,
            create_connection=_Connection,
        )
        return self

    async def stop(self) -> None:
        """Stop the server and drop every connection at once (stalled and hung ones too).

        An outage under way ends now.
        """
        self._stopping.set()
        self._end_outage_at_stop()
        for state in self._states:
            with contextlib.suppress(Exception):
                state.ws.transport.abort()
        for ws in [*self._stalled, *self._held]:
            with contextlib.suppress(Exception):
                ws.transport.abort()
        if self._server is not None:
            self._server.close(close_connections=False)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The port the emulator listens on."""
        if self._server is None:
            raise RuntimeError(f"{self.name} is not running")
        sockets = list(self._server.sockets)
        return int(sockets[0].getsockname()[1])

    def samples_per_char(self, sample_rate: int | None = None) -> int:
        """Samples per character of the speech code at ``sample_rate`` (what a decoder needs)."""
        return samples_per_char(sample_rate or self.default_sample_rate, self.ms_per_char)

    @property
    def url(self) -> str:
        """Base URL to give the stock service (``ws://127.0.0.1:PORT``)."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep a background task alive until it finishes or the emulator stops."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def inject(self, fault: Fault, connection: int | None = None) -> None:
        """Carry out ``fault`` now on an open connection (the latest when None).

        Its trigger and connection fields are ignored. Useful for a drop
        between utterances, when no message would trigger a planned fault.
        """
        states = [s for s in self._states if not s.record.closed]
        if connection is not None:
            states = [s for s in states if s.record.index == connection]
        if not states:
            raise RuntimeError(f"{self.name}: no open connection to inject {fault.kind.value} into")
        await states[-1].fire(-1 - len(states[-1]._fired), fault)

    def arm(self, fault: Fault, *, on: str = "current") -> None:
        """Plan ``fault`` while running, its trigger counted from now.

        Args:
            fault: The fault (its ``connection`` field is ignored).
            on: ``"current"`` for the newest open connection (or the next one
                if none is open), ``"next"`` for the next connection to open,
                ``"open"`` for every open connection, carried out once, by
                the first whose trigger is met (the one that speaks, when a
                client keeps a standby connection open beside it).
                A refusal or a hang always applies to the next handshake.
        """
        if fault.kind is FaultKind.REFUSE:
            self._pending_refusals.append(fault)
            return
        if fault.kind is FaultKind.HANG:
            self._pending_hangs.append(fault)
            return
        states = [s for s in self._states if not s.record.closed and not s.faulted.is_set()]
        if on == "open" and states:
            group = [False]
            for state in states:
                state.arm(fault, group)
        elif on == "current" and states:
            states[-1].arm(fault)
        else:
            self._pending.append(fault)

    def disarm(self) -> None:
        """Withdraw every fault armed with :meth:`arm` that has not been carried out yet.

        Faults of the emulator's :class:`~.faults.FaultPlan` stay. Useful to keep
        a workload's faults to the step that armed them: a client stuck on a dead
        connection would otherwise meet all of them at once when it reconnects.
        """
        self._pending.clear()
        self._pending_refusals.clear()
        self._pending_hangs.clear()
        for state in self._states:
            state.disarm()

    async def wait_for_connections(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least ``count`` handshakes have arrived."""
        async with self._connected:
            await asyncio.wait_for(self._connected.wait_for(lambda: len(self.connections) >= count), timeout)

    # -- outages -------------------------------------------------------------

    def _cut_open_connections(self) -> list[int]:
        """Abort every open connection, stalled and hung ones included; returns their indices."""
        open_states = [s for s in self._states if not s.record.closed and s.ws.state is not State.CLOSED]
        records = [state.record for state in open_states]
        transports = [state.ws.transport for state in open_states]
        for ws, record in [*self._stalled.items(), *self._held.items()]:
            records.append(record)
            transports.append(ws.transport)
        for transport in transports:
            with contextlib.suppress(Exception):
                transport.abort()
        for record in records:
            record.cut_by_outage = True
        return sorted(record.index for record in records)

    async def _outage_handshake(
        self, connection: ServerConnection, request: Request, outage: Outage
    ) -> Response | None:
        """Answer a handshake the way ``outage`` says (plan, API key and path unseen)."""
        record = self._new_record(connection, request)
        record.outage = outage.mode
        self._outage_for(record.index)
        if outage.mode == "refuse":
            record.refused = outage.status
            record.closed = True
            response = connection.respond(outage.status, f"{self.name}: service unavailable (outage)\n")
            for key, value in outage.headers.items():
                response.headers[key] = value
            return response
        if outage.mode == "hang":
            record.hung = True
            return await self._hold(connection, record)

        def withhold(size: int) -> None:
            outage.withheld += size
            self._outage_changed()

        if isinstance(connection, _Connection):
            connection.mute_after_handshake(withhold)
        return None

    async def _hold(self, connection: ServerConnection, record: ConnectionRecord) -> Response:
        """Leave a handshake unanswered until the client hangs up, it is cut, or the emulator stops."""
        self._held[connection] = record
        waits = [
            asyncio.ensure_future(self._stopping.wait()),
            asyncio.ensure_future(connection.wait_closed()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            self._held.pop(connection, None)
            connection.transport.abort()
            record.closed = True
            self._outage_changed()
        # Never reaches the client: the connection is gone.
        return connection.respond(503, f"{self.name}: stopped\n")

    async def _serve_stalled(self, ws: ServerConnection, record: ConnectionRecord, outage: Outage) -> None:
        """Read and drop what the client sends, answer nothing, until it hangs up or the emulator stops."""
        self._stalled[ws] = record
        try:
            async for _ in ws:
                outage.messages_read += 1
                self._outage_changed()
        except ConnectionClosed:
            pass
        finally:
            # Half-open to the end: the client's close frame is not answered either.
            with contextlib.suppress(Exception):
                await ws.wait_closed()
            self._stalled.pop(ws, None)
            record.closed = True
            self._outage_changed()

    # -- handshake ---------------------------------------------------------

    async def _handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        outage = self.current_outage
        if outage is not None:
            return await self._outage_handshake(connection, request, outage)
        response = self._process_request(connection, request)
        record = self.connections[-1]
        hang = self.plan.hangs(record.index) or (self._pending_hangs and self._pending_hangs.pop(0))
        if response is None and hang:
            # Never answered: the client waits for its own timeout.
            record.hung = True
            return await self._hold(connection, record)
        return response

    def _new_record(self, connection: ServerConnection, request: Request) -> ConnectionRecord:
        record = ConnectionRecord(index=len(self.connections), path=request.path)
        self.connections.append(record)
        self._records[id(connection)] = record
        self._notify()
        return record

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        record = self._new_record(connection, request)
        refusal = self.plan.refusal(record.index)
        if refusal is None and self._pending_refusals:
            refusal = self._pending_refusals.pop(0)
        if refusal is not None:
            record.refused = refusal.status
            record.closed = True
            response = connection.respond(refusal.status, refusal.reason or f"refused by {self.name}\n")
            for key, value in refusal.headers.items():
                response.headers[key] = value
            return response
        if self.api_key is not None and request.headers.get(self.api_key_header) != self.api_key:
            record.refused = 401
            record.closed = True
            return connection.respond(401, '{"detail": "invalid api key"}\n')
        return None

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._connected:
                self._connected.notify_all()

        with contextlib.suppress(RuntimeError):
            self.track(asyncio.get_running_loop().create_task(notify()))

    async def _handle(self, ws: ServerConnection) -> None:
        record = self._records.pop(id(ws))
        if record.outage == "stall":
            outage = next(o for o in reversed(self.outages) if record.index in o.met)
            await self._serve_stalled(ws, record, outage)
            return
        state = ConnectionState(self, ws, record)
        self._states.append(state)
        state.start_timers()
        pending, self._pending = self._pending, []
        for fault in pending:
            state.arm(fault)
        try:
            await self.serve_connection(state)
        except (_Faulted, ConnectionClosed):
            pass
        finally:
            if state.closing is not None:
                # A real server reads on until the client's close frame comes
                # back. The handler stopped reading when the fault fired: what
                # the client sent meanwhile (a burst of audio) would fill the
                # read queue, leave the close frame unread, and make the close
                # wait out the close timeout.
                draining = asyncio.ensure_future(_drain(ws))
                with contextlib.suppress(Exception):
                    await state.closing
                draining.cancel()
                with contextlib.suppress(BaseException):
                    await draining
            if state.faulted.is_set() and state.record.fault is not None:
                fault = state.record.fault
                if fault.kind is FaultKind.STALL or fault.kind is FaultKind.CLOSE and fault.linger:
                    # Stay half-open (or half-closed) until the client gives up on us.
                    with contextlib.suppress(Exception):
                        await ws.wait_closed()
            state.stop_timers()
            record.closed = True
            self._outage_changed()

    # -- protocol ----------------------------------------------------------

    async def serve_connection(self, state: ConnectionState) -> None:
        """Speak the provider protocol on one connection. Implemented by emulators."""
        raise NotImplementedError

    async def send_go_away(self, state: ConnectionState, fault: Fault) -> None:
        """Announce a close (protocols that have such a message)."""

    async def send_error(self, state: ConnectionState, fault: Fault) -> None:
        """Send the provider's error message for an ERROR fault (``fault.reason``, ``fault.code``).

        Implemented by emulators whose protocol has one; the socket stays open.
        """
        raise NotImplementedError(f"{self.name} has no provider error message")
