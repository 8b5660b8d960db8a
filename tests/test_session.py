"""The session journal's input buffer, without asyncio: bounded audio, nothing else dropped."""

from __future__ import annotations

from pipecat_resilient.ledger import State
from pipecat_resilient.session import SessionJournal


def test_buffer_keeps_the_newest_audio_within_the_bound_and_all_text() -> None:
    """While recovering, the oldest audio goes first once over the bound; text stays; the drop is counted."""
    journal = SessionJournal(max_buffered_audio_s=1.0)
    assert journal.input_accepted("live", seconds=0.5) is True  # LIVE: fed at once, not buffered
    journal.connection_lost(now=0.0)
    assert journal.state is State.RECOVERING
    for index in range(3):
        assert journal.input_accepted(f"audio-{index}", seconds=0.4) is False
    assert journal.input_accepted("text", seconds=0.0) is False
    assert journal.input_accepted("audio-3", seconds=0.4) is False
    assert journal.buffered == 3
    assert round(journal.dropped_audio_s, 3) == 0.8
    journal.connection_restored()
    assert [action.frame for action in journal.to_feed()] == ["audio-2", "text", "audio-3"]
    # Each recovery counts its own drops.
    journal.connection_lost(now=1.0)
    assert journal.dropped_audio_s == 0.0
