"""Sans-I/O record of a speech-to-speech session: the reply in progress, the input owed to the model.

The :class:`SessionJournal` is what :class:`~pipecat_resilient.realtime.ResilientRealtimeLLM`
keeps for a session such as Gemini Live. Its caller feeds it what happens -
the model's reply starting, its audio and transcription going downstream, the
reply ending, the user finishing a turn, a tool call running, the connection
being lost - and acts on what it returns:

* while recovering, user input (audio, text, tool results, context updates)
  is *buffered* instead of being sent into a dead session, and
  :meth:`SessionJournal.to_feed` hands it back, in order, once a fresh session
  is ready; audio is bounded by duration (the oldest goes first);
* :attr:`SessionJournal.cut` says what a drop cut short: a reply in progress
  (and what of it was heard) or a reply that was owed, so the shell can close
  it downstream and have the model answer again;
* :meth:`SessionJournal.overdue` tells a stalled session from a quiet one.

Time is passed in by the caller; nothing here reads a clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from pipecat_resilient.errors import InvalidState
from pipecat_resilient.ledger import State

__all__ = ["Cut", "SessionAction", "SessionActionKind", "SessionJournal"]


@dataclass(frozen=True, slots=True)
class Cut:
    """What a drop cut short.

    Parameters:
        reply_open: A reply had started downstream and not ended.
        heard: The transcription of that reply that went downstream.
        reply_owed: The user had finished a turn and no reply had started.
        tools_running: Tool calls still running when the session dropped.
    """

    reply_open: bool
    heard: str
    reply_owed: bool
    tools_running: tuple[str, ...] = ()

    @property
    def needs_answer(self) -> bool:
        """Whether the model owes the user an answer."""
        return self.reply_open or self.reply_owed


class SessionActionKind(Enum):
    """What the shell must feed the fresh session.

    Parameters:
        RESULT: A tool result produced while no session could take it.
        INPUT: User input (or another frame) buffered during recovery.
    """

    RESULT = "result"
    INPUT = "input"


@dataclass(frozen=True, slots=True)
class SessionAction:
    """One thing to feed, produced by :meth:`SessionJournal.to_feed`."""

    kind: SessionActionKind
    frame: object


@dataclass
class _Buffered:
    frame: object
    seconds: float = 0.0


@dataclass
class _Reply:
    open: bool = False
    heard: str = ""
    owed_since: float | None = None
    last_output_at: float | None = None


def _is_user_turn(frame: object) -> bool:
    """Whether a buffered frame (or ``(frame, direction)``) is the user saying something."""
    frame = frame[0] if isinstance(frame, tuple) else frame
    return type(frame).__name__ in ("InputTextRawFrame", "UserStoppedSpeakingFrame")


class SessionJournal:
    """Sans-I/O record of a speech-to-speech session.

    Args:
        first_response_timeout: Seconds the model may take to start answering
            a finished user turn.
        stall_timeout: Seconds a reply in progress may go without output.
        max_buffered_audio_s: Seconds of user audio kept while recovering.
    """

    def __init__(
        self,
        *,
        first_response_timeout: float = 5.0,
        stall_timeout: float = 3.0,
        max_buffered_audio_s: float = 30.0,
    ) -> None:
        """Create an empty journal in the LIVE state."""
        self.first_response_timeout = first_response_timeout
        self.stall_timeout = stall_timeout
        self.max_buffered_audio_s = max_buffered_audio_s
        self.state = State.LIVE
        self.cut: Cut | None = None
        # Seconds of the oldest buffered user audio dropped to keep within
        # the bound, since the connection was last lost.
        self.dropped_audio_s = 0.0
        self._reply = _Reply()
        # What the user already heard of an answer a fresh session was asked
        # to continue: a drop during the continuation cuts the whole of it.
        self._prefix = ""
        self._buffer: deque[_Buffered] = deque()
        self._results: deque[object] = deque()
        self._tools: set[str] = set()

    # -- the model's reply (live instance) -------------------------------------

    def reply_started(self, *, now: float) -> None:
        """A reply started downstream."""
        reply = self._reply
        reply.open = True
        reply.heard = self._prefix
        reply.owed_since = None
        reply.last_output_at = now

    def output(self, *, now: float) -> None:
        """The model produced output (audio or text)."""
        self._reply.last_output_at = now
        self._reply.owed_since = None

    def heard(self, text: str) -> None:
        """Transcription of the reply (whole words) went downstream with its audio."""
        if self._reply.open:
            self._reply.heard += text

    def reply_ended(self) -> None:
        """The reply ended downstream (completed or interrupted)."""
        self._reply = _Reply()
        self._prefix = ""

    def reply_owed(self, *, now: float) -> None:
        """The user finished a turn: the model owes an answer."""
        if not self._reply.open and self._reply.owed_since is None:
            self._reply.owed_since = now

    def interrupted(self) -> None:
        """The user interrupted: nothing is owed any more, not even a cut reply."""
        self._reply = _Reply()
        self._prefix = ""
        if self.cut is not None:
            self.cut = Cut(False, "", False, self.cut.tools_running)

    def tool_started(self, call_id: str) -> None:
        """The model called a tool (the reply waits on it)."""
        self._tools.add(call_id)
        self._reply.owed_since = None

    def tool_finished(self, call_id: str) -> None:
        """A tool call's result went to the model."""
        self._tools.discard(call_id)

    @property
    def reply_open(self) -> bool:
        """Whether a reply is in progress downstream."""
        return self._reply.open

    # -- input ---------------------------------------------------------------

    def input_accepted(self, frame: object, *, seconds: float = 0.0) -> bool:
        """User input (or a frame that must follow it) arrived.

        Args:
            frame: The frame.
            seconds: Its duration, for audio.

        Returns:
            True to feed it to the live session now; False when it was
            buffered because the session is recovering.
        """
        if self.state is State.LIVE:
            return True
        self._buffer.append(_Buffered(frame, seconds))
        self._bound_audio()
        return False

    def result_captured(self, frame: object) -> None:
        """A tool result came out of a session that can no longer take it."""
        self._results.append(frame)

    def _bound_audio(self) -> None:
        total = sum(item.seconds for item in self._buffer)
        while total > self.max_buffered_audio_s:
            oldest = next((item for item in self._buffer if item.seconds > 0), None)
            if oldest is None:
                return
            self._buffer.remove(oldest)
            total -= oldest.seconds
            self.dropped_audio_s += oldest.seconds

    # -- connection ----------------------------------------------------------

    def connection_lost(self, *, now: float) -> None:
        """The live session failed: remember what it cut short; buffer input from now on."""
        if self.state is not State.LIVE:
            raise InvalidState(f"connection lost while {self.state.name.lower()}")
        self.state = State.RECOVERING
        self.dropped_audio_s = 0.0
        reply = self._reply
        previous = self.cut
        owed = reply.owed_since is not None
        heard = reply.heard if reply.open else (self._prefix if owed else "")
        cut = Cut(reply.open, heard, owed, tuple(sorted(self._tools)))
        if previous is not None and previous.needs_answer and not cut.needs_answer:
            # Lost again before the last cut was made good: it still stands.
            cut = previous
        self.cut = cut
        self._reply = _Reply()

    def connection_restored(self) -> None:
        """A fresh session is ready; :meth:`to_feed` returns what it must be given."""
        if self.state is not State.RECOVERING:
            raise InvalidState(f"connection restored while {self.state.name.lower()}")
        self.state = State.LIVE

    def answered(self, *, asked: bool = False, now: float = 0.0) -> None:
        """The cut was made good.

        Args:
            asked: The fresh session was asked to continue the cut answer: it
                now owes that answer, and what was heard of it counts as heard
                of the continuation.
            now: Current time in seconds (when ``asked``).
        """
        if asked and self.cut is not None:
            heard = self.cut.heard
            self._prefix = heard + " " if heard and not heard.endswith(" ") else heard
            self.reply_owed(now=now)
        self.cut = None

    @property
    def has_user_input(self) -> bool:
        """Whether input buffered during recovery holds something the user said."""
        return any(item.seconds > 0 or _is_user_turn(item.frame) for item in self._buffer)

    def revived(self) -> None:
        """Leave the FAILED state: a fresh session is about to be connected."""
        if self.state is not State.FAILED:
            raise InvalidState(f"revived while {self.state.name.lower()}")
        self.state = State.RECOVERING

    def gave_up(self) -> list[object]:
        """Recovery gave up: the buffered input that will never reach a model."""
        frames = [item.frame for item in self._buffer]
        self._buffer.clear()
        self._results.clear()
        self.state = State.FAILED
        return frames

    # -- outputs -------------------------------------------------------------

    def to_feed(self) -> list[SessionAction]:
        """What the fresh session must be given, in order: tool results first, then buffered input."""
        if self.state is not State.LIVE:
            return []
        actions = [SessionAction(SessionActionKind.RESULT, frame) for frame in self._results]
        actions += [SessionAction(SessionActionKind.INPUT, item.frame) for item in self._buffer]
        self._results.clear()
        self._buffer.clear()
        return actions

    def overdue(self, *, now: float) -> str | None:
        """Whether the session has gone quiet while it owes output."""
        if self.state is not State.LIVE or self._tools:
            return None
        reply = self._reply
        if (
            reply.open
            and reply.last_output_at is not None
            and now - reply.last_output_at > self.stall_timeout
        ):
            return f"reply stalled for more than {self.stall_timeout:g}s"
        if reply.owed_since is not None and now - reply.owed_since > self.first_response_timeout:
            return f"no reply within {self.first_response_timeout:g}s of the user's turn"
        return None

    @property
    def buffered(self) -> int:
        """How many frames are buffered."""
        return len(self._buffer) + len(self._results)

    @property
    def in_flight(self) -> int:
        """Same as :attr:`buffered` (memory follows it)."""
        return self.buffered
