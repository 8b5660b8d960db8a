"""Sans-I/O record of LLM inferences in flight: what was asked, what came back, what to ask again.

The :class:`InferenceJournal` is the LLM counterpart of the TTS
:class:`~pipecat_resilient.ledger.Ledger`. Its caller (the shell,
:class:`~pipecat_resilient.llm.ResilientLLM`) feeds it what happens - a
context frame asking for an answer, the answer starting, its text going
downstream, function calls being dispatched, the stream ending, the
connection being lost - and acts on what it returns: what to feed a fresh
instance (:meth:`InferenceJournal.to_feed`), whether the provider has gone
quiet (:meth:`InferenceJournal.overdue`).

An *inference* is one ``LLMContextFrame`` and the answer it produces. After a
drop it is replayed:

* **whole** when nothing of its answer went downstream yet - invisible to
  everyone downstream;
* as a **continuation** of the text already emitted, when the policy says
  ``continue`` (the default): the model is asked to go on from there, and an
  :class:`OverlapTrimmer` removes any beginning it repeats;
* **restarted** when the policy says ``restart``: the cut answer is closed and
  a whole new one is asked for;
* **never** once its function calls were dispatched: a function must not run
  twice because of a reconnect.

Time is passed in by the caller; nothing here reads a clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from pipecat_resilient.errors import InvalidState
from pipecat_resilient.ledger import State

__all__ = ["Inference", "InferenceAction", "InferenceActionKind", "InferenceJournal", "OverlapTrimmer"]


class OverlapTrimmer:
    """Drop the start of a continuation that repeats the end of what was already said.

    Holds the continuation's first characters only while they could still be
    a repetition of at least ``min_overlap`` characters of ``emitted``'s end,
    then releases everything after the longest such repetition. A genuine
    continuation is released as soon as it stops matching, usually within a
    token or two.

    Args:
        emitted: The text already emitted.
        min_overlap: Shorter repetitions are left alone (a word that merely
            happens to recur is not a repetition).
        window: How much of the end of ``emitted`` to compare against.
    """

    def __init__(self, emitted: str, *, min_overlap: int = 12, window: int = 400) -> None:
        """Start trimming a continuation of ``emitted``."""
        self._tail = emitted[-window:]
        self._min = min_overlap
        self._held = ""
        self._decided = False
        self.trimmed = ""

    def feed(self, text: str) -> str:
        """Take the next piece of the continuation; return what may be passed on now."""
        if self._decided:
            return text
        self._held += text
        overlap = self._overlap(final=False)
        if overlap is None:
            return ""
        return self._release(overlap)

    def finish(self) -> str:
        """The continuation ended: release whatever is still held."""
        if self._decided:
            return ""
        overlap = self._overlap(final=True)
        return self._release(overlap or 0)

    def _release(self, overlap: int) -> str:
        self._decided = True
        self.trimmed = self._held[:overlap]
        released, self._held = self._held[overlap:], ""
        return released

    def _overlap(self, *, final: bool) -> int | None:
        """Length of the repeated prefix, or None while it cannot be told yet."""
        held, tail = self._held, self._tail
        best = 0
        for start in range(len(tail)):
            suffix = tail[start:]
            if len(suffix) < self._min:
                break
            if held.startswith(suffix):
                best = max(best, len(suffix))
            elif not final and suffix.startswith(held):
                # The held text may be the beginning of this suffix repeated.
                return None
        return best


class InferenceActionKind(Enum):
    """What the shell must feed the instance.

    Parameters:
        CONTEXT: The inference's context frame, as it came.
        CONTINUE: A context asking to continue ``text`` (the emitted answer).
        CLOSE: Close the cut answer downstream (an end-of-response frame).
        FRAME: A passthrough frame, as it came.
    """

    CONTEXT = "context"
    CONTINUE = "continue"
    CLOSE = "close"
    FRAME = "frame"


@dataclass(frozen=True, slots=True)
class InferenceAction:
    """One thing to feed, produced by :meth:`InferenceJournal.to_feed`."""

    kind: InferenceActionKind
    inference: Inference | None = None
    frame: object = None
    text: str = ""


@dataclass(eq=False)
class Inference:
    """One request for an answer. Returned by the journal; do not instantiate directly.

    Attributes:
        frame: The context frame that asked for it (opaque to the journal).
        direction: The direction it travelled (opaque).
        emitted: Answer text that went downstream, over every instance.
        started_downstream: Whether an answer start went downstream.
        committed: Whether its function calls were dispatched (never re-run).
        settled: Whether it is over.
        replays: How many times it was fed again after a drop.
    """

    frame: object
    direction: object = None
    interruptible: bool = True
    emitted: str = ""
    started_downstream: bool = False
    committed: bool = False
    settled: bool = False
    replays: int = 0
    trimmer: OverlapTrimmer | None = None
    # Per instance, reset when the connection is lost.
    started_at: float | None = None
    first_chunk_at: float | None = None
    last_chunk_at: float | None = None
    stream_ended: bool = False


@dataclass(eq=False, slots=True)
class _Piece:
    inference: Inference | None = None
    frame: object = None
    interruptible: bool = True
    fed: bool = False
    emerged: bool = False

    @property
    def settled(self) -> bool:
        if self.inference is not None:
            return self.inference.settled
        return self.emerged


@dataclass
class _Journal:
    pieces: deque[_Piece] = field(default_factory=deque)
    by_frame: dict[int, _Piece] = field(default_factory=dict)


class InferenceJournal:
    """Sans-I/O record of inferences and frames handed to an LLM service.

    Args:
        first_token_timeout: Seconds an inference may wait for its first chunk
            once the service started on it.
        stall_timeout: Seconds a started stream may go without a chunk.
        restart: Restart cut answers instead of continuing them.
    """

    def __init__(
        self, *, first_token_timeout: float = 5.0, stall_timeout: float = 3.0, restart: bool = False
    ) -> None:
        """Create an empty journal in the LIVE state."""
        self.first_token_timeout = first_token_timeout
        self.stall_timeout = stall_timeout
        self.restart = restart
        self.state = State.LIVE
        self._journal = _Journal()

    # -- inputs from upstream ------------------------------------------------

    def context_accepted(
        self, frame: object, direction: object = None, *, interruptible: bool = True
    ) -> Inference:
        """A context frame asking for an answer arrived."""
        inference = Inference(frame, direction, interruptible)
        self._journal.pieces.append(_Piece(inference, frame, interruptible))
        return inference

    def frame_accepted(self, frame: object, *, interruptible: bool = True) -> None:
        """Any other frame the service must pass on, in order."""
        piece = _Piece(None, frame, interruptible)
        self._journal.pieces.append(piece)
        self._journal.by_frame[id(frame)] = piece

    def interrupted(self) -> list[Inference]:
        """The user interrupted: interruptible unsettled work is dropped, never replayed."""
        dropped: list[Inference] = []
        kept: deque[_Piece] = deque()
        for piece in self._journal.pieces:
            if piece.settled or not piece.interruptible:
                kept.append(piece)
                continue
            self._journal.by_frame.pop(id(piece.frame), None)
            if piece.inference is not None:
                piece.inference.settled = True
                dropped.append(piece.inference)
        self._journal.pieces = kept
        self._trim()
        return dropped

    # -- inputs from the live instance ------------------------------------

    def processing_started(self, inference: Inference, *, now: float) -> None:
        """The live instance started working on ``inference`` (its clock starts)."""
        inference.started_at = now

    def response_started(self, inference: Inference) -> bool:
        """An answer start came out for ``inference``.

        Returns:
            True to pass it downstream, False to drop it (the answer already
            started downstream, from an instance since lost).
        """
        if inference.started_downstream:
            return False
        inference.started_downstream = True
        return True

    def chunk_received(self, inference: Inference, *, now: float) -> None:
        """A chunk of the answer (text or function-call data) arrived."""
        if inference.first_chunk_at is None:
            inference.first_chunk_at = now
        inference.last_chunk_at = now

    def text_emitted(self, inference: Inference, text: str, *, now: float) -> None:
        """Answer text went downstream."""
        inference.emitted += text
        self.chunk_received(inference, now=now)

    def stream_ended(self, inference: Inference) -> None:
        """The provider finished the answer's stream."""
        inference.stream_ended = True

    def functions_started(self, inference: Inference) -> None:
        """Function calls of ``inference`` were dispatched: it must never run again."""
        inference.committed = True
        inference.stream_ended = True

    def response_ended(self, inference: Inference) -> None:
        """The answer's end came out: the inference is over."""
        inference.settled = True
        self._trim()

    def frame_emerged(self, frame: object) -> bool:
        """A journaled frame came out of the live instance."""
        piece = self._journal.by_frame.pop(id(frame), None)
        if piece is None:
            return False
        piece.emerged = True
        self._trim()
        return True

    # -- connection changes ---------------------------------------------------

    def connection_lost(self, *, now: float) -> None:
        """The live instance failed; everything unsettled must be fed again."""
        self._require(State.LIVE, "connection lost")
        self.state = State.RECOVERING
        for piece in self._journal.pieces:
            piece.fed = False
            inference = piece.inference
            if inference is not None and not inference.settled:
                inference.started_at = inference.first_chunk_at = inference.last_chunk_at = None
                inference.stream_ended = False
                inference.trimmer = None

    def connection_restored(self) -> None:
        """A fresh instance is connected; :meth:`to_feed` now returns the replay."""
        self._require(State.RECOVERING, "connection restored")
        self.state = State.LIVE

    def revived(self) -> None:
        """Leave the FAILED state: a fresh instance is about to be connected."""
        self._require(State.FAILED, "revived")
        self.state = State.RECOVERING

    # -- outputs --------------------------------------------------------------

    def to_feed(self) -> list[InferenceAction]:
        """What to feed the live instance now, in order; marks it fed."""
        if self.state is not State.LIVE:
            return []
        actions: list[InferenceAction] = []
        for piece in list(self._journal.pieces):
            if piece.fed or piece.settled:
                continue
            piece.fed = True
            inference = piece.inference
            if inference is None:
                actions.append(InferenceAction(InferenceActionKind.FRAME, frame=piece.frame))
                continue
            actions.extend(self._replay(inference))
        self._trim()
        return actions

    def _replay(self, inference: Inference) -> list[InferenceAction]:
        first_time = not inference.started_downstream and not inference.emitted
        if not first_time:
            inference.replays += 1
        if inference.committed:
            # Its function calls ran on the lost instance; running it again
            # would run them twice. Close the answer and let it go.
            inference.settled = True
            if inference.started_downstream:
                return [InferenceAction(InferenceActionKind.CLOSE, inference)]
            return []
        if not inference.emitted:
            return [InferenceAction(InferenceActionKind.CONTEXT, inference, inference.frame)]
        if self.restart:
            # Close the cut answer; the new one starts from scratch, downstream too.
            inference.started_downstream = False
            inference.emitted = ""
            return [
                InferenceAction(InferenceActionKind.CLOSE, inference),
                InferenceAction(InferenceActionKind.CONTEXT, inference, inference.frame),
            ]
        return [InferenceAction(InferenceActionKind.CONTINUE, inference, inference.frame, inference.emitted)]

    def overdue(self, *, now: float) -> str | None:
        """Whether the inference the live instance is working on has gone quiet."""
        if self.state is not State.LIVE:
            return None
        for piece in self._journal.pieces:
            inference = piece.inference
            if inference is None or inference.settled or inference.started_at is None:
                continue
            if inference.stream_ended or inference.committed:
                continue
            if inference.first_chunk_at is None:
                if now - inference.started_at > self.first_token_timeout:
                    return f"no first token within {self.first_token_timeout:g}s"
            elif inference.last_chunk_at is not None and now - inference.last_chunk_at > self.stall_timeout:
                return f"answer stream stalled for more than {self.stall_timeout:g}s"
        return None

    def gave_up(self) -> tuple[list[Inference], list[object]]:
        """Recovery gave up: empty the journal.

        Returns:
            The inferences left unanswered, and the journaled frames that never
            came out of a service (to be passed on directly, in order).
        """
        lost: list[Inference] = []
        frames: list[object] = []
        for piece in self._journal.pieces:
            if piece.inference is not None:
                if not piece.inference.settled:
                    lost.append(piece.inference)
                    piece.inference.settled = True
            elif not piece.emerged:
                frames.append(piece.frame)
        self._journal = _Journal()
        self.state = State.FAILED
        return lost, frames

    @property
    def in_flight(self) -> int:
        """Number of journaled pieces (memory use grows with this only)."""
        return len(self._journal.pieces)

    # -- internals ------------------------------------------------------------

    def _trim(self) -> None:
        pieces = self._journal.pieces
        while pieces and pieces[0].settled:
            piece = pieces.popleft()
            self._journal.by_frame.pop(id(piece.frame), None)

    def _require(self, state: State, what: str) -> None:
        if self.state is not state:
            raise InvalidState(f"{what} while {self.state.name.lower()}")
