"""Sans-I/O record of what a TTS service was given and what was heard of it.

The :class:`Ledger` knows nothing about sockets, asyncio or Pipecat frames. Its
caller (the shell, :class:`~pipecat_resilient.tts.ResilientTTS`) feeds it what
happens - text accepted from upstream, text handed to the provider, audio and
word timings coming back, a connection lost - and asks it what to do next:
which frames to feed a fresh service instance (:meth:`Ledger.to_feed`), whether
the provider has gone quiet (:meth:`Ledger.overdue`), and what could not be
said when recovery gives up (:meth:`Ledger.gave_up`).

How long "quiet" is, is learned from the provider as it answers
(:mod:`pipecat_resilient._adaptive`): its time to first audio and the gaps in
audio it owed, each smoothed with its deviation as TCP does for its
retransmission timer, between a floor and the configured timeouts as ceilings.

Vocabulary:

* An *utterance* is the unit a listener hears as one piece: an LLM turn (the
  text between ``LLMFullResponseStartFrame`` and ``LLMFullResponseEndFrame``,
  or loose text), or one ``TTSSpeakFrame``.
* The *journal* is everything accepted and not yet settled, in the order it was
  accepted: the start, text and end *pieces* of utterances, and *passthrough*
  frames (anything else the service must pass on in order).
* *Voiced* text is text whose audio is known to have gone downstream. The
  evidence is audio *time* (:mod:`pipecat_resilient._timeline`): the seconds of
  each context's audio pushed downstream, against the word timings the provider
  reported (in whatever grouping and order they came), with an estimate from
  the session's speaking rate past the last timing; and all of a context once
  the provider said it was final and its audio went out. A ``TTSTextFrame`` is
  not evidence: Pipecat force-completes unspoken text into one when a context
  ends, and pushes a provider's timings when they arrive, before or after the
  audio they describe.
* The *context text* is what the shell tells the LLM context the listener heard:
  exactly the voiced text, in order (:meth:`Ledger.context_text`).
* An utterance is *settled* once nothing about it can change any more: its
  closing frame came out of the service, or its context was reported final.
* A *settings update* takes effect at an utterance boundary: one accepted while
  a turn is open waits for the end of that turn, and none is fed until every
  utterance accepted before it is settled (applying it earlier would make a
  provider that reconnects on a new voice cut the utterance in flight).

Time is passed in by the caller (``now``); the ledger never reads a clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum

from pipecat_resilient._adaptive import MIN_TIMEOUT_S, AdaptiveTimeout
from pipecat_resilient._timeline import SpeakingRate, Text, Timeline
from pipecat_resilient.errors import InvalidState
from pipecat_resilient.policy import check_seconds

__all__ = ["Action", "ActionKind", "Ledger", "State", "Utterance", "UtteranceKind"]

# The estimate of what audio covered, for a context with no word timings to
# correct it, assumes speech this much slower than measured (plus the
# measured spread): a word said twice rather than one skipped.
NO_TIMINGS_MARGIN = 0.05

# A context with word timings owes audio (its provider is stalled, when none
# comes) once its handed text's audio, at the fastest plausible rate, is this
# many seconds ahead of what arrived.
OWED_SLACK_S = 0.3


class State(Enum):
    """Where the hosted service stands.

    Parameters:
        LIVE: A service instance is connected and being fed.
        RECOVERING: The last instance was lost; input is journaled until a
            fresh one is connected.
        FAILED: Recovery gave up. Nothing more will be spoken.
    """

    LIVE = "live"
    RECOVERING = "recovering"
    FAILED = "failed"


# Read for every piece of audio: bound once (an Enum class attribute lookup is slow).
_LIVE = State.LIVE


class UtteranceKind(Enum):
    """What kind of input an utterance came from.

    Parameters:
        TURN: LLM text, between response start and end frames or loose.
        SPEAK: One ``TTSSpeakFrame``.
    """

    TURN = "turn"
    SPEAK = "speak"


@dataclass(eq=False)
class Utterance:
    """One utterance in the ledger. Returned by the ledger; do not instantiate directly.

    Attributes:
        kind: Turn or speak.
        text: All text accepted for it so far.
        voiced: How many characters of :attr:`text` are known to be heard (the
            end of a whole word).
        emitted: How many characters of :attr:`text` went to the context.
        closed: Whether all its text has been accepted (end of turn seen).
        settled: Whether nothing about it can change any more.
        source: The frame that opened it (opaque to the ledger).
        interruptible: Whether an interruption discards it.
        push_aggregation: Whether the service commits it to the context on its
            own once spoken (a ``TTSSpeakFrame`` outside a turn).
        downstream_context: The context id under which it started downstream
            (a started frame went out and no stopped frame yet), or None.
    """

    kind: UtteranceKind
    source: object = None
    interruptible: bool = True
    push_aggregation: bool = False
    voiced: int = 0
    emitted: int = 0
    closed: bool = False
    settled: bool = False
    downstream_context: str | None = None
    # Where the feed into the current instance begins (replay start).
    fed_from: int = 0
    # Set once the current instance has processed the closing frame: all text
    # has been handed to the provider, so a final signal is due.
    flushed: bool = False
    # Per-instance evidence, reset when the connection is lost: one timeline
    # per provider context it was handed to.
    timelines: list[Timeline] = field(default_factory=list)
    stopped: bool = False
    # Whether a started frame for it went downstream from an instance that
    # has since been lost (so a replay must not open it again).
    started_before_loss: bool = False
    body: Text = field(default_factory=Text, repr=False)

    @property
    def text(self) -> str:
        """All text accepted for it so far."""
        return str(self.body)

    @property
    def length(self) -> int:
        """Characters accepted so far."""
        return len(self.body)

    def remainder(self) -> str:
        """Text not yet known to be heard, from the first unvoiced word."""
        return self.body.slice(self.body.next_word_start(self.voiced), len(self.body))


class ActionKind(Enum):
    """What the shell must feed the service instance.

    Parameters:
        START: Open the utterance's turn. ``frame`` is the original start frame,
            or None when it already went downstream and a fresh one (to be
            swallowed when it comes back out) must be fed instead.
        TEXT: Feed ``text`` as LLM text of the utterance's turn.
        SPEAK: Feed ``text`` as a ``TTSSpeakFrame`` like the utterance's source.
        FRAME: Feed ``frame`` (a passthrough or closing frame) as it is.
        CLOSE: The utterance started downstream and has nothing left to say:
            feed a stopped frame for its downstream context (and, if it
            commits itself, an assistant aggregation push) so the transport
            and aggregators see it end.
    """

    START = "start"
    TEXT = "text"
    SPEAK = "speak"
    FRAME = "frame"
    CLOSE = "close"


@dataclass(frozen=True, slots=True)
class Action:
    """One thing to feed a service instance, produced by :meth:`Ledger.to_feed`."""

    kind: ActionKind
    utterance: Utterance | None = None
    text: str = ""
    frame: object = None


class _PieceKind(Enum):
    START = "start"
    TEXT = "text"
    END = "end"
    SPEAK = "speak"
    FRAME = "frame"


@dataclass(eq=False, slots=True)
class _Piece:
    kind: _PieceKind
    utterance: Utterance | None = None
    frame: object = None
    # For TEXT pieces: the span of utterance.text they carried.
    begin: int = 0
    end: int = 0
    interruptible: bool = True
    fed: bool = False
    emerged: bool = False
    # A settings update waits for these utterances to settle before it is fed.
    waits_for: tuple[Utterance, ...] = ()
    settings: bool = False

    @property
    def settled(self) -> bool:
        if self.utterance is not None and self.utterance.settled:
            return True
        return self.kind is _PieceKind.FRAME and self.emerged

    @property
    def waiting(self) -> bool:
        """Whether it is a settings update that must still wait for an earlier utterance."""
        return any(not utterance.settled for utterance in self.waits_for)


@dataclass
class _Liveness:
    """Instance-wide evidence that the provider is still talking."""

    pending_since: float | None = None  # earliest handing not followed by audio
    last_activity: float | None = None  # last handing or audio
    # Whether the instance has sent audio since it went live (or since a
    # settings update it may have reconnected for): its first audio may
    # include the provider warming up a connection, so it is timed against
    # the ceiling.
    heard: bool = False
    # When each context's first audio became due (its text was handed, or
    # for a provider that waits for the flush, flushed), until it came.
    due: dict[str, float] = field(default_factory=dict)


@dataclass
class _Journal:
    pieces: deque[_Piece] = field(default_factory=deque)
    by_frame: dict[int, _Piece] = field(default_factory=dict)
    # The pieces not fed yet, in order: the feed cursor (so feeding does not
    # walk the whole journal on every frame).
    unfed: deque[_Piece] = field(default_factory=deque)


class Ledger:
    """Sans-I/O record of text handed to a TTS provider and not yet confirmed heard.

    Feed it events as frames pass (the methods named for what happened), then
    act on what its outputs return: :meth:`to_feed` after any input,
    :meth:`overdue` on a timer, :meth:`gave_up` when recovery ends.

    Example::

        ledger = Ledger(first_audio_timeout=2.0, stall_timeout=2.0)
        u = ledger.speak_accepted(frame, "Hello world.")
        for action in ledger.to_feed():
            ...  # feed the service
        ledger.text_handed(u, "ctx-1", "Hello world.", now=0.0)
        ledger.words_timed("ctx-1", [("Hello", 0.0, 0.5), ("world.", 0.6, 1.2)])
        ledger.audio_pushed("ctx-1", 0.55, now=0.3)   # "Hello" is heard
        ledger.connection_lost(now=0.4)
        ledger.connection_restored()
        [action] = ledger.to_feed()   # SPEAK "world."

    Args:
        first_audio_timeout: Seconds the provider may take to send audio after
            text was handed to it (the ceiling, when ``adaptive_timeouts``).
        stall_timeout: Seconds audio may pause while more is due (the
            ceiling, when ``adaptive_timeouts``).
        speaking_rate: Characters per second the voice speaks at, at its
            slowest, as a start for the session's measured rate (None: nothing
            is estimated until something was measured).
        word_timings: Whether the provider reports word timings. Without
            them, nothing will ever correct an estimate of what audio covered,
            so it assumes speech a little slower still (``NO_TIMINGS_MARGIN``).
        adaptive_timeouts: Whether :meth:`overdue` waits what this provider
            was measured to need rather than the fixed timeouts: its smoothed
            time to first audio (from when audio became due to the context's
            first audio) and smoothed gaps in owed audio, each plus four mean
            deviations and a margin, between ``min_timeout`` and the fixed
            timeouts (see :mod:`pipecat_resilient._adaptive`). The fixed
            timeouts apply until a few waits were measured, to an instance's
            first audio, and to the next wait after a learned timeout ran out.
        min_timeout: The least a learned timeout may be, in seconds (None:
            ``MIN_TIMEOUT_S``, 0.25 s, or the shorter fixed timeout if that is
            less).

    Raises:
        TypeError: ``adaptive_timeouts`` is not a bool.
        ValueError: ``min_timeout`` is not a positive number of seconds, or
            is longer than a fixed timeout.
    """

    def __init__(
        self,
        *,
        first_audio_timeout: float = 2.0,
        stall_timeout: float = 2.0,
        speaking_rate: float | None = None,
        word_timings: bool = True,
        adaptive_timeouts: bool = True,
        min_timeout: float | None = None,
    ) -> None:
        """Create an empty ledger in the LIVE state."""
        self.first_audio_timeout = first_audio_timeout
        self.stall_timeout = stall_timeout
        if not isinstance(adaptive_timeouts, bool):
            raise TypeError(f"adaptive_timeouts must be True or False, got {adaptive_timeouts!r}")
        self.adaptive_timeouts = adaptive_timeouts
        shortest = min(first_audio_timeout, stall_timeout)
        if min_timeout is None:
            min_timeout = min(MIN_TIMEOUT_S, shortest)
        else:
            check_seconds(min_timeout=min_timeout)
            if min_timeout > shortest:
                raise ValueError(
                    f"min_timeout ({min_timeout:g}s) must not be longer than first_audio_timeout "
                    f"({first_audio_timeout:g}s) or stall_timeout ({stall_timeout:g}s): those are the "
                    "ceilings the learned timeouts stay under"
                )
        self.min_timeout = min_timeout
        # What the provider was measured to take: to start speaking text it
        # has, and between pieces of audio it owes. Kept across drops, like
        # the speaking rate (a fresh connection to the same provider answers
        # as fast), and one pair per provider of a fallback chain.
        self._first_audio = AdaptiveTimeout()
        self._gaps = AdaptiveTimeout()
        self._waits: dict[object, tuple[AdaptiveTimeout, AdaptiveTimeout]] = {
            0: (self._first_audio, self._gaps)
        }
        self.word_timings = word_timings
        self.state = State.LIVE
        self._journal = _Journal()
        self._open_turn: Utterance | None = None
        self._contexts: dict[str, tuple[Utterance, Timeline]] = {}
        # Contexts an interruption dropped, until the interruption went downstream.
        self._interrupted: dict[str, tuple[Utterance, Timeline]] = {}
        self._liveness = _Liveness()
        # Seconds of audio per character, over the whole session: drops do
        # not make the provider speak faster.
        self._rate = SpeakingRate()
        if speaking_rate is not None:
            self._rate.assume(speaking_rate)
        self._speaking_rate = speaking_rate
        # One rate per provider of a fallback chain (each has its own voice).
        self._rates: dict[object, SpeakingRate] = {0: self._rate}
        # Settings updates accepted while a turn was open, for after its end.
        self._deferred: list[object] = []
        self._blocked = False

    # ------------------------------------------------------------------
    # Inputs: what arrived from upstream.
    # ------------------------------------------------------------------

    def turn_started(self, frame: object, *, interruptible: bool = True) -> Utterance:
        """An LLM response started (``frame`` is its start frame)."""
        self._close_loose_turn()
        utterance = Utterance(UtteranceKind.TURN, source=frame, interruptible=interruptible)
        self._open_turn = utterance
        self._append(_Piece(_PieceKind.START, utterance, frame, interruptible=interruptible))
        return utterance

    def text_accepted(self, text: str, *, source: object = None, interruptible: bool = True) -> Utterance:
        """LLM (or loose) text arrived for the open turn; opens a loose turn if none is open."""
        utterance = self._open_turn
        if utterance is None:
            utterance = Utterance(UtteranceKind.TURN, source=source, interruptible=interruptible)
            self._open_turn = utterance
        begin = utterance.length
        utterance.body.append(text)
        self._append(
            _Piece(
                _PieceKind.TEXT,
                utterance,
                source,
                begin=begin,
                end=utterance.length,
                interruptible=interruptible,
            )
        )
        return utterance

    def turn_ended(self, frame: object, *, interruptible: bool = True) -> Utterance | None:
        """The open turn ended (``frame`` is its end frame, fed on to the service).

        Returns:
            The turn it closed, or None when no turn was open (the frame is
            then journaled as a passthrough frame).
        """
        utterance = self._open_turn
        if utterance is None:
            self.frame_accepted(frame, interruptible=interruptible)
            return None
        self._open_turn = None
        utterance.closed = True
        self._append(_Piece(_PieceKind.END, utterance, frame, interruptible=interruptible))
        self._flush_deferred()
        return utterance

    def speak_accepted(
        self,
        frame: object,
        text: str,
        *,
        interruptible: bool = True,
        push_aggregation: bool = False,
    ) -> Utterance:
        """A ``TTSSpeakFrame`` arrived: an utterance complete in itself."""
        utterance = Utterance(
            UtteranceKind.SPEAK,
            source=frame,
            interruptible=interruptible,
            push_aggregation=push_aggregation,
            closed=True,
            body=Text(text),
        )
        self._append(_Piece(_PieceKind.SPEAK, utterance, frame, interruptible=interruptible))
        return utterance

    def frame_accepted(
        self, frame: object, *, interruptible: bool = True, closes_turn: bool = False
    ) -> Utterance | None:
        """Any other frame the service must pass on, in order.

        Args:
            frame: The frame.
            interruptible: Whether an interruption discards it.
            closes_turn: Whether it ends the open turn as well (an
                ``EndFrame`` flushes pending text), in which case the turn is
                settled when this frame comes out of the service.

        Returns:
            The turn it closed, if any.
        """
        closed = None
        if closes_turn and self._open_turn is not None:
            closed = self._open_turn
            self._open_turn = None
            closed.closed = True
        self._append(
            _Piece(_PieceKind.END if closed else _PieceKind.FRAME, closed, frame, interruptible=interruptible)
        )
        if closed is not None:
            self._flush_deferred()
        return closed

    def settings_accepted(self, frame: object) -> None:
        """A settings update arrived: it takes effect at the next utterance boundary.

        While a turn is open it waits for the turn's end; then it is fed only
        once every utterance accepted before it is settled (never interrupted
        away, never replayed once fed).
        """
        if self._open_turn is not None:
            self._deferred.append(frame)
        else:
            self._append_settings(frame)

    def _append_settings(self, frame: object) -> None:
        waits_for = tuple(self._unsettled_utterances())
        self._append(
            _Piece(_PieceKind.FRAME, None, frame, interruptible=False, waits_for=waits_for, settings=True)
        )

    def _flush_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for frame in deferred:
            self._append_settings(frame)

    def interrupted(self) -> list[Utterance]:
        """The user interrupted: everything interruptible and unsettled is dropped, never replayed.

        Returns:
            The utterances dropped.
        """
        dropped: list[Utterance] = []
        kept: deque[_Piece] = deque()
        for piece in self._journal.pieces:
            if piece.settled or not piece.interruptible:
                kept.append(piece)
                continue
            self._journal.by_frame.pop(id(piece.frame), None)
            utterance = piece.utterance
            if utterance is not None and not utterance.settled and utterance.interruptible:
                utterance.settled = True
                dropped.append(utterance)
        self._journal.pieces = kept
        still = {id(piece) for piece in kept}
        self._journal.unfed = deque(piece for piece in self._journal.unfed if id(piece) in still)
        if self._open_turn is not None and self._open_turn.interruptible:
            self._open_turn = None
            self._flush_deferred()
        for context_id, entry in list(self._contexts.items()):
            if entry[0].settled:
                # Audio of it already on its way downstream still reaches the
                # listener, until the interruption itself does: what it covers
                # is still told to the context (see interruption_passed()).
                self._interrupted[context_id] = self._contexts.pop(context_id)
                self._liveness.due.pop(context_id, None)
        self._trim()
        if not self._expecting_audio():
            self._liveness.pending_since = None
        return list(dict.fromkeys(dropped))

    def interruption_passed(self) -> None:
        """The interruption went downstream: audio of what it dropped no longer counts."""
        self._interrupted.clear()

    # ------------------------------------------------------------------
    # Inputs: what the live service instance did.
    # ------------------------------------------------------------------

    def text_handed(
        self,
        utterance: Utterance | None,
        context_id: str,
        text: str,
        *,
        now: float,
        audio_due: bool = True,
    ) -> None:
        """The live instance handed ``text`` to its provider under ``context_id``.

        Args:
            utterance: The utterance being processed when it did, if known.
            context_id: The provider context id it used.
            text: The text, as sent (possibly transformed).
            now: Current time in seconds.
            audio_due: Whether the provider starts speaking on text alone
                (False for one that waits for a flush at the end of the turn:
                the wait for its first audio starts at the flush).
        """
        self._require(State.LIVE, "text handed")
        if utterance is not None and not utterance.settled:
            entry = self._contexts.get(context_id)
            if entry is None or entry[0] is not utterance:
                # Its speech in this context starts where its text handed to
                # this instance so far ends.
                last = utterance.timelines[-1] if utterance.timelines else None
                body = utterance.body
                base = last.handed_end if last is not None else body.next_word_start(utterance.fed_from)
                entry = (utterance, Timeline(utterance.body, base))
                utterance.timelines.append(entry[1])
                self._contexts[context_id] = entry
            entry[1].handed(len(text.split()), text)
            utterance.stopped = False
            if audio_due and entry[1].audio_s == 0:
                self._liveness.due.setdefault(context_id, now)
        liveness = self._liveness
        if audio_due and liveness.pending_since is None:
            liveness.pending_since = now
        liveness.last_activity = now

    def closing_processed(self, utterance: Utterance, *, now: float | None = None) -> None:
        """The live instance finished processing the utterance's closing frame.

        All of its text has been handed over (or dropped as empty), so the
        provider owes a final signal for it, and audio, if none came yet.
        """
        if utterance.settled:
            return
        utterance.flushed = True
        silent = any(t.handed_words and t.audio_s == 0 for t in utterance.timelines)
        if now is not None and silent and self._liveness.pending_since is None:
            self._liveness.pending_since = now
        if now is not None and silent:
            # A provider that waits for the flush owes its first audio from now.
            for context_id, (owner, timeline) in self._contexts.items():
                if owner is utterance and timeline.handed_words and timeline.audio_s == 0:
                    self._liveness.due.setdefault(context_id, now)

    def audio_pushed(
        self,
        context_id: str | None,
        seconds: float,
        *,
        now: float,
        silence: float | Callable[[], float] = 0.0,
    ) -> Utterance | None:
        """``seconds`` of audio for ``context_id`` (``silence`` of it silent) went downstream.

        ``silence`` may be a callable that measures it, called only if an
        estimate of what was heard needs it.

        Counted whether the instance is live or being drained after a failure
        (what it had received is heard either way).

        Returns:
            The utterance whose voiced text moved on (its new text is due to
            the context: :meth:`context_text`), or None.
        """
        liveness = self._liveness
        if self.state is _LIVE and self.adaptive_timeouts:
            self._measure(context_id, now)
        liveness.pending_since = None
        liveness.last_activity = now
        liveness.heard = True
        entry = self._entry(context_id)
        if entry is None:
            return None
        entry[1].audio(seconds, silence)
        return entry[0] if self._update_voiced(entry[0]) else None

    def _measure(self, context_id: str | None, now: float) -> None:
        """Learn from audio arriving on the live instance how long this provider makes its waits."""
        liveness = self._liveness
        due = liveness.due.pop(context_id, None) if context_id else None
        if due is not None:
            # The context's first audio: how long the provider took to start
            # on text it had (never shorter than the watchdog's own wait,
            # which starts at a handing or flush no earlier than this).
            self._first_audio.measured(now - due)
        elif liveness.last_activity is not None and (
            liveness.pending_since is not None or self._expecting_audio()
        ):
            # More audio while some was owed: a wait the stall watchdog timed.
            self._gaps.measured(now - liveness.last_activity)

    def _entry(self, context_id: str | None) -> tuple[Utterance, Timeline] | None:
        """A context's utterance and timeline (an interrupted one's too, until the interruption passed)."""
        if not context_id:
            return None
        return self._contexts.get(context_id) or self._interrupted.get(context_id)

    def words_timed(
        self,
        context_id: str | None,
        words: list[tuple[str, float, float | None]],
        *,
        last_partial: bool = False,
    ) -> Utterance | None:
        """The provider timed words of ``context_id`` (sent before or after their audio, in any grouping).

        Args:
            context_id: The provider context.
            words: ``(word, start, end)`` in seconds from the context's audio
                start, in order; ``end`` None when only starts are given.
            last_partial: The last entry is the beginning of a word whose
                audio is still arriving (``end`` is where that audio ends).

        Returns:
            The utterance whose voiced text moved on, or None.
        """
        entry = self._entry(context_id)
        if entry is None or entry[0].settled and context_id not in self._interrupted:
            return None
        timeline = entry[1]
        reached = timeline.anchors_reached
        timeline.timed_words(words, self._rate, last_partial=last_partial)
        if timeline.anchors_reached == reached:
            # Timings ahead of their audio (the usual order): nothing more is
            # known to be heard until that audio goes downstream (which
            # updates it, as a drain does before a replay is worked out).
            return None
        return entry[0] if self._update_voiced(entry[0]) else None

    def context_stopped(self, context_id: str | None) -> Utterance | None:
        """The provider reported ``context_id`` final, and all its audio went downstream.

        Returns:
            The utterance it belongs to, if known.
        """
        entry = self._contexts.pop(context_id, None) if context_id else None
        if entry is None:
            return None
        self._liveness.due.pop(context_id or "", None)
        utterance, timeline = entry
        utterance.stopped = True
        timeline.final = True
        if not timeline.timed and timeline.audio_s > 0:
            # A provider without word timings teaches the rate here.
            # Speech only: estimates count speech (see Timeline.voiced_end).
            self._rate.add(timeline.audio_s - timeline.silence_s, timeline.handed_end - timeline.base)
        self._update_voiced(utterance)
        if utterance.flushed:
            # Everything was handed over and all of it was synthesized.
            utterance.voiced = utterance.length
            if utterance.kind is UtteranceKind.SPEAK:
                self._settle(utterance)
        return utterance

    def context_text(self, utterance: Utterance) -> str:
        """The utterance's voiced text not yet given to the context; now counted as given.

        The shell turns it into ``TTSTextFrame`` s: the context hears of a word
        only once its audio went downstream.
        """
        if utterance.voiced <= utterance.emitted:
            return ""
        text = utterance.body.slice(utterance.emitted, utterance.voiced)
        utterance.emitted = utterance.voiced
        return text

    def pending_context_text(self) -> list[tuple[Utterance, str]]:
        """Every unsettled utterance's voiced text not yet given to the context (after a drain)."""
        due = []
        for utterance in self._unsettled_utterances():
            self._update_voiced(utterance)  # (timings that came after the last audio)
            text = self.context_text(utterance)
            if text.strip():
                due.append((utterance, text))
        return due

    def _update_voiced(self, utterance: Utterance) -> bool:
        """Move the utterance's voiced cursor to what its timelines show; True if it moved."""
        best = utterance.voiced
        margin = 0.0 if self.word_timings else NO_TIMINGS_MARGIN
        for timeline in utterance.timelines:
            best = max(best, timeline.voiced_end(self._rate, margin=margin))
        if best <= utterance.voiced:
            return False
        utterance.voiced = best
        return True

    def frame_emerged(self, frame: object) -> bool:
        """A journaled frame came out of the live instance.

        Returns:
            True when the frame was journaled (and is now settled).
        """
        piece = self._journal.by_frame.pop(id(frame), None)
        if piece is None:
            return False
        piece.emerged = True
        if piece.kind is _PieceKind.END and piece.utterance is not None:
            # A turn's closing frame is queued behind its audio, so all of the
            # turn that will ever be heard has gone downstream.
            self._settle(piece.utterance)
        self._trim()
        return True

    def started_downstream(self, utterance: Utterance, context_id: str) -> None:
        """A started frame for the utterance went downstream under ``context_id``."""
        utterance.downstream_context = context_id

    def stopped_downstream(self, utterance: Utterance) -> None:
        """A stopped frame for the utterance went downstream."""
        utterance.downstream_context = None
        utterance.started_before_loss = False

    def utterance_for(self, context_id: str | None) -> Utterance | None:
        """The utterance a provider context id belongs to, if known."""
        entry = self._contexts.get(context_id) if context_id else None
        return entry[0] if entry is not None else None

    # ------------------------------------------------------------------
    # Inputs: connection changes.
    # ------------------------------------------------------------------

    def use_provider(self, key: object, *, word_timings: bool) -> None:
        """Evidence from here on comes from provider ``key`` of a fallback chain (its own speaking rate)."""
        self.word_timings = word_timings
        rate = self._rates.get(key)
        if rate is None:
            rate = self._rates[key] = SpeakingRate()
            if self._speaking_rate is not None:
                rate.assume(self._speaking_rate)
        self._rate = rate
        self._first_audio, self._gaps = self._waits.setdefault(key, (AdaptiveTimeout(), AdaptiveTimeout()))

    def connection_lost(self, *, now: float) -> None:
        """The live instance failed; nothing more is handed to it.

        Audio it had already received may still come out of it (the shell
        drains it, so none of it is wasted): evidence keeps being recorded
        until :meth:`drained`. What to replay is worked out at
        :meth:`connection_restored`, from all of that evidence.
        """
        self._require(State.LIVE, "connection lost")
        self.state = State.RECOVERING
        self._liveness = _Liveness()
        for piece in self._journal.pieces:
            piece.fed = False
        self._journal.unfed = deque(piece for piece in self._journal.pieces if not piece.settled)

    def drained(self) -> None:
        """The lost instance has pushed out everything it had received; forget its contexts."""
        self._contexts.clear()
        self._interrupted.clear()
        for utterance in self._unsettled_utterances():
            self._update_voiced(utterance)  # (timings that came after the last audio)
            utterance.flushed = False
            utterance.timelines = []
            utterance.stopped = False

    def connection_restored(self) -> None:
        """A fresh instance is connected; :meth:`to_feed` now returns the replay."""
        self._require(State.RECOVERING, "connection restored")
        if self._contexts:
            self.drained()
        self.state = State.LIVE
        self._liveness = _Liveness()
        for utterance in self._unsettled_utterances():
            utterance.fed_from = utterance.body.next_word_start(utterance.voiced)
            utterance.started_before_loss = utterance.downstream_context is not None

    # ------------------------------------------------------------------
    # Outputs.
    # ------------------------------------------------------------------

    def to_feed(self) -> list[Action]:
        """What to feed the live instance now, in order; marks it fed.

        Returns an empty list unless the ledger is LIVE. Right after
        :meth:`connection_restored` this is the replay: the unvoiced remainder
        of every unsettled utterance (from the first word without audio), and
        every frame that had not come out of the lost instance.
        """
        self._blocked = False
        if self.state is not State.LIVE:
            return []
        actions: list[Action] = []
        unfed = self._journal.unfed
        while unfed:
            piece = unfed[0]
            if piece.fed or piece.settled:
                unfed.popleft()
                continue
            if piece.waits_for and piece.waiting:
                # A settings update waits for the boundary, and so does
                # everything after it.
                self._blocked = True
                break
            unfed.popleft()
            piece.fed = True
            if piece.settings:
                # A new voice or model may reconnect the instance, and answer
                # at another pace: its next first audio is timed against the
                # ceiling (and measured, which widens the timeout if slower).
                self._liveness.heard = False
            action = self._action_for(piece)
            if action is not None:
                actions.append(action)
        return actions

    def overdue(self, *, now: float) -> str | None:
        """Whether the live instance has gone quiet while it owes audio.

        Returns:
            Why it is considered stalled, or None while it is fine.
        """
        if self.state is not State.LIVE:
            return None
        liveness = self._liveness
        first_audio, stall = self.timeouts
        if liveness.pending_since is not None:
            if now - liveness.pending_since > first_audio:
                learned = first_audio < self.first_audio_timeout
                if learned:
                    # TCP backs its timer off after a timeout; the next wait
                    # is timed against the ceiling until one is measured.
                    self._first_audio.expired()
                note = self._learned(learned)
                return f"no audio within {first_audio:.3g}s of text being handed over{note}"
            return None
        if liveness.last_activity is None or not self._expecting_audio():
            return None
        if now - liveness.last_activity > stall:
            learned = stall < self.stall_timeout
            if learned:
                self._gaps.expired()
                self._first_audio.expired()
            return f"audio stalled for more than {stall:.3g}s{self._learned(learned)}"
        return None

    @property
    def timeouts(self) -> tuple[float, float]:
        """The first-audio and stall timeouts :meth:`overdue` applies to the live instance now (seconds).

        The fixed ones, unless ``adaptive_timeouts``: then what this provider
        was measured to need, once learned and once the instance has sent
        audio (its first audio may include warming up a fresh connection).
        """
        first_audio, stall = self.first_audio_timeout, self.stall_timeout
        if not self.adaptive_timeouts or not self._liveness.heard:
            return first_audio, stall
        floor = self.min_timeout
        learned_first = self._first_audio.timeout(floor=floor, ceiling=first_audio)
        # A pause in audio that is owed may be the provider starting on the
        # next piece of text: it may take as long as a first audio.
        learned_stall = max(
            self._gaps.timeout(floor=floor, ceiling=stall),
            self._first_audio.timeout(floor=floor, ceiling=stall),
        )
        return learned_first, learned_stall

    @property
    def shortest_timeout(self) -> float:
        """The shortest wait :meth:`overdue` may ever time (seconds): how often to ask it."""
        shortest = min(self.first_audio_timeout, self.stall_timeout)
        return min(shortest, self.min_timeout) if self.adaptive_timeouts else shortest

    def _learned(self, learned: bool) -> str:
        """What a learned timeout was learned from, for the reason :meth:`overdue` gives."""
        if not learned:
            return ""
        parts = []
        for what, estimate in (("first audio", self._first_audio), ("pauses in audio", self._gaps)):
            smoothed, deviation = estimate.smoothed, estimate.deviation
            if smoothed is not None and deviation is not None:
                parts.append(f"{what} {smoothed * 1000:.0f} ± {deviation * 1000:.0f} ms")
        return f" (learned from this provider: {', '.join(parts)})"

    def gave_up(self) -> tuple[list[str], list[object]]:
        """Recovery gave up: empty the journal.

        Returns:
            The unheard text of every unsettled utterance, and every journaled
            frame that never came out of a service (to be passed on directly,
            in order).
        """
        unspoken: list[str] = []
        frames: list[object] = []
        seen: set[int] = set()
        for piece in self._journal.pieces:
            utterance = piece.utterance
            if utterance is not None and not utterance.settled and id(utterance) not in seen:
                seen.add(id(utterance))
                text = utterance.remainder().strip()
                if text:
                    unspoken.append(text)
            if piece.kind in (_PieceKind.START, _PieceKind.END, _PieceKind.FRAME) and not piece.emerged:
                if piece.frame is not None:
                    frames.append(piece.frame)
        for piece in self._journal.pieces:
            if piece.utterance is not None:
                piece.utterance.settled = True
        frames.extend(self._deferred)
        self._deferred = []
        self._blocked = False
        self._journal = _Journal()
        self._contexts.clear()
        self._interrupted.clear()
        self._open_turn = None
        self.state = State.FAILED
        return unspoken, frames

    def revived(self) -> None:
        """Leave the FAILED state: a fresh instance is about to be connected."""
        self._require(State.FAILED, "revived")
        self.state = State.RECOVERING

    def open_downstream(self) -> list[Utterance]:
        """Unsettled utterances that started downstream and did not stop."""
        return [u for u in self._unsettled_utterances() if u.downstream_context is not None]

    def awaiting_commit(self) -> bool:
        """Whether a ``TTSSpeakFrame`` that commits itself has words not yet given to the context."""
        return any(
            u.kind is UtteranceKind.SPEAK and u.push_aggregation and u.emitted < u.length
            for u in self._unsettled_utterances()
        )

    @property
    def blocked(self) -> bool:
        """Whether :meth:`to_feed` stopped at a settings update waiting for an utterance to settle.

        Call :meth:`to_feed` again once one has (its end came out, its context
        was final, or an interruption dropped it).
        """
        return self._blocked

    @property
    def in_flight(self) -> int:
        """Number of journaled pieces (memory use grows with this only)."""
        return len(self._journal.pieces)

    @property
    def open_turn(self) -> Utterance | None:
        """The turn currently accepting text, if any."""
        return self._open_turn

    # ------------------------------------------------------------------
    # Internals.
    # ------------------------------------------------------------------

    def _action_for(self, piece: _Piece) -> Action | None:
        utterance = piece.utterance
        kind = piece.kind
        if kind is _PieceKind.FRAME:
            return Action(ActionKind.FRAME, frame=piece.frame)
        assert utterance is not None
        if kind is _PieceKind.START:
            if not piece.emerged:
                return Action(ActionKind.START, utterance, frame=piece.frame)
            # The start already went downstream. The fresh instance still needs
            # one to keep the rest of the turn in one context, unless nothing
            # of the turn is left to say.
            if utterance.closed and not utterance.remainder().strip():
                return None
            return Action(ActionKind.START, utterance)
        body = utterance.body
        if kind is _PieceKind.TEXT:
            if utterance.fed_from <= piece.begin:
                # Fed whole: the original frame can go as it is.
                return Action(ActionKind.TEXT, utterance, body.slice(piece.begin, piece.end), piece.frame)
            text = body.slice(utterance.fed_from, piece.end)
            return Action(ActionKind.TEXT, utterance, text=text) if text else None
        if kind is _PieceKind.SPEAK:
            text = body.slice(utterance.fed_from, len(body))
            if text.strip():
                whole = utterance.fed_from == 0
                return Action(ActionKind.SPEAK, utterance, text=text, frame=piece.frame if whole else None)
            # Nothing left to say. If it started downstream, it must still be
            # seen to stop; either way it is done.
            close = utterance.downstream_context is not None
            self._settle(utterance)
            return Action(ActionKind.CLOSE, utterance) if close else None
        # END: the closing frame. A turn that started downstream on a lost
        # instance and has nothing left to say is closed first.
        rest = body.slice(utterance.fed_from, len(body))
        if utterance.started_before_loss and not rest.strip():
            utterance.started_before_loss = False
            return Action(ActionKind.CLOSE, utterance, frame=piece.frame)
        if piece.frame is None:
            return None
        return Action(ActionKind.FRAME, utterance, frame=piece.frame)

    def _append(self, piece: _Piece) -> None:
        self._journal.pieces.append(piece)
        self._journal.unfed.append(piece)
        if piece.frame is not None and piece.kind in (_PieceKind.START, _PieceKind.END, _PieceKind.FRAME):
            self._journal.by_frame[id(piece.frame)] = piece

    def _settle(self, utterance: Utterance) -> None:
        utterance.settled = True
        for context_id in [c for c, (u, _) in self._contexts.items() if u is utterance]:
            del self._contexts[context_id]
            self._liveness.due.pop(context_id, None)
        self._trim()

    def _trim(self) -> None:
        """Forget settled pieces at the head of the journal."""
        pieces = self._journal.pieces
        while pieces and pieces[0].settled:
            piece = pieces.popleft()
            if piece.frame is not None:
                self._journal.by_frame.pop(id(piece.frame), None)

    def _close_loose_turn(self) -> None:
        # Loose text before a response start stays with what it was: the
        # service speaks it as part of whatever comes next, and so do we.
        if self._open_turn is not None and self._open_turn.source is None:
            self._open_turn.closed = True
            self._open_turn = None
            self._flush_deferred()

    def _unsettled_utterances(self) -> Iterator[Utterance]:
        seen: set[int] = set()
        for piece in self._journal.pieces:
            utterance = piece.utterance
            if utterance is not None and not utterance.settled and id(utterance) not in seen:
                seen.add(id(utterance))
                yield utterance

    def _expecting_audio(self) -> bool:
        """Whether some utterance handed to the live instance still owes audio."""
        for utterance, timeline in self._contexts.values():
            if utterance.settled or utterance.stopped or timeline.handed_words == 0:
                continue
            if utterance.flushed:
                return True
            # With word timings, handed text whose audio clearly has not come
            # means audio is due. (Without them, only the final signal is.)
            if timeline.owes_audio(self._rate, slack_s=OWED_SLACK_S):
                return True
        return False

    def _require(self, state: State, what: str) -> None:
        if self.state is not state:
            raise InvalidState(f"{what} while {self.state.name.lower()}")
