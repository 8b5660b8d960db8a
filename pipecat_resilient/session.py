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
* :meth:`SessionJournal.overdue` tells a stalled session from a quiet one:
  a user turn with no reply, a reply that went quiet, a reply whose
  transcription comes with no audio;
* it keeps what the user heard of the reply in progress in whole words, with
  how much audio went downstream, so a cut can be continued from exactly
  there: transcription is *heard* only once its audio went out
  (:meth:`SessionJournal.transcribed` holds back a word still arriving, and
  transcription that runs ahead of its audio until the audio covers it), so
  the context never gets a word the user did not hear; and the speech rate of
  whole replies (:attr:`SessionJournal.bytes_per_char`), to tell where in a
  continuation's audio the words already heard end;
* it keeps the user's spoken turn until the model takes it
  (:meth:`SessionJournal.input_fed`): a session lost before it answered is
  given the turn again, so a session that stops answering loses no words;
* it keeps the conversation the session took in that its latest resumption
  handle does not cover (:attr:`SessionJournal.uncovered`): a resumed session
  is given those turns again, since a handle only covers what came before the
  turn it was issued after.

Time is passed in by the caller; nothing here reads a clock.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pipecat_resilient.errors import InvalidState
from pipecat_resilient.ledger import State

__all__ = ["Cut", "SessionAction", "SessionActionKind", "SessionJournal"]

_WORD = re.compile(r"\S+")


@dataclass(frozen=True, slots=True)
class Cut:
    """What a drop cut short.

    Parameters:
        reply_open: A reply had started downstream and not ended.
        heard: The transcription of that reply that went downstream with its
            audio, in whole words (what the context holds of it).
        reply_owed: The user had finished a turn and no reply had started.
        tools_running: Tool calls still running when the session dropped.
        tail: Transcription received past ``heard`` (a word still arriving,
            or words whose audio had not gone out).
        heard_audio: Bytes of the reply's audio that went downstream, from
            ``audio_from`` on.
        audio_from: Characters of ``heard`` before that audio began (a
            continuation's own audio begins after what was heard before).
    """

    reply_open: bool
    heard: str
    reply_owed: bool
    tools_running: tuple[str, ...] = ()
    tail: str = ""
    heard_audio: int = 0
    audio_from: int = 0

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
    speech: bool = False


@dataclass
class _Reply:
    open: bool = False
    heard: str = ""
    owed_since: float | None = None
    last_output_at: float | None = None
    opened_at: float | None = None
    speaks: bool = True
    # The current segment (the reply, or a continuation from where it was
    # spliced to what was heard): its transcription, how much of it is
    # confirmed heard, its audio, and whether its transcription runs ahead
    # of its audio (a piece came before any audio).
    text: str = ""
    released: int = 0
    audio: int = 0
    audio_from: int = 0  # len(heard) where the segment began
    ahead: bool = False
    total_audio: int = 0  # bytes delivered in this reply
    chars: int = 0  # characters released in this reply

    @property
    def tail(self) -> str:
        return self.text[self.released :]


def _bound(items: deque[_Buffered], limit: float) -> float:
    """Drop the oldest audio of ``items`` beyond ``limit`` seconds; return the seconds dropped."""
    total = sum(item.seconds for item in items)
    dropped = 0.0
    while total > limit:
        oldest = next((item for item in items if item.seconds > 0), None)
        if oldest is None:
            break
        items.remove(oldest)
        total -= oldest.seconds
        dropped += oldest.seconds
    return dropped


