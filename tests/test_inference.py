"""The inference journal and the overlap trimmer, driven synchronously."""

from __future__ import annotations

import pytest

from pipecat_resilient.errors import InvalidState
from pipecat_resilient.inference import InferenceActionKind, InferenceJournal, OverlapTrimmer
from pipecat_resilient.ledger import State


class F:
    """A stand-in frame."""


def feed(journal: InferenceJournal) -> list[str]:
    return [a.kind.value for a in journal.to_feed()]


def test_trimmer_passes_a_genuine_continuation_at_once() -> None:
    """A continuation that does not repeat anything is released as soon as that is clear."""
    trimmer = OverlapTrimmer("The cheapest flight leaves at seven")
    out = trimmer.feed(" and")
    out += trimmer.feed(" costs two hundred dollars.")
    out += trimmer.finish()
    assert out == " and costs two hundred dollars."
    assert trimmer.trimmed == ""


def test_trimmer_drops_a_repeated_tail() -> None:
    """A continuation that restarts the last words has them removed."""
    trimmer = OverlapTrimmer("The cheapest flight leaves at seven")
    out = "".join(trimmer.feed(piece) for piece in ["flight ", "leaves ", "at seven", " and costs less."])
    out += trimmer.finish()
    assert out == " and costs less."
    assert trimmer.trimmed == "flight leaves at seven"


def test_trimmer_keeps_short_coincidences() -> None:
    """A word that merely recurs is not a repetition."""
    trimmer = OverlapTrimmer("I think that", min_overlap=12)
    out = trimmer.feed(" that is fine.") + trimmer.finish()
    assert out == " that is fine."


def test_trimmer_releases_held_text_at_the_end() -> None:
    """A continuation shorter than a possible repetition is released when the stream ends."""
    trimmer = OverlapTrimmer("one two three four five six seven")
    assert trimmer.feed(" four") == ""  # could be " four five six seven" again
    assert trimmer.finish() == " four"


def test_whole_replay_before_any_text() -> None:
    """Nothing emitted: the same context frame is fed again."""
    journal = InferenceJournal()
    frame = F()
    inference = journal.context_accepted(frame)
    assert feed(journal) == ["context"]
    journal.processing_started(inference, now=0.0)
    assert journal.response_started(inference)
    journal.connection_lost(now=1.0)
    journal.connection_restored()
    [action] = journal.to_feed()
    assert action.kind is InferenceActionKind.CONTEXT and action.frame is frame
    # Its start already went downstream: the next one is dropped.
    assert not journal.response_started(inference)


def test_continue_after_partial_text() -> None:
    """Text emitted: a continuation of exactly that text is asked for."""
    journal = InferenceJournal()
    inference = journal.context_accepted(F())
    journal.to_feed()
    journal.response_started(inference)
    journal.text_emitted(inference, "Hello ", now=0.0)
    journal.text_emitted(inference, "there", now=0.1)
    journal.connection_lost(now=0.2)
    journal.connection_restored()
    [action] = journal.to_feed()
    assert action.kind is InferenceActionKind.CONTINUE
    assert action.text == "Hello there"
    assert inference.replays == 1


def test_restart_closes_then_asks_again() -> None:
    """The restart policy closes the cut answer and asks for a new one, which starts downstream again."""
    journal = InferenceJournal(restart=True)
    inference = journal.context_accepted(F())
    journal.to_feed()
    journal.response_started(inference)
    journal.text_emitted(inference, "Hello", now=0.0)
    journal.connection_lost(now=0.1)
    journal.connection_restored()
    assert feed(journal) == ["close", "context"]
    assert journal.response_started(inference)
    assert inference.emitted == ""


def test_committed_inference_is_never_run_again() -> None:
    """Function calls dispatched: the inference is closed, not re-run."""
    journal = InferenceJournal()
    inference = journal.context_accepted(F())
    journal.to_feed()
    journal.response_started(inference)
    journal.functions_started(inference)
    journal.connection_lost(now=0.0)
    journal.connection_restored()
    assert feed(journal) == ["close"]
    assert inference.settled


def test_frames_behind_an_inference_are_replayed_in_order() -> None:
    """Passthrough frames that never came out are fed again, after the inference."""
    journal = InferenceJournal()
    journal.context_accepted(F())
    later = F()
    journal.frame_accepted(later)
    assert feed(journal) == ["context", "frame"]
    journal.connection_lost(now=0.0)
    journal.connection_restored()
    actions = journal.to_feed()
    assert [a.kind.value for a in actions] == ["context", "frame"]
    assert actions[1].frame is later


def test_watchdogs() -> None:
    """No first chunk within the first-token timeout, or a pause longer than the stall timeout."""
    journal = InferenceJournal(first_token_timeout=1.0, stall_timeout=0.5)
    inference = journal.context_accepted(F())
    journal.to_feed()
    assert journal.overdue(now=100.0) is None  # not started on yet (queued)
    journal.processing_started(inference, now=0.0)
    assert journal.overdue(now=0.9) is None
    assert "first token" in (journal.overdue(now=1.1) or "")
    journal.chunk_received(inference, now=1.0)
    assert journal.overdue(now=1.4) is None
    assert "stalled" in (journal.overdue(now=1.6) or "")
    journal.stream_ended(inference)
    assert journal.overdue(now=100.0) is None


def test_interruption_drops_unsettled_inferences() -> None:
    """Interrupted inferences are never replayed."""
    journal = InferenceJournal()
    journal.context_accepted(F())
    journal.to_feed()
    assert len(journal.interrupted()) == 1
    journal.connection_lost(now=0.0)
    journal.connection_restored()
    assert journal.to_feed() == []
    assert journal.in_flight == 0


def test_gave_up_returns_the_unanswered_and_the_owed_frames() -> None:
    """Giving up empties the journal."""
    journal = InferenceJournal()
    inference = journal.context_accepted(F())
    owed = F()
    journal.frame_accepted(owed)
    journal.to_feed()
    journal.connection_lost(now=0.0)
    lost, frames = journal.gave_up()
    assert lost == [inference] and frames == [owed]
    assert journal.state is State.FAILED and journal.in_flight == 0


def test_settled_work_is_forgotten() -> None:
    """Memory follows what is in flight."""
    journal = InferenceJournal()
    for _ in range(500):
        inference = journal.context_accepted(F())
        frame = F()
        journal.frame_accepted(frame)
        journal.to_feed()
        journal.response_started(inference)
        journal.response_ended(inference)
        journal.frame_emerged(frame)
    assert journal.in_flight == 0


def test_misuse_raises() -> None:
    """Restoring a live connection is a caller bug."""
    with pytest.raises(InvalidState):
        InferenceJournal().connection_restored()
