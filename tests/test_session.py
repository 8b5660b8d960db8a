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


RATE = 480  # bytes per character of reply audio


def test_transcription_with_its_audio_is_heard_as_it_comes_in_whole_words() -> None:
    """Audio first, then its transcription: each whole word is heard at once; a word still arriving waits."""
    journal = SessionJournal()
    journal.reply_started(now=0.0)
    released = []
    for piece in ("Once ", "upon ", "a tim", "e the"):
        released.append(journal.audio_delivered(5 * RATE, now=0.0))
        released.append(journal.transcribed(piece))
    assert [text for text in released if text] == ["Once ", "upon ", "a ", "time "]
    assert journal.word_completed() == "the"


def test_transcription_ahead_of_its_audio_waits_for_it() -> None:
    """Transcription that comes before its audio is heard only as the audio covering it goes out."""
    journal = SessionJournal()
    # A whole reply first: the session's rate.
    journal.reply_started(now=0.0)
    journal.audio_delivered(12 * RATE, now=0.0)
    journal.transcribed("Hello there.")
    journal.reply_ended(completed=True)
    assert journal.bytes_per_char == RATE
    journal.reply_started(now=1.0)
    assert journal.transcribed("Once upon a time there ") == ""
    assert journal.audio_delivered(5 * RATE, now=1.0) == "Once "
    assert journal.audio_delivered(12 * RATE, now=1.0) == "upon a time "
    journal.connection_lost(now=2.0)
    cut = journal.cut
    assert cut is not None and (cut.heard, cut.tail) == ("Once upon a time ", "there ")


def test_without_a_rate_transcription_ahead_waits_for_the_end() -> None:
    """No rate known yet: transcription ahead of the audio is heard only when the reply ends whole."""
    journal = SessionJournal()
    journal.reply_started(now=0.0)
    assert journal.transcribed("Once upon ") == ""
    assert journal.audio_delivered(10 * RATE, now=0.0) == ""
    assert journal.word_completed() == "Once upon "


def test_a_cut_keeps_what_was_heard_and_the_transcription_past_it() -> None:
    """The cut says what was heard (whole words), the transcription beyond it, and the audio that went out."""
    journal = SessionJournal()
    journal.reply_started(now=0.0)
    for piece in ("Once ", "upon ", "a tim"):
        journal.audio_delivered(5 * RATE, now=0.0)
        journal.transcribed(piece)
    journal.audio_delivered(5 * RATE, now=0.0)  # "e the": its transcription never came
    journal.connection_lost(now=1.0)
    cut = journal.cut
    assert cut is not None and cut.reply_open and cut.needs_answer
    assert (cut.heard, cut.tail, cut.heard_audio, cut.audio_from) == ("Once upon a ", "tim", 20 * RATE, 0)


def test_a_continuation_carries_the_cut_until_it_is_spliced() -> None:
    """Asked to go on, the next reply starts from what was heard; a cut before the splice is the same cut."""
    journal = SessionJournal()
    journal.reply_started(now=0.0)
    for piece in ("Once ", "upon ", "a tim"):
        journal.audio_delivered(5 * RATE, now=0.0)
        journal.transcribed(piece)
    journal.connection_lost(now=1.0)
    first = journal.cut
    assert first is not None and first.heard == "Once upon a " and first.heard_audio == 15 * RATE
    journal.connection_restored()
    journal.answered(asked=True, now=1.0)
    assert journal.owes_reply and journal.asked_cut == first
    journal.reply_started(now=1.1)
    journal.connection_lost(now=1.2)  # during the hold: nothing of the continuation was heard
    assert journal.cut is not None and journal.cut.tail == "tim" and journal.cut.heard_audio == 15 * RATE
    journal.connection_restored()
    journal.answered(asked=True, now=1.3)
    journal.reply_started(now=1.4)
    journal.spliced("time ")
    journal.audio_delivered(6 * RATE, now=1.5)
    journal.transcribed("there ")
    journal.connection_lost(now=1.6)
    cut = journal.cut
    assert cut is not None and cut.heard.startswith("Once upon a time ")
    assert cut.audio_from == len("Once upon a time ") and cut.heard_audio == 6 * RATE


def test_a_reply_nobody_heard_is_owed_again_from_what_was_heard() -> None:
    """A reply with no audio: owed again; lost before the retry began, the cut still needs an answer."""
    journal = SessionJournal()
    journal.reply_started(now=0.0)
    journal.transcribed("Hello, can you hear me?")
    assert journal.unheard_reply(now=1.0) == ""
    assert journal.owes_reply and journal.asked_cut is not None
    journal.connection_lost(now=2.0)
    assert journal.cut is not None and journal.cut.needs_answer


