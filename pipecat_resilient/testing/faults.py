"""Fault plans: what an emulator does wrong, on which connection, and when.

A :class:`FaultPlan` is a list of :class:`Fault` entries. Each names the
connection it applies to (counted from 0, in the order handshakes arrive,
refused ones included; ``None`` for every connection), a trigger and an
action::

    plan = FaultPlan(
        Fault.close(1012, after_audio_chunks=3),              # connection 0
        Fault.close(1011, after_audio_chunks=1, connection=1),  # the replacement too
        Fault.refuse(503, connection=2),
    )

Triggers: ``after_audio_chunks`` (audio messages sent on the connection),
``after_text_messages`` (text messages received), ``after_audio_received``
(audio messages received: speech-to-text emulators), ``after_seconds`` (since
the connection opened); with none of them the action happens at once.

Actions:

* ``close(code, reason)``: a clean websocket close with that code;
* ``abort()``: drop the TCP connection without a close frame (the client sees
  1006);
* ``stall()``: go half-open - stop reading and stop sending, keep the socket
  open, answer nothing (not even pings);
* ``refuse(status, headers)``: answer the handshake with an HTTP status;
* ``hang()``: never answer the handshake (the TCP connection is accepted, the
  upgrade never completes: a provider whose edge takes connections it cannot
  serve);
* ``delay_first_audio(seconds)``: wait before the first audio of every
  message (a slow provider, not a failure);
* ``go_away(time_left)``: for protocols that announce a close (Gemini Live);
* ``error(message, code)``: send the provider's own error message and leave
  the socket open (the work in progress when it fires is abandoned, as the
  real services do); each emulator speaks it in its protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

__all__ = ["Fault", "FaultKind", "FaultPlan"]


class FaultKind(Enum):
    """What a fault does."""

    CLOSE = "close"
    ABORT = "abort"
    STALL = "stall"
    REFUSE = "refuse"
    DELAY_FIRST_AUDIO = "delay_first_audio"
    GO_AWAY = "go_away"
    ERROR = "error"
    HANG = "hang"


@dataclass(frozen=True, slots=True)
class Fault:
    """One planned fault. Build with the class methods.

    Parameters:
        kind: What happens.
        connection: Which connection (0-based), or None for all.
        after_audio_chunks: Trigger once this many audio messages were sent.
        after_text_messages: Trigger once this many text messages arrived.
        after_seconds: Trigger this long after the connection opened.
        after_audio_received: Trigger once this many audio messages arrived
            (speech-to-text emulators).
        code: Close code (CLOSE), or the provider's error status (ERROR).
        reason: Close reason (CLOSE), the error message (ERROR), or detail
            for other kinds.
        status: HTTP status (REFUSE).
        headers: Response headers (REFUSE), e.g. ``{"Retry-After": "1"}``.
        seconds: Delay (DELAY_FIRST_AUDIO) or announced time left (GO_AWAY).
        linger: CLOSE only: after its close frame the provider stops reading,
            so the closing handshake never completes.
    """

    kind: FaultKind
    connection: int | None = 0
    after_audio_chunks: int | None = None
    after_text_messages: int | None = None
    after_seconds: float | None = None
    code: int = 1000
    reason: str = ""
    status: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    after_audio_received: int | None = None
    linger: bool = False

    def __post_init__(self) -> None:
        triggers = [
            self.after_audio_chunks,
            self.after_text_messages,
            self.after_seconds,
            self.after_audio_received,
        ]
        if sum(t is not None for t in triggers) > 1:
            raise ValueError("a fault takes at most one trigger")
        for name in ("after_audio_chunks", "after_text_messages", "after_audio_received"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")
        if self.after_seconds is not None and self.after_seconds < 0:
            raise ValueError("after_seconds must not be negative")
        if self.connection is not None and self.connection < 0:
            raise ValueError("connection must not be negative")
        if self.kind is FaultKind.REFUSE and not 300 <= self.status <= 599:
            raise ValueError(f"refuse needs an HTTP status between 300 and 599, got {self.status}")

    @classmethod
    def close(
        cls,
        code: int,
        reason: str = "",
        *,
        connection: int | None = 0,
        after_audio_chunks: int | None = None,
        after_text_messages: int | None = None,
        after_seconds: float | None = None,
        after_audio_received: int | None = None,
        linger: bool = False,
    ) -> Fault:
        """Close the websocket with ``code`` and ``reason``.

        With ``linger``, the provider sends its close frame and then reads
        nothing more, so it never sees the client's reply and never closes
        the TCP connection (a proxy that passes the close on and hangs): the
        client's ``recv`` raises only once its own close timeout ends the wait.
        """
        return cls(
            FaultKind.CLOSE,
            connection,
            after_audio_chunks,
            after_text_messages,
            after_seconds,
            code=code,
            reason=reason,
            after_audio_received=after_audio_received,
            linger=linger,
        )

    @classmethod
    def abort(
        cls,
        *,
        connection: int | None = 0,
        after_audio_chunks: int | None = None,
        after_text_messages: int | None = None,
        after_seconds: float | None = None,
        after_audio_received: int | None = None,
    ) -> Fault:
        """Drop the TCP connection without a close frame (the client sees 1006)."""
        return cls(
            FaultKind.ABORT,
            connection,
            after_audio_chunks,
            after_text_messages,
            after_seconds,
            after_audio_received=after_audio_received,
        )

    @classmethod
    def stall(
        cls,
        *,
        connection: int | None = 0,
        after_audio_chunks: int | None = None,
        after_text_messages: int | None = None,
        after_seconds: float | None = None,
        after_audio_received: int | None = None,
    ) -> Fault:
        """Go half-open: keep the socket, never read or send again."""
        return cls(
            FaultKind.STALL,
            connection,
            after_audio_chunks,
            after_text_messages,
            after_seconds,
            after_audio_received=after_audio_received,
        )

    @classmethod
    def error(
        cls,
        message: str = "internal server error",
        code: int = 500,
        *,
        connection: int | None = 0,
        after_audio_chunks: int | None = None,
        after_text_messages: int | None = None,
        after_seconds: float | None = None,
        after_audio_received: int | None = None,
    ) -> Fault:
        """Send the provider's error message (``message``, status ``code``) with the socket left open.

        The work in progress when it fires (the context being synthesized,
        the stream being transcribed) is abandoned, as the real services do;
        the connection keeps serving what comes next.
        """
        return cls(
            FaultKind.ERROR,
            connection,
            after_audio_chunks,
            after_text_messages,
            after_seconds,
            code=code,
            reason=message,
            after_audio_received=after_audio_received,
        )

    @classmethod
    def refuse(
        cls,
        status: int,
        *,
        connection: int | None = 0,
        headers: Mapping[str, str] | None = None,
        reason: str = "",
    ) -> Fault:
        """Answer the handshake with HTTP ``status`` (and ``headers``)."""
        return cls(FaultKind.REFUSE, connection, status=status, headers=dict(headers or {}), reason=reason)

    @classmethod
    def hang(cls, *, connection: int | None = 0) -> Fault:
        """Never answer the handshake of ``connection`` (None: of every connection)."""
        return cls(FaultKind.HANG, connection)

    @classmethod
    def delay_first_audio(cls, seconds: float, *, connection: int | None = 0) -> Fault:
        """Wait ``seconds`` before the first audio of each message."""
        return cls(FaultKind.DELAY_FIRST_AUDIO, connection, seconds=seconds)

    @classmethod
    def go_away(
        cls,
        time_left: float = 10.0,
        *,
        connection: int | None = 0,
        after_audio_chunks: int | None = None,
        after_text_messages: int | None = None,
        after_seconds: float | None = None,
    ) -> Fault:
        """Announce an upcoming close (protocols with a GoAway message)."""
        return cls(
            FaultKind.GO_AWAY,
            connection,
            after_audio_chunks,
            after_text_messages,
            after_seconds,
            seconds=time_left,
        )

    def applies_to(self, connection: int) -> bool:
        """Whether this fault is planned for ``connection``."""
        return self.connection is None or self.connection == connection

    @property
    def immediate(self) -> bool:
        """Whether it has no trigger (happens as soon as the connection opens)."""
        return (
            self.after_audio_chunks is None
            and self.after_text_messages is None
            and self.after_seconds is None
            and self.after_audio_received is None
        )


class FaultPlan:
    """An ordered set of faults for one emulator.

    Args:
        *faults: The faults, in any order.
    """

    def __init__(self, *faults: Fault) -> None:
        """Create a plan."""
        self._faults: list[Fault] = list(faults)

    @classmethod
    def of(cls, faults: Iterable[Fault]) -> FaultPlan:
        """Build a plan from an iterable."""
        return cls(*faults)

    def add(self, fault: Fault) -> None:
        """Add a fault (before the connection it names is opened)."""
        self._faults.append(fault)

    def for_connection(self, connection: int) -> list[Fault]:
        """The faults planned for ``connection``."""
        return [fault for fault in self._faults if fault.applies_to(connection)]

    def refusal(self, connection: int) -> Fault | None:
        """The handshake refusal planned for ``connection``, if any."""
        return next((f for f in self.for_connection(connection) if f.kind is FaultKind.REFUSE), None)

    def hangs(self, connection: int) -> bool:
        """Whether the handshake of ``connection`` is never to be answered."""
        return any(f.kind is FaultKind.HANG for f in self.for_connection(connection))

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._faults)

    def __len__(self) -> int:
        return len(self._faults)

    def __repr__(self) -> str:
        return f"FaultPlan({', '.join(repr(f) for f in self._faults)})"