def _is_user_turn(frame: object) -> bool:
    """Whether a buffered frame (or ``(frame, direction)``) is the user saying something.

    A ``UserStoppedSpeakingFrame`` alone is not: it may be the late end of a
    turn that was already answered.
    """
    frame = frame[0] if isinstance(frame, tuple) else frame
    return type(frame).__name__ in ("InputTextRawFrame", "UserStartedSpeakingFrame")


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
        self._asked: Cut | None = None  # the cut a fresh session was asked to continue
        self._answered_speech = False  # a reply began since the user last started speaking
        self._buffer: deque[_Buffered] = deque()
        # The user's spoken turn as fed to the live session since the model
        # last began a reply (and the session last transcribed it): a session
        # lost before it answered is given it again.
        self._turn: deque[_Buffered] = deque()
        self._results: deque[object] = deque()
        self._tools: set[str] = set()
        self._rate_audio = 0
        self._rate_chars = 0
        # The conversation the session took in, from where its latest
        # resumption handle stops covering it; and how much of it the next
        # handle will cover (what came before the last completed turn).
        self._uncovered: list[dict[str, Any]] = []
        self._covered_by_next = 0
        self.version = 0
        """Counts what happened to the conversation (input taken in, replies begun and ended)."""

    # -- the model's reply (live instance) -------------------------------------

    def reply_started(self, *, now: float, speaks: bool = True) -> None:
        """A reply started (its output is on its way downstream).

        Args:
            now: Current time in seconds.
            speaks: It is a spoken reply (one with no audio for long is stuck);
                False for a text reply.
        """
        self.version += 1
        prefix, asked = self._prefix, self._asked
        self._asked = None
        self._answered_speech = True
        self._turn.clear()
        self._reply = _Reply(
            open=True,
            heard=prefix,
            last_output_at=now,
            opened_at=now,
            audio_from=len(prefix),
            speaks=speaks,
        )
        if asked is not None and speaks:
            # A continuation: until it is spliced to what was heard, a cut
            # cuts the reply it continues, as it was cut.
            self._reply.text = asked.tail
            self._reply.audio = asked.heard_audio
            self._reply.audio_from = asked.audio_from

    def output(self, *, now: float) -> None:
        """The model produced output (audio or text)."""
        self._reply.last_output_at = now
        self._reply.owed_since = None

    def audio_delivered(self, size: int, *, now: float) -> str:
        """``size`` bytes of the reply's audio went downstream.

        Returns:
            Words of its transcription that this audio confirms heard (pass
            them on after the audio); "" when none.
        """
        reply = self._reply
        reply.audio += size
        reply.total_audio += size
        self.output(now=now)
        return self._release()

    def transcribed(self, text: str) -> str:
        """Transcription of the reply arrived.

        Transcription that comes with or after its audio is heard as it
        comes, in whole words (a word still arriving waits for the next piece
        or the end of the reply). Transcription that runs ahead of its audio
        (a piece came before any of the segment's audio) is heard only as the
        audio covering it goes out, by the session's speech rate; without one
        yet, it waits for the end of the reply (or, at a cut, is left for the
        continuation's check to confirm).

        Returns:
            Whole words heard now (they count as heard: pass them on).
        """
        reply = self._reply
        if not reply.audio:
            reply.ahead = True
        reply.text += text
        return self._release()

    def _release(self) -> str:
        reply = self._reply
        if not reply.open or reply.released >= len(reply.text):
            return ""
        point = float(len(reply.text))
        if reply.ahead:
            rate = self.bytes_per_char
            if rate is None:
                return ""
            point = reply.audio / rate + 0.5
        end = reply.released
        for match in _WORD.finditer(reply.text, reply.released):
            if match.end() >= len(reply.text) or match.end() > point:
                break  # still arriving, or not heard yet
            end = match.end()
        while reply.released < end < len(reply.text) and reply.text[end].isspace():
            end += 1
        words, reply.released = reply.text[reply.released : end], end
        reply.heard += words
        reply.chars += len(words)
        return words

    def word_completed(self) -> str:
        """The reply's audio ended whole: all of its transcription was heard.

        Returns:
            What of it was not yet confirmed (it counts as heard now), to pass
            on; "" when none.
        """
        reply = self._reply
        if not reply.open:
            return ""
        words, reply.released = reply.text[reply.released :], len(reply.text)
        reply.heard += words
        reply.chars += len(words)
        return words

    def unheard_reply(self, *, now: float) -> str:
        """The reply in progress ended and nobody heard it (its transcription came with no audio).

        It is owed again, from what was heard of it (a continuation's prefix).

        Returns:
            What the user heard of it: the model's partial turn to go on from.
        """
        self.version += 1
        reply = self._reply
        heard = reply.heard if reply.open else ""
        self._asked = Cut(
            True,
            heard,
            True,
            tuple(sorted(self._tools)),
            tail=reply.tail,
            heard_audio=reply.audio,
            audio_from=reply.audio_from,
        )
        self._prefix = heard
        self._reply = _Reply(owed_since=now)
        return heard

    @property
    def asked_cut(self) -> Cut | None:
        """The cut the session was asked to go on with, until the reply that does begins."""
        return self._asked

    @property
    def owes_reply(self) -> bool:
        """Whether the user finished a turn that no reply has begun to answer."""
        return self._reply.owed_since is not None

    def spliced(self, heard_late: str) -> None:
        """A continuation was joined to what was heard: its own audio starts here.

        Args:
            heard_late: Words the user had heard whose transcription only came
                with the continuation (they join what was heard).
        """
        reply = self._reply
        if not reply.open:
            return
        reply.heard += heard_late
        reply.text, reply.released, reply.ahead = "", 0, False
        reply.audio, reply.audio_from = 0, len(reply.heard)

    def reply_ended(self, *, completed: bool = True) -> str:
        """The reply ended downstream.

        Args:
            completed: It ended whole (not interrupted): its last word is
                complete, and its rate of audio to text is learnt.

        Returns:
            What :meth:`transcribed` held back, to pass on when ``completed``
            (it counts as heard then); otherwise "".
        """
        self.version += 1
        reply = self._reply
        tail = self.word_completed() if completed else ""
        if reply.open:
            if completed and reply.total_audio and reply.chars:
                self._rate_audio += reply.total_audio
                self._rate_chars += reply.chars
            heard = reply.heard.strip()
            if heard:
                self._uncovered.append({"role": "assistant", "content": heard})
        if completed:
            self.turn_completed()
        self._reply = _Reply()
        self._prefix = ""
        self._asked = None
        return tail

    def reply_owed(self, *, now: float, spoken: bool = False) -> None:
        """The user finished a turn: the model owes an answer.

        Args:
            now: Current time in seconds.
            spoken: The turn ended in speech (a ``UserStoppedSpeakingFrame``);
                a reply that began since the user started speaking already
                answers it (a provider's own VAD may answer before the
                pipeline hears the turn end).
        """
        if spoken and self._answered_speech:
            return
        if not self._reply.open and self._reply.owed_since is None:
            self._reply.owed_since = now

    def user_started_speaking(self) -> None:
        """The user started speaking: a turn begins that no reply answers yet."""
        self._answered_speech = False

    def interrupted(self) -> None:
        """The user interrupted: nothing is owed any more, not even a cut reply."""
        self.version += 1
        heard = self._reply.heard.strip() if self._reply.open else ""
        if heard:
            self._uncovered.append({"role": "assistant", "content": heard})
        self._reply = _Reply()
        self._prefix = ""
        self._asked = None
        if self.cut is not None:
            if self.cut.heard.strip():
                # Not to be continued, but heard: it is part of the conversation.
                self._uncovered.append({"role": "assistant", "content": self.cut.heard.strip()})
            self.cut = Cut(False, "", False, self.cut.tools_running)

    def tool_started(self, call_id: str) -> None:
        """The model called a tool (the reply waits on it)."""
        self._tools.add(call_id)
        self._reply.owed_since = None

    def tool_finished(self, call_id: str) -> None:
        """A tool call's result went to the model."""
        self._tools.discard(call_id)

    @property
    def bytes_per_char(self) -> float | None:
        """Bytes of audio per character of transcription over the whole replies so far."""
        return self._rate_audio / self._rate_chars if self._rate_chars else None

    # -- what the session took in (for resumption) ------------------------------

    def input_fed(self, frame: object, *, seconds: float = 0.0, speech: bool = False) -> None:
        """User audio (or a speaking frame) went to the live session; kept until the model takes the turn."""
        self._turn.append(_Buffered(frame, seconds, speech))
        _bound(self._turn, self.max_buffered_audio_s)

    def user_transcribed(self, text: str) -> None:
        """The session transcribed what the user said: it holds the turn (as text, for resuming)."""
        self._turn.clear()
        self.said({"role": "user", "content": text})

    def said(self, *messages: dict[str, Any]) -> None:
        """The live session took in these user messages (a turn, a transcription, a seed)."""
        self.version += 1
        self._uncovered.extend(dict(message) for message in messages)

    def turn_completed(self) -> None:
        """The model completed a turn: a handle issued from now on covers all taken in so far."""
        self._covered_by_next = len(self._uncovered)

    def handle_issued(self) -> None:
        """The session issued a resumption handle."""
        del self._uncovered[: self._covered_by_next]
        self._covered_by_next = 0

    def seeded(self, messages: list[dict[str, Any]]) -> None:
        """A fresh session given ``messages`` went live (no handle covers any of it yet)."""
        self._uncovered = [dict(message) for message in messages]
        self._covered_by_next = 0

    @property
    def uncovered(self) -> list[dict[str, Any]]:
        """The conversation the latest handle does not cover, as context messages."""
        return [dict(message) for message in self._uncovered]

    @property
    def reply_open(self) -> bool:
        """Whether a reply is in progress downstream."""
        return self._reply.open

    # -- input ---------------------------------------------------------------

    def input_accepted(self, frame: object, *, seconds: float = 0.0, speech: bool = False) -> bool:
        """User input (or a frame that must follow it) arrived.

        Args:
            frame: The frame.
            seconds: Its duration, for audio.
            speech: It is audio with speech in it (not silence).

        Returns:
            True to feed it to the live session now; False when it was
            buffered because the session is recovering.
        """
        if self.state is State.LIVE:
            return True
        self._buffer.append(_Buffered(frame, seconds, speech))
        self.dropped_audio_s += _bound(self._buffer, self.max_buffered_audio_s)
        return False

    def result_captured(self, frame: object) -> None:
        """A tool result came out of a session that can no longer take it."""
        self._results.append(frame)

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
        if reply.open:
            cut = Cut(
                True,
                reply.heard,
                owed,
                tuple(sorted(self._tools)),
                tail=reply.tail,
                heard_audio=reply.audio,
                audio_from=reply.audio_from,
            )
        elif owed and self._asked is not None:
            # Asked to continue a cut reply, lost before it began: the same cut.
            cut = Cut(
                False,
                self._asked.heard,
                True,
                tuple(sorted(self._tools)),
                tail=self._asked.tail,
                heard_audio=self._asked.heard_audio,
                audio_from=self._asked.audio_from,
            )
        else:
            cut = Cut(False, "", owed, tuple(sorted(self._tools)))
        if previous is not None and previous.needs_answer and not cut.needs_answer:
            # Lost again before the last cut was made good: it still stands.
            cut = previous
        if self._turn and not reply.open:
            # The user spoke and no reply began: the session may never have
            # taken the turn in. It goes to the fresh session first, as it was.
            self._buffer.extendleft(reversed(self._turn))
            self._turn.clear()
            if not cut.reply_open and not cut.heard:
                cut = Cut(False, "", False, cut.tools_running)
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
            self._asked = self.cut
            self.reply_owed(now=now)
        self.cut = None

    @property
    def has_user_input(self) -> bool:
        """Whether input buffered during recovery holds something the user said (text, or speech)."""
        return any(item.speech or _is_user_turn(item.frame) for item in self._buffer)

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
            and reply.speaks
            and not reply.total_audio
            and reply.opened_at is not None
            and now - reply.opened_at > self.first_response_timeout
        ):
            return f"reply with no audio for more than {self.first_response_timeout:g}s"
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
