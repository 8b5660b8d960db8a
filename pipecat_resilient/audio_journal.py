"""Sans-I/O record of the caller's audio sent to a speech-to-text provider, and of what it finalized.

The :class:`AudioJournal` is what :class:`~pipecat_resilient.stt.ResilientSTT`
keeps so that no word the caller says is lost when the provider's socket drops.
It knows nothing about sockets, asyncio or Pipecat; its caller (the shell) feeds
it what happens and acts on what it returns:

* caller input is *accepted* as *entries*, in order: audio chunks, *cues* (the
  VAD frames and mute frames that change how a service treats the audio after
  them) and other *frames* for the service; :meth:`AudioJournal.to_feed` says
  what to hand to the live service instance next;
* the live instance reports each chunk it *sent* to the provider
  (:meth:`AudioJournal.audio_sent`), which builds the map from that
  connection's *stream clock* (seconds of audio it received, from 0 when it
  opened) back to the *caller's timeline* (seconds of audio accepted, from 0 when
  the call started);
* the provider's evidence comes back in stream time: final results and the
  end of the audio they covered, interim results, and, for providers that
  acknowledge a finalize request, the position of that request;
  :attr:`AudioJournal.heard_until` is the caller time up to which the
  transcript is final;
* on a drop (:meth:`AudioJournal.connection_lost`) the feed rewinds to a little
  before ``heard_until`` (``replay_margin_s``, so that no word is cut in half,
  at chunk granularity), so a fresh instance receives the audio from there and
  then the live audio, as fast as it takes it; the state the caller was in at
  that point (speaking, muted) is re-established first;
* words of the fresh connection whose middle lies before the old
  ``heard_until`` repeat what was already final: :meth:`AudioJournal.result_received`
  says how many leading words to drop, by *time*, not by text;
* :meth:`AudioJournal.overdue` tells a stalled stream from a quiet one: audio
  went in while the caller spoke (VAD), or speech not final yet went into a
  fresh connection that has said nothing since it opened (a replay into a
  half-open socket), and nothing came back within ``stall_timeout``; with a
  provider whose results say how far into the audio they reach
  (``covers_audio``: Deepgram), speech that a replay carried or that went in
  before a VAD stop stays owed until a result reaches past it, each message
  giving the provider another ``stall_timeout``, so a connection that goes
  half-open after answering part of it is found out while the caller is
  silent, not when the caller next speaks; words
  shown in an interim result were not finalized within ``finalize_timeout`` of
  a finalize request; or a send did not complete within ``send_timeout``;
* a VAD stop is held back (:meth:`AudioJournal.stops_to_pass`) until the
  speech before it is final, so that the turn it ends is not committed
  without its last words when the connection dies before finalizing them: it
  passes once a final covers the speech, or once the live connection took it
  ``finalize_timeout`` ago and owes nothing (no word shown and not final, no
  speech unanswered), or ``stop_hold_timeout`` after it arrived at the latest.

Audio is held only until it is final (plus the margin). While the caller is
silent (VAD stopped and everything said before was finalized), silence older
than ``silence_guard_s`` counts as final too, so a drop between turns replays
almost nothing. The audio held is bounded by ``max_buffered_audio_s``; the
oldest goes first and :meth:`AudioJournal.take_dropped` says how much.

Time is passed in by the caller (``now``, wall-clock seconds); caller and
stream times are seconds of audio. Nothing here reads a clock.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from pipecat_resilient.errors import InvalidState
from pipecat_resilient.ledger import State

__all__ = ["AudioJournal", "Entry", "EntryKind", "Lost"]

# Times closer than this are the same time (sums of chunk durations drift).
_EPSILON_S = 1e-6

# Speech starts this long before a VAD reports it (Pipecat's VAD start_secs
# is 0.2 s): audio that recent is tagged as speech when the VAD start arrives.
_VAD_LEAD_S = 0.5

# A final whose last word ends this close before the speech end a VAD stop
# implies covers all of the speech (VAD and provider timings differ by a frame
# or two).
_SPEECH_END_TOLERANCE_S = 0.1

# A result that reaches this close to the end of replayed speech answers it
# (the speech VAD marks runs a little past the last word).
_COVER_TOLERANCE_S = 0.1

# The stream-to-caller map keeps at most this many segments (a new one starts
# at each gap: muted audio, keepalive silence).
_MAX_SEGMENTS = 256


class EntryKind(Enum):
    """What an entry of the journal holds.

    Parameters:
        AUDIO: A chunk of caller audio. Replayed after a drop.
        CUE: A frame that changes how the service treats the audio after it
            (a VAD start or stop, a mute). Replayed after a drop.
        FRAME: Any other frame for the service, kept in order while no
            instance can take it. Fed once, never replayed.
    """

    AUDIO = "audio"
    CUE = "cue"
    FRAME = "frame"


@dataclass(eq=False, slots=True)
class Entry:
    """One thing accepted from the caller's side, at its place on the caller's timeline.

    Returned by :meth:`AudioJournal.to_feed` -- do not instantiate directly.

    Parameters:
        kind: What it holds.
        frame: The frame (opaque to the journal).
        start: Caller time where it belongs (for audio, where it starts).
        duration: Seconds of audio (0 for cues and frames).
        direction: The direction it travels (opaque; cues and frames).
        speech: Audio the caller may have spoken in (VAD said so, or no VAD
            was seen yet).
        fed: Set by the shell once it fed the entry to an instance (a
            ``FRAME`` is fed once; audio and cues again after a rewind).
        passed: Whether the frame was passed on: a VAD stop is not until
            :meth:`AudioJournal.stops_to_pass` says so (or the shell passes it
            before a VAD start).
        mute: For a mute cue, whether it mutes.
        speaking: For a VAD cue, whether it starts speech.
        trailing: For audio, whether it is the silence a VAD stop waited for
            (after the speech the stop ended).
        stop_secs: For a VAD stop, the silence the VAD waited for before it.
        waits: For a VAD stop, whether it is held back until the speech before
            it is final (not for a provider whose messages are not observed,
            nor while muted).
        accepted_at: For a VAD stop, the wall-clock time it arrived (None when
            not given: no bound on its hold).
        taken_at: For a VAD stop, the wall-clock time the live instance took
            it (None while no instance has, since the last drop).
    """

    kind: EntryKind
    frame: object
    start: float
    duration: float = 0.0
    direction: object = None
    speech: bool = False
    fed: bool = False
    passed: bool = True
    mute: bool | None = None
    speaking: bool | None = None
    trailing: bool = False
    stop_secs: float = 0.0
    waits: bool = False
    accepted_at: float | None = None
    taken_at: float | None = None

    @property
    def end(self) -> float:
        """Caller time where it ends."""
        return self.start + self.duration


@dataclass(frozen=True, slots=True)
class Lost:
    """What recovery giving up left untranscribed (returned by :meth:`AudioJournal.gave_up`).

    Parameters:
        audio_s: Seconds of caller audio accepted and never finalized.
        speech_s: Of those, the seconds the caller may have spoken in.
        frames: Frames held for the service (and VAD stops not passed on yet),
            to pass on in order.
    """

    audio_s: float
    speech_s: float
    frames: tuple[tuple[object, object], ...] = ()


@dataclass(slots=True)
class _Connection:
    """The live connection's stream clock, mapped back to the caller's timeline."""

    position: float = 0.0  # seconds of audio sent on it
    starts: list[float] = field(default_factory=list)  # stream start of each segment
    segments: list[list[float]] = field(default_factory=list)  # [stream start, caller start, seconds]
    origin: float = 0.0  # caller time of stream time 0, before any audio was sent

    def sent(self, caller_start: float, seconds: float) -> None:
        segments = self.segments
        if segments:
            last = segments[-1]
            if (
                abs(last[0] + last[2] - self.position) < _EPSILON_S
                and abs(last[1] + last[2] - caller_start) < _EPSILON_S
            ):
                last[2] += seconds
                self.position += seconds
                return
        segments.append([self.position, caller_start, seconds])
        self.starts.append(self.position)
        if len(segments) > _MAX_SEGMENTS:
            del segments[0], self.starts[0]
        self.position += seconds

    def to_caller(self, t: float) -> float:
        """Caller time of stream time ``t`` (clamped into a gap the caller did not fill)."""
        segments = self.segments
        if not segments:
            return self.origin + t
        index = bisect.bisect_right(self.starts, t) - 1
        if index < 0:
            first = segments[0]
            return first[1] - (first[0] - t)
        stream_start, caller_start, seconds = segments[index]
        offset = t - stream_start
        if offset > seconds and index + 1 < len(segments):
            # Inside a gap (keepalive silence): the caller said nothing there.
            return caller_start + seconds
        return caller_start + offset


class AudioJournal:
    """Sans-I/O record of the caller's audio sent to a speech-to-text provider.

    Args:
        stall_timeout: Seconds audio may go in while the caller speaks with
            nothing coming back before the connection counts as dead.
        finalize_timeout: Seconds the provider may take to finalize words it
            showed in an interim result, after a finalize request.
        send_timeout: Seconds one send may take.
        max_buffered_audio_s: Seconds of audio held at most; the oldest is
            dropped first.
        replay_margin_s: How far before the end of the finalized audio a
            replay starts.
        silence_guard_s: While the caller is silent, silence older than this
            counts as finalized.
        observes_messages: Whether the caller reports every provider message
            (:meth:`message_received`); without it, a quiet provider is not
            taken for a stalled one, and a VAD stop is not held back for the
            speech before it.
        stop_hold_timeout: Seconds a VAD stop is held back at most after it
            arrived (when the caller gives its time).
        covers_audio: Whether every result says how far into the audio it
            reaches (Deepgram's start and duration, empty results included).
            A replay's speech not final is then owed an answer until a
            result reaches past it, however many messages come before:
            a fresh connection that answers the start of a replay and then
            goes quiet is found out while the caller is silent too.
    """

    def __init__(
        self,
        *,
        stall_timeout: float = 2.0,
        finalize_timeout: float = 0.5,
        send_timeout: float = 2.0,
        max_buffered_audio_s: float = 30.0,
        replay_margin_s: float = 0.2,
        silence_guard_s: float = 0.5,
        observes_messages: bool = True,
        stop_hold_timeout: float = 5.0,
        covers_audio: bool = False,
    ) -> None:
        """Create an empty journal in the LIVE state."""
        self.stall_timeout = stall_timeout
        self.finalize_timeout = finalize_timeout
        self.send_timeout = send_timeout
        self.max_buffered_audio_s = max_buffered_audio_s
        self.replay_margin_s = replay_margin_s
        self.silence_guard_s = silence_guard_s
        self.observes_messages = observes_messages
        self.stop_hold_timeout = stop_hold_timeout
        self.covers_audio = covers_audio
        self.state = State.LIVE
        self.heard_until = 0.0
        """Caller time up to which the provider's transcript is final."""
        self.replayed_s = 0.0
        """Seconds of audio in the last replay (set when a connection is restored)."""
        self.replay_from = 0.0
        """Caller time where the last replay started."""
        self._entries: deque[Entry] = deque()
        self._cursor = 0  # index of the next entry to feed
        self._prelude: list[Entry] = []  # state cues to feed before the replay
        self._position = 0.0  # caller seconds accepted
        self._held_s = 0.0  # seconds of audio in the entries
        self._connection = _Connection()
        # Words of the live connection whose middle is before this repeat what
        # an earlier connection finalized.
        self._boundary = -math.inf
        # State cues trimmed from the head: the latest VAD cue and mute cue.
        self._vad_before: Entry | None = None
        self._mute_before: Entry | None = None
        # The caller, as VAD says.
        self._vad_seen = False
        self._speaking = False
        self._muted = False
        self._last_stop: tuple[float, float] | None = None  # (caller position, stop_secs)
        # VAD stops not passed on yet, in order.
        self._stops: list[Entry] = []
        # The provider, for the watchdog.
        self._unanswered_since: float | None = None  # first speech sent since the last message
        self._unanswered_at: float | None = None  # its caller time
        self._sending_since: float | None = None
        self._finalize_at: float | None = None  # stream position of a finalize request
        self._finalize_since: float | None = None
        self._interim_ends: list[float] = []  # caller end of each word the last interim showed
        self._turn_announced = False  # the provider reported speech, and no final since
        # The live connection is a fresh one (after a drop, or a new stream)
        # that has said nothing yet.
        self._fresh = False
        # Caller time where the last replay ends (the live audio after it).
        self._replay_until = 0.0
        # With covers_audio: caller end of the replayed speech not final that
        # no result has reached yet, and whether the watchdog runs for it.
        self._owed_until: float | None = None
        self._armed_for_owed = False
        self._covered_until = -math.inf  # caller time the live connection's results reached
        self._dropped_s = 0.0
        self._dropped_speech_s = 0.0
        self.dropped = False
        """Whether audio was dropped over the bound since :meth:`take_dropped`."""

    # ------------------------------------------------------------------
    # Inputs: the caller's side
    # ------------------------------------------------------------------

    def audio_accepted(self, frame: object, seconds: float) -> Entry:
        """Take a chunk of caller audio (``seconds`` long) at the end of the caller's timeline.

        Returns:
            Its entry.
        """
        self._check_not_failed()
        entry = Entry(
            EntryKind.AUDIO, frame, self._position, seconds, speech=self._speaking or not self._vad_seen
        )
        self._entries.append(entry)
        self._position += seconds
        self._held_s += seconds
        if self._vad_seen and not self._speaking:
            self._silence_heard()
        if self._held_s > self.max_buffered_audio_s:
            self._drop_oldest()
        self._trim()
        return entry

    def vad_accepted(
        self,
        frame: object,
        *,
        speaking: bool,
        direction: object = None,
        stop_secs: float = 0.0,
        now: float | None = None,
    ) -> Entry:
        """Take a VAD start (``speaking``) or stop at the current caller time.

        A stop is not passed on yet (``passed`` False): see :meth:`stops_to_pass`.

        Args:
            frame: The VAD frame.
            speaking: True for a start, False for a stop.
            direction: The direction it travels.
            stop_secs: For a stop, the silence the VAD waited for before it.
            now: Wall-clock time, from which a stop's hold is bounded by
                ``stop_hold_timeout`` (no bound when None).

        Returns:
            Its entry.
        """
        self._check_not_failed()
        entry = Entry(EntryKind.CUE, frame, self._position, direction=direction, speaking=speaking)
        self._vad_seen = True
        if speaking:
            self._speaking = True
            # A new utterance: an earlier finalize request is moot, as Pipecat
            # treats it.
            self._finalize_at = self._finalize_since = None
            for earlier in reversed(self._entries):
                if earlier.kind is EntryKind.AUDIO:
                    if earlier.end <= self._position - _VAD_LEAD_S + _EPSILON_S:
                        break
                    earlier.speech = True
        else:
            self._speaking = False
            self._last_stop = (self._position, stop_secs)
            entry.passed = False
            entry.stop_secs = stop_secs
            entry.waits = self.observes_messages and not self._muted
            entry.accepted_at = now
            self._stops.append(entry)
            for earlier in reversed(self._entries):
                if earlier.kind is EntryKind.AUDIO:
                    if earlier.start < self._position - stop_secs - _EPSILON_S:
                        break
                    earlier.trailing = True
            self._owe_speech_before_stop(self._position - stop_secs, now)
            unanswered = self._unanswered_at
            if (
                unanswered is not None
                and unanswered >= self._position - stop_secs - _SPEECH_END_TOLERANCE_S
                and not self._armed_for_owed
            ):
                # What went in since the provider last spoke was the silence
                # the VAD waited for before this stop: nothing is owed for it.
                self._unanswered_since = self._unanswered_at = None
        self._entries.append(entry)
        return entry

    def _owe_speech_before_stop(self, speech_end: float, now: float | None) -> None:
        """With ``covers_audio``: speech sent before a VAD stop that no result reached is owed.

        Without coverage, audio that went in after the provider last spoke
        and is all within the silence the stop waited for owes nothing; but
        the provider's last message may not have reached the speech sent
        before it (a connection that went half-open on the last word).
        """
        if not self.covers_audio or self.state is not State.LIVE or self._muted:
            return
        reached = max(self.heard_until, self._covered_until)
        if reached >= speech_end - _COVER_TOLERANCE_S:
            return
        spoke = any(
            entry.kind is EntryKind.AUDIO and entry.speech and entry.end > reached + _EPSILON_S
            for entry in self._entries
        )
        if not spoke:
            return
        self._owed_until = max(self._owed_until or -math.inf, speech_end)
        if self._unanswered_since is not None:
            self._armed_for_owed = True
        elif now is not None and self._connection.to_caller(self._connection.position) > reached + _EPSILON_S:
            # Sent already: owed from now.
            self._unanswered_since, self._unanswered_at = now, reached
            self._armed_for_owed = True

    def mute_accepted(self, frame: object, *, mute: bool, direction: object = None) -> Entry:
        """Take a mute or unmute at the current caller time."""
        self._check_not_failed()
        entry = Entry(EntryKind.CUE, frame, self._position, direction=direction, mute=mute)
        self._muted = mute
        self._entries.append(entry)
        return entry

    def frame_accepted(self, frame: object, *, direction: object = None) -> Entry:
        """Take any other frame for the service, to feed once, in order."""
        self._check_not_failed()
        entry = Entry(EntryKind.FRAME, frame, self._position, direction=direction)
        self._entries.append(entry)
        return entry

    # ------------------------------------------------------------------
    # Inputs: the live connection
    # ------------------------------------------------------------------

    def audio_sent(self, entry: Entry, *, now: float) -> None:
        """The live instance sent ``entry``'s audio to the provider (a send that has started)."""
        if self.state is not State.LIVE:
            return
        self._connection.sent(entry.start, entry.duration)
        self._sending_since = now
        owed = self._owed_until
        if (
            self.covers_audio
            and (entry.end <= self._replay_until + _EPSILON_S or (owed is not None and entry.start < owed))
            and self._owes(entry)
        ):
            # Replayed speech, or speech a VAD stop said is owed, going in now.
            self._owed_until = max(owed or -math.inf, entry.end)
            if self._unanswered_since is None:
                self._unanswered_since = now
                self._unanswered_at = entry.start
                self._armed_for_owed = True
        if self._unanswered_since is None and (self._speaking or self._owed_by_fresh(entry)):
            # Speech went in: the provider owes a message about it (an interim
            # result, a final), whether or not the caller goes on speaking.
            self._unanswered_since = now
            self._unanswered_at = entry.start

    def _owed_by_fresh(self, entry: Entry) -> bool:
        """Whether ``entry`` is speech not final yet going into a fresh connection that has said nothing.

        A replay after the caller stopped speaking: a healthy provider answers
        the speech in it, a half-open socket never does. Once the fresh
        connection said anything, only live speech counts (a provider may say
        nothing about a cough), unless its results say how far they reach
        (``covers_audio``: then the replay's speech stays owed until one does).
        """
        return self._fresh and self._owes(entry)

    def _owes(self, entry: Entry) -> bool:
        """Whether ``entry`` is speech (VAD says) not final yet, other than the silence before a stop."""
        return (
            self._vad_seen
            and entry.speech
            and not entry.trailing
            and entry.end > self.heard_until + _EPSILON_S
        )

    def send_finished(self) -> None:
        """The send reported by :meth:`audio_sent` completed (or failed)."""
        self._sending_since = None

    def silence_sent(self, seconds: float) -> None:
        """The live instance sent ``seconds`` of silence of its own (a keepalive): the stream moved on."""
        self._connection.position += seconds

    def stream_started(self) -> None:
        """The live instance opened a new connection itself (a planned reconnect, e.g. new settings).

        The new connection's clock starts at 0; the feed rewinds as after a
        drop, and the new connection's words that repeat what was final are
        dropped.
        """
        if self.state is not State.LIVE:
            raise InvalidState(f"a stream cannot start while the journal is {self.state.name.lower()}")
        self._rewind()
        self._restore()

    def message_received(self, *, now: float) -> None:
        """The provider sent a message (any message: it is alive).

        Replayed speech no result has reached yet (``covers_audio``) is still
        owed: the provider gets another ``stall_timeout`` from this message.
        """
        self._fresh = False
        if self._owed_until is not None:
            self._unanswered_since, self._unanswered_at = now, self._owed_until
            self._armed_for_owed = True
        else:
            self._unanswered_since = self._unanswered_at = None
            self._armed_for_owed = False

    def result_received(self, words: Sequence[tuple[float, float]], *, end: float | None, final: bool) -> int:
        """A transcript result on the live connection, in stream time.

        Args:
            words: ``(start, end)`` of each word, in stream seconds, in order.
            end: Stream time up to which the result covers the audio (a final
                result's span), or None when only its words say.
            final: Whether the provider will not revise it.

        Returns:
            How many leading words repeat what an earlier connection finalized
            (the whole result when equal to ``len(words)``).
        """
        if self.state is not State.LIVE:
            return 0
        to_caller = self._connection.to_caller
        mapped = [(to_caller(start), to_caller(stop)) for start, stop in words]
        repeats = 0
        boundary = self._boundary
        for start, stop in mapped:
            if (start + stop) / 2 >= boundary:
                break
            repeats += 1
        covered = to_caller(end) if end is not None else -math.inf
        if mapped:
            covered = max(covered, mapped[-1][1])
        self._covered_until = max(self._covered_until, covered)
        if final:
            self._heard(covered)  # (reached, too)
            self._turn_announced = False
        else:
            self._reached(covered)
            self._interim_ends = [stop for _, stop in mapped]
        return repeats

    def _reached(self, until: float) -> None:
        """A result reached caller time ``until``: replayed speech before it is answered."""
        owed = self._owed_until
        if owed is not None and until >= owed - _COVER_TOLERANCE_S:
            self._owed_until = None
            if self._armed_for_owed:
                self._unanswered_since = self._unanswered_at = None
                self._armed_for_owed = False

    def speech_reported(self, at: float) -> bool:
        """The provider says speech started at stream time ``at``.

        Returns:
            Whether to pass it on: False when it lies in audio already final
            (a replay) or when the turn it starts was already reported.
        """
        if self.state is not State.LIVE:
            return False
        if self._connection.to_caller(at) < self._boundary - _EPSILON_S or self._turn_announced:
            return False
        self._turn_announced = True
        return True

    def finalize_requested(self, *, now: float, held_back_s: float = 0.0) -> None:
        """The live instance asked the provider to finalize everything it sent.

        Args:
            now: Wall-clock time.
            held_back_s: Seconds of the audio counted as sent that the service
                still holds back (it sends in chunks of its own).
        """
        if self.state is not State.LIVE or self._finalize_at is not None:
            # One request at a time: with one still unanswered (a replay sends
            # the Finalize of each VAD stop it carries at once), the next
            # acknowledgement is that one's, not this one's.
            return
        self._finalize_at = max(0.0, self._connection.position - held_back_s)
        self._finalize_since = now

    def finalize_confirmed(self) -> None:
        """The provider acknowledged the last finalize request: all audio sent before it is final."""
        if self.state is not State.LIVE or self._finalize_at is None:
            return
        self._heard(self._connection.to_caller(self._finalize_at))
        self._finalize_at = self._finalize_since = None

    def stop_taken(self, entry: Entry, *, now: float) -> None:
        """The live instance took VAD stop ``entry`` (and asked the provider to finalize, if it does)."""
        if self.state is State.LIVE and not entry.passed:
            entry.taken_at = now

    # ------------------------------------------------------------------
    # Inputs: the connection's lifecycle
    # ------------------------------------------------------------------

    def connection_lost(self, *, now: float) -> None:
        """The live connection died: rewind the feed to a little before :attr:`heard_until`."""
        if self.state is not State.LIVE:
            raise InvalidState(f"connection lost while the journal is {self.state.name.lower()}")
        self.state = State.RECOVERING
        self._rewind()

    def connection_restored(self, *, now: float) -> None:
        """A fresh instance is live: its stream clock starts at the replay."""
        if self.state is not State.RECOVERING:
            raise InvalidState(f"connection restored while the journal is {self.state.name.lower()}")
        self.state = State.LIVE
        self._restore()

    def gave_up(self) -> Lost:
        """Recovery is exhausted: say what was never finalized, and forget it.

        Returns:
            The audio left untranscribed and the frames to pass on.
        """
        audio = speech = 0.0
        frames: list[tuple[object, object]] = []
        kept = {id(entry) for entry in self._entries}
        for stop in self.pending_stops():
            if id(stop) not in kept:
                # Trimmed with the audio before it, and not passed on yet.
                stop.passed = True
                frames.append((stop.frame, stop.direction))
        for entry in self._entries:
            if entry.kind is EntryKind.AUDIO:
                if entry.end > self.heard_until + _EPSILON_S:
                    seconds = entry.end - max(entry.start, self.heard_until)
                    audio += seconds
                    if entry.speech:
                        speech += seconds
            elif entry.kind is EntryKind.FRAME and not entry.fed:
                frames.append((entry.frame, entry.direction))
            elif entry.kind is EntryKind.CUE and not entry.passed:
                entry.passed = True
                frames.append((entry.frame, entry.direction))
        self.state = State.FAILED
        self._entries.clear()
        self._stops = []
        self._prelude = []
        self._cursor = 0
        self._held_s = 0.0
        self.heard_until = self._position
        return Lost(audio, speech, tuple(frames))

    def revived(self) -> None:
        """Recovery is to start again after giving up: nothing from before is owed."""
        if self.state is not State.FAILED:
            raise InvalidState(f"revived while the journal is {self.state.name.lower()}")
        self.state = State.RECOVERING
        self.heard_until = self._position
        self._boundary = self._position

    # ------------------------------------------------------------------
    # Outputs
    # ------------------------------------------------------------------

    def to_feed(self) -> list[Entry]:
        """What to hand to the live instance next, in order (each entry once, until a rewind).

        A ``FRAME`` entry is handed out again after a rewind until the caller
        marks it ``fed`` (it is fed once, whatever happens to the instance).
        """
        if self.state is not State.LIVE:
            return []
        out, self._prelude = self._prelude, []
        entries = self._entries
        end = len(entries)
        cursor = self._cursor
        if cursor == end - 1 and not out:
            entry = entries[cursor]  # the common case: the one just accepted
            self._cursor = end
            if entry.kind is EntryKind.FRAME and entry.fed:
                return []
            return [entry]
        while cursor < end:
            entry = entries[cursor]
            cursor += 1
            if entry.kind is EntryKind.FRAME and entry.fed:
                continue  # already went to an instance; frames are fed once
            out.append(entry)
        self._cursor = cursor
        self._trim()
        return out

    @property
    def caught_up(self) -> bool:
        """Whether the live instance was fed everything accepted."""
        return self.state is State.LIVE and self._cursor == len(self._entries) and not self._prelude

    @property
    def held_s(self) -> float:
        """Seconds of caller audio held (not final yet, or within the replay margin)."""
        return self._held_s

    @property
    def position(self) -> float:
        """Seconds of caller audio accepted."""
        return self._position

    @property
    def speaking(self) -> bool:
        """Whether the caller is speaking, as the last VAD frame said."""
        return self._speaking

    def pending_stops(self) -> list[Entry]:
        """VAD stops not passed on yet, in order (the caller marks them ``passed`` as it passes them)."""
        self._stops = [stop for stop in self._stops if not stop.passed]
        return list(self._stops)

    def stops_to_pass(self, *, now: float) -> list[Entry]:
        """The VAD stops that may pass on now, in order, marked ``passed``.

        A stop passes once an instance took it (none can while recovering)
        and, for one that ``waits``, the speech before it is final: a final
        result or a finalize acknowledgement covers it. The speech need not be
        final when the live instance took the stop ``finalize_timeout`` ago
        and owes nothing (no word it showed is not final, no speech went
        unanswered): the provider had nothing to say about the end of it (a
        cough). A stop whose speech is final passes at once, even while
        recovering; any stop passes ``stop_hold_timeout`` after it arrived
        (when its time was given). One that may not pass holds back those
        after it.
        """
        out: list[Entry] = []
        for stop in self.pending_stops():
            if not self._may_pass(stop, now):
                break
            stop.passed = True
            out.append(stop)
        if out:
            self._stops = [stop for stop in self._stops if not stop.passed]
        return out

    def stop_deadline(self) -> float | None:
        """The wall-clock time at which the first VAD stop held back may pass by time alone.

        None when no stop is held, or when only evidence (a final, a
        finalize acknowledgement, a message) or an instance taking it can
        release it.
        """
        stops = self.pending_stops()
        if not stops:
            return None
        stop = stops[0]
        times = []
        if stop.accepted_at is not None:
            times.append(stop.accepted_at + self.stop_hold_timeout)
        if stop.waits and self.state is State.LIVE and stop.taken_at is not None:
            times.append(stop.taken_at + self.finalize_timeout)
        return min(times) if times else None

    def _may_pass(self, stop: Entry, now: float) -> bool:
        if stop.accepted_at is not None and now - stop.accepted_at >= self.stop_hold_timeout - _EPSILON_S:
            return True
        if stop.waits and self.heard_until >= stop.start - stop.stop_secs - _SPEECH_END_TOLERANCE_S:
            return True
        if self.state is not State.LIVE or stop.taken_at is None:
            return False
        if not stop.waits:
            return True
        return now - stop.taken_at >= self.finalize_timeout - _EPSILON_S and not self._owes_results()

    def _owes_results(self) -> bool:
        """Whether the live connection owes results it gave evidence of: a word it showed and has not
        finalized, or speech it has not answered at all."""
        if self._unanswered_since is not None:
            return True
        heard = self.heard_until + _EPSILON_S
        return any(end > heard for end in self._interim_ends)

    def overdue(self, *, now: float) -> str | None:
        """Why the live connection counts as dead, or None while it looks alive."""
        if self.state is not State.LIVE:
            return None
        if self._sending_since is not None and now - self._sending_since > self.send_timeout:
            return f"a send to the provider did not complete within {self.send_timeout:g}s"
        if (
            self.observes_messages
            and self._unanswered_since is not None
            and now - self._unanswered_since > self.stall_timeout
        ):
            return f"nothing from the provider for {self.stall_timeout:g}s after the caller spoke"
        if (
            self.observes_messages
            and self._finalize_since is not None
            and self._finalize_at is not None
            and now - self._finalize_since > self.finalize_timeout
            and self._owes_final(self._connection.to_caller(self._finalize_at))
        ):
            return f"the provider did not finalize the words it had shown within {self.finalize_timeout:g}s"
        return None

    def _owes_final(self, requested: float) -> bool:
        """Whether a word shown in an interim, said before a finalize request at ``requested``, is not final.

        A provider may answer a finalize request with nothing when nothing is
        pending; a word it showed and has not finalized is pending.
        """
        heard = self.heard_until + _EPSILON_S
        return any(heard < end <= requested + _EPSILON_S for end in self._interim_ends)

    def take_dropped(self) -> tuple[float, float]:
        """Seconds of audio dropped over the bound since the last call, and of those, possible speech."""
        dropped = (self._dropped_s, self._dropped_speech_s)
        self._dropped_s = self._dropped_speech_s = 0.0
        self.dropped = False
        return dropped

    # ------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------

    def _check_not_failed(self) -> None:
        if self.state is State.FAILED:
            raise InvalidState("the journal gave up; nothing more is accepted until it is revived")

    def _heard(self, until: float) -> None:
        self._reached(until)
        if until > self.heard_until:
            self.heard_until = until
            if self._vad_seen and not self._speaking:
                self._silence_heard()
            self._trim()

    def _silence_heard(self) -> None:
        """The caller is silent (VAD): once all speech was final, old silence is final too.

        Everything after the speech the VAD stop ended is silence up to now,
        less ``silence_guard_s`` for a VAD start still on its way.
        """
        stop = self._last_stop
        if stop is None:
            return
        position, stop_secs = stop
        if self.heard_until >= position - stop_secs - _SPEECH_END_TOLERANCE_S:
            self.heard_until = max(self.heard_until, self._position - self.silence_guard_s)

    def _replay_index(self) -> int:
        """Index of the first entry a replay feeds: the audio holding the cut, and the cues just before it."""
        cut = self.heard_until - self.replay_margin_s
        entries = self._entries
        index = 0
        for index, entry in enumerate(entries):  # noqa: B007 - the index is the result
            if entry.kind is EntryKind.AUDIO and entry.end > cut + _EPSILON_S:
                break
        else:
            return len(entries)
        start = entries[index].start
        while index > 0 and entries[index - 1].kind is not EntryKind.AUDIO:
            if entries[index - 1].start < start - _EPSILON_S:
                break
            index -= 1
        return index

    def _rewind(self) -> None:
        """Point the feed at the replay, with the caller's state at that point first."""
        index = self._replay_index()
        vad, mute = self._vad_before, self._mute_before
        for position in range(index):
            entry = self._entries[position]
            if entry.kind is EntryKind.CUE:
                if entry.speaking is not None:
                    vad = entry
                elif entry.mute is not None:
                    mute = entry
        prelude = []
        if mute is not None and mute.mute:
            prelude.append(mute)
        if vad is not None and vad.speaking:
            prelude.append(vad)
        self._prelude = prelude
        self._cursor = min(self._cursor, index)
        self._boundary = self.heard_until
        for stop in self._stops:
            stop.taken_at = None  # to be taken again, by the fresh connection
        self._trim()

    def _restore(self) -> None:
        """A new stream starts at the replay: a fresh clock, fresh watchdog state."""
        entries = self._entries
        origin = self._position
        replayed = 0.0
        for position in range(self._cursor, len(entries)):
            entry = entries[position]
            if entry.kind is EntryKind.AUDIO:
                if replayed == 0.0:
                    origin = entry.start
                replayed += entry.duration
        self.replayed_s = replayed
        self.replay_from = origin
        self._connection = _Connection(origin=origin)
        self._unanswered_since = self._unanswered_at = self._sending_since = None
        self._finalize_at = self._finalize_since = None
        self._interim_ends = []
        self._fresh = True
        self._replay_until = self._position
        self._owed_until = None
        self._armed_for_owed = False
        self._covered_until = -math.inf

    def _trim(self) -> None:
        """Forget what was fed and is final (up to the replay margin)."""
        keep = self.heard_until - self.replay_margin_s
        entries = self._entries
        while self._cursor > 0 and entries:
            head = entries[0]
            if head.kind is EntryKind.AUDIO:
                if head.end > keep + _EPSILON_S:
                    return
            else:
                # A cue or frame goes with the audio that follows it.
                follower = next((e for e in entries if e.kind is EntryKind.AUDIO), None)
                if follower is None or follower.end > keep + _EPSILON_S:
                    return
                if head.speaking is not None:
                    self._vad_before = head
                elif head.mute is not None:
                    self._mute_before = head
            entries.popleft()
            self._cursor -= 1
            if head.kind is EntryKind.AUDIO:
                self._held_s -= head.duration

    def _drop_oldest(self) -> None:
        """Drop the oldest audio until within the bound (frames and unpassed cues stay)."""
        kept: deque[Entry] = deque()
        cursor = self._cursor
        for index, entry in enumerate(self._entries):
            over = self._held_s > self.max_buffered_audio_s + _EPSILON_S
            droppable = entry.kind is EntryKind.AUDIO or (
                entry.kind is EntryKind.CUE and entry.passed and entry.mute is None
            )
            if over and droppable and index < len(self._entries) - 1:
                if entry.kind is EntryKind.AUDIO:
                    self._held_s -= entry.duration
                    self._dropped_s += entry.duration
                    if entry.speech:
                        self._dropped_speech_s += entry.duration
                elif entry.speaking is not None:
                    self._vad_before = entry
                if index < self._cursor:
                    cursor -= 1
                self.dropped = True
                continue
            kept.append(entry)
        self._entries = kept
        self._cursor = cursor