def test_overdue_tells_no_reply_a_silent_reply_and_a_stalled_one() -> None:
    """No reply to a turn, a spoken reply with no audio, and a reply gone quiet are each overdue."""
    journal = SessionJournal(first_response_timeout=1.0, stall_timeout=2.0)
    journal.reply_owed(now=0.0)
    assert journal.overdue(now=0.5) is None
    assert "no reply within 1s" in (journal.overdue(now=1.5) or "")
    journal.reply_started(now=2.0)
    journal.transcribed("words")
    journal.output(now=2.5)
    assert "no audio" in (journal.overdue(now=3.1) or "")
    journal.audio_delivered(RATE, now=3.2)
    assert journal.overdue(now=5.0) is None
    assert "stalled" in (journal.overdue(now=5.3) or "")
    journal.reply_ended()
    journal.reply_started(now=6.0, speaks=False)  # a written reply has no audio to wait for
    assert journal.overdue(now=7.5) is None


def test_what_a_resumption_handle_does_not_cover_is_kept() -> None:
    """A handle covers the session up to the last completed turn; what came after is kept for resuming."""
    journal = SessionJournal()
    journal.said({"role": "user", "content": "Hello."})
    journal.handle_issued()  # issued at setup: covers nothing said since
    assert journal.uncovered == [{"role": "user", "content": "Hello."}]
    journal.reply_started(now=0.0)
    journal.audio_delivered(10 * RATE, now=0.0)
    journal.transcribed("Hi there.")
    journal.reply_ended(completed=True)
    journal.said({"role": "user", "content": "Tell me a story."})
    journal.handle_issued()  # issued after the reply: covers it, not the question after it
    assert journal.uncovered == [{"role": "user", "content": "Tell me a story."}]
    journal.seeded([{"role": "user", "content": "A"}])
    assert journal.uncovered == [{"role": "user", "content": "A"}]


def test_an_interruption_keeps_the_heard_part_of_a_cut_reply_but_owes_nothing() -> None:
    """Interrupted while recovering: the cut reply is not to be continued, and what was heard of it stays."""
    journal = SessionJournal()
    journal.said({"role": "user", "content": "Tell me a story."})
    journal.reply_started(now=0.0)
    for piece in ("Once ", "upon ", "a tim"):
        journal.audio_delivered(5 * RATE, now=0.0)
        journal.transcribed(piece)
    journal.connection_lost(now=1.0)
    journal.interrupted()
    assert journal.cut is not None and not journal.cut.needs_answer
    assert journal.uncovered[-1] == {"role": "assistant", "content": "Once upon a"}


def test_only_text_or_speech_buffered_is_the_user_saying_something() -> None:
    """Silence, and the late end of a turn already answered, are not the user saying something; speech is."""
    journal = SessionJournal()
    journal.connection_lost(now=0.0)
    journal.input_accepted("silence", seconds=0.02)
    journal.input_accepted(type("UserStoppedSpeakingFrame", (), {})(), seconds=0.0)
    assert not journal.has_user_input
    journal.input_accepted("speech", seconds=0.02, speech=True)
    assert journal.has_user_input


def test_a_spoken_turn_already_answered_is_not_owed_again() -> None:
    """A provider's own VAD may answer before the pipeline hears the turn end: that end owes nothing."""
    journal = SessionJournal(first_response_timeout=1.0)
    journal.user_started_speaking()
    journal.reply_started(now=0.0)
    journal.reply_ended()
    journal.reply_owed(now=0.5, spoken=True)
    assert not journal.owes_reply
    journal.user_started_speaking()
    journal.reply_owed(now=1.0, spoken=True)
    assert journal.owes_reply


def test_a_spoken_turn_no_reply_began_for_is_given_to_the_fresh_session_first() -> None:
    """Audio fed since the model last took a turn, never transcribed, is fed again before what came later."""
    journal = SessionJournal(max_buffered_audio_s=1.0)
    journal.input_fed("started")
    journal.input_fed("speech-1", seconds=0.02, speech=True)
    journal.input_fed("stopped")
    journal.reply_owed(now=0.0, spoken=True)
    journal.connection_lost(now=1.0)
    assert journal.cut is not None and not journal.cut.needs_answer  # the turn itself will be answered
    journal.input_accepted("later", seconds=0.0)
    journal.connection_restored()
    assert [action.frame for action in journal.to_feed()] == ["started", "speech-1", "stopped", "later"]


def test_a_transcribed_or_answered_turn_is_not_fed_again() -> None:
    """Once the session transcribed the turn, or a reply began, its audio is not kept."""
    journal = SessionJournal()
    journal.input_fed("speech", seconds=0.02, speech=True)
    journal.user_transcribed("Hello.")
    journal.input_fed("more", seconds=0.02, speech=True)
    journal.reply_started(now=0.0)
    journal.connection_lost(now=1.0)
    journal.connection_restored()
    assert journal.to_feed() == []
    assert journal.uncovered[0] == {"role": "user", "content": "Hello."}
