"""The audio journal, driven synchronously: what is fed, what is replayed after a drop, what repeats."""

from __future__ import annotations

import pytest

from pipecat_resilient.audio_journal import AudioJournal, Entry, EntryKind
from pipecat_resilient.errors import InvalidState
from pipecat_resilient.ledger import State

CHUNK = 0.02  # seconds per audio chunk, as a transport delivers them


def journal(**options: float) -> AudioJournal:
    settings = {"replay_margin_s": 0.0, "max_buffered_audio_s": 30.0}
    settings.update(options)
    return AudioJournal(**settings)  # type: ignore[arg-type]


def speak(j: AudioJournal, chunks: int, *, send: bool = True, now: float = 0.0) -> list[Entry]:
    """Accept ``chunks`` audio chunks and, when ``send``, feed and send them all."""
    entries = [j.audio_accepted(f"a{j.position:.2f}", CHUNK) for _ in range(chunks)]
    if send:
        for entry in j.to_feed():
            if entry.kind is EntryKind.AUDIO:
                j.audio_sent(entry, now=now)
                j.send_finished()
    return entries


def fed(j: AudioJournal) -> list[object]:
    return [entry.frame for entry in j.to_feed()]


def test_audio_is_fed_once_in_order() -> None:
    """Each chunk accepted is handed to the live instance once, in order."""
    j = journal()
    j.audio_accepted("a", CHUNK)
    j.audio_accepted("b", CHUNK)
    assert fed(j) == ["a", "b"]
    assert fed(j) == []
    j.audio_accepted("c", CHUNK)
    assert fed(j) == ["c"]
    assert j.caught_up
    assert j.position == pytest.approx(3 * CHUNK)


def test_a_final_releases_the_audio_it_covers() -> None:
    """Audio is held until the provider finalized it (plus the margin), then forgotten."""
    j = journal(replay_margin_s=0.1)
    speak(j, 50)  # 1 s
    assert j.held_s == pytest.approx(1.0)
    assert j.result_received([(0.1, 0.3), (0.35, 0.6)], end=0.6, final=True) == 0
    assert j.heard_until == pytest.approx(0.6)
    assert j.held_s == pytest.approx(0.5)  # from 0.5 s (0.6 - margin) on


def test_an_interim_finalizes_nothing() -> None:
    """An interim result does not move what is final."""
    j = journal()
    speak(j, 50)
    j.result_received([(0.1, 0.3)], end=None, final=False)
    assert j.heard_until == 0.0
    assert j.held_s == pytest.approx(1.0)


def test_a_drop_replays_from_the_end_of_the_last_final_result() -> None:
    """After a drop a fresh instance gets the audio from a little before the final's end, then the live."""
    j = journal(replay_margin_s=0.1)
    entries = speak(j, 50)
    j.result_received([(0.2, 0.5)], end=0.5, final=True)
    j.connection_lost(now=1.0)
    assert j.state is State.RECOVERING
    assert j.to_feed() == []  # nothing is fed while recovering
    during = j.audio_accepted("live", CHUNK)
    j.connection_restored(now=1.1)
    replay = j.to_feed()
    # From the chunk holding 0.4 s (0.5 - margin): chunk 20 starts at 0.4 s.
    assert replay == [*entries[20:], during]
    assert j.replayed_s == pytest.approx(31 * CHUNK)


def test_the_replay_cut_snaps_to_the_chunk_holding_it() -> None:
    """A cut in the middle of a chunk starts the replay with that chunk, so no word is cut in half."""
    j = journal(replay_margin_s=0.0)
    entries = speak(j, 10)
    j.result_received([(0.05, 0.075)], end=0.075, final=True)
    j.connection_lost(now=0.0)
    j.connection_restored(now=0.0)
    assert j.to_feed() == entries[3:]  # chunk 3 covers 0.06 to 0.08


def test_words_of_the_replay_that_repeat_a_final_are_counted_by_time() -> None:
    """Words whose middle lies before the old final's end repeat it; their text does not matter."""
    j = journal(replay_margin_s=0.2)
    speak(j, 50)  # caller 0 to 1 s
    j.result_received([(0.5, 0.8)], end=0.8, final=True)  # "table." finalized up to 0.8
    j.connection_lost(now=0.0)
    j.connection_restored(now=0.0)
    for entry in j.to_feed():
        j.audio_sent(entry, now=0.0)
    # The fresh connection's clock starts at the replay: caller 0.6 s is its 0.
    # A fragment of the last word (0.6 to 0.8) repeats; the next word is new.
    assert j.result_received([(0.0, 0.2), (0.25, 0.35)], end=None, final=False) == 1
    assert j.result_received([(0.0, 0.2)], end=0.2, final=True) == 1
    assert j.result_received([(0.25, 0.35)], end=0.35, final=True) == 0
    assert j.heard_until == pytest.approx(0.95)


def test_words_of_the_first_connection_are_never_repeats() -> None:
    """Without a drop nothing is dropped, however the results overlap."""
    j = journal()
    speak(j, 50)
    assert j.result_received([(0.0, 0.5)], end=0.6, final=True) == 0
    assert j.result_received([(0.55, 0.7)], end=0.7, final=True) == 0


def test_the_stream_clock_maps_back_across_gaps() -> None:
    """Audio not sent (muted) and silence the service sent itself are gaps in the map."""
    j = journal()
    first = speak(j, 10)  # 0 to 0.2 s, sent
    speak(j, 10, send=False)  # 0.2 to 0.4 s, accepted, never sent (muted)
    j.to_feed()
    j.silence_sent(0.5)  # a keepalive: stream 0.2 to 0.7 s is nobody's audio
    third = [j.audio_accepted("late", CHUNK) for _ in range(10)]  # caller 0.4 to 0.6 s
    for entry in j.to_feed():
        j.audio_sent(entry, now=0.0)
    assert first[0].start == 0.0 and third[0].start == pytest.approx(0.4)
    # Stream 0.75 s is 0.05 s into the third part.
    j.result_received([(0.75, 0.8)], end=0.8, final=True)
    assert j.heard_until == pytest.approx(0.5)


def test_a_planned_reconnect_replays_into_the_new_stream() -> None:
    """A service reconnecting itself (new settings) starts a new stream: the audio not final is replayed."""
    j = journal()
    entries = speak(j, 25)
    j.result_received([(0.1, 0.2)], end=0.2, final=True)
    j.stream_started()
    assert j.to_feed() == entries[10:]
    assert j.state is State.LIVE


def test_a_finalize_acknowledgement_finalizes_the_audio_sent_before_it() -> None:
    """Everything sent before an acknowledged finalize request is final, less what the service held back."""
    j = journal()
    speak(j, 50)
    j.finalize_requested(now=1.0, held_back_s=0.04)
    speak(j, 5)
    j.finalize_confirmed()
    assert j.heard_until == pytest.approx(0.96)
    j.finalize_confirmed()  # a second one acknowledges nothing more
    assert j.heard_until == pytest.approx(0.96)


def test_silence_after_finalized_speech_is_final_too() -> None:
    """Once the caller is silent and everything said is final, old silence is not held."""
    j = journal(silence_guard_s=0.5)
    j.vad_accepted("start", speaking=True)
    speak(j, 50)
    j.vad_accepted("stop", speaking=False, stop_secs=0.2)
    j.to_feed()
    speak(j, 10)  # silence that is not final yet (the last word is not)
    assert j.heard_until == 0.0
    j.result_received([(0.5, 0.8)], end=0.8, final=True)  # speech ended at 1.0 - 0.2
    speak(j, 100)  # 2 s of silence
    assert j.heard_until == pytest.approx(j.position - 0.5)
    assert j.held_s < 0.6


def test_silence_is_not_final_while_speech_is_not() -> None:
    """A word said before the VAD stop that the provider has not finalized keeps the silence after it."""
    j = journal(silence_guard_s=0.5)
    j.vad_accepted("start", speaking=True)
    speak(j, 50)
    j.vad_accepted("stop", speaking=False, stop_secs=0.2)
    j.to_feed()
    j.result_received([(0.1, 0.4)], end=0.4, final=True)  # "...": words after 0.4 s not final
    speak(j, 100)
    assert j.heard_until == pytest.approx(0.4)


def test_the_caller_state_at_the_cut_is_replayed_first() -> None:
    """A replay that starts in the middle of speech while muted starts with the mute and the VAD start."""
    j = journal()
    mute = j.mute_accepted("mute", mute=True)
    start = j.vad_accepted("start", speaking=True)
    speak(j, 50)
    j.result_received([(0.0, 0.5)], end=0.5, final=True)  # the cues are trimmed with the audio
    j.connection_lost(now=0.0)
    j.connection_restored(now=0.0)
    replay = j.to_feed()
    assert replay[:2] == [mute, start]
    assert all(entry.kind is EntryKind.AUDIO for entry in replay[2:])


def test_a_stop_within_the_replay_is_replayed_in_place() -> None:
    """A VAD stop after the cut goes to the fresh instance between the audio it came between."""
    j = journal()
    j.vad_accepted("start", speaking=True)
    before = speak(j, 10)
    stop = j.vad_accepted("stop", speaking=False, stop_secs=0.2)
    after = speak(j, 5)
    j.connection_lost(now=0.0)
    j.connection_restored(now=0.0)
    replay = j.to_feed()
    assert replay[1:] == [*before, stop, *after]


def test_frames_held_while_recovering_are_fed_once_after_the_replay() -> None:
    """A frame that waited for a fresh instance is fed after the replay, and never again."""
    j = journal()
    speak(j, 5)
    j.connection_lost(now=0.0)
    held = j.frame_accepted("end", direction="down")
    j.connection_restored(now=0.0)
    replay = j.to_feed()
    assert replay[-1] is held
    held.fed = True  # the shell marks it once fed
    j.connection_lost(now=0.0)
    j.connection_restored(now=0.0)
    assert held not in j.to_feed()


def test_the_bound_drops_the_oldest_audio_and_says_how_much() -> None:
    """Over the bound the oldest audio goes first; how much (and how much of it speech) is reported once."""
    j = journal(max_buffered_audio_s=1.0)
    speak(j, 25)  # 0.5 s before any VAD: speech, as far as anyone knows
    j.vad_accepted("start", speaking=True)
    j.vad_accepted("stop", speaking=False, stop_secs=0.2)
    j.to_feed()
    speak(j, 50)
    assert j.dropped
    assert j.held_s == pytest.approx(1.0)
    dropped, speech = j.take_dropped()
    assert dropped == pytest.approx(0.5)
    assert speech == pytest.approx(0.5)
    assert not j.dropped and j.take_dropped() == (0.0, 0.0)


def test_a_vad_start_tags_the_audio_just_before_it_as_speech() -> None:
    """Speech starts before the VAD says so: the audio just before a start counts as speech."""
    j = journal()
    j.vad_accepted("start", speaking=True)
    speak(j, 25)
    j.vad_accepted("stop", speaking=False)  # the speech is not final: the silence after it is held
    early = speak(j, 50)
    j.vad_accepted("start", speaking=True)
    assert [e.speech for e in early] == [False] * 25 + [True] * 25


def test_overdue_when_speech_goes_unanswered() -> None:
    """Speech sent with nothing back for stall_timeout is a stall; a message resets it; silence never is."""
    j = journal(stall_timeout=2.0)
    speak(j, 50, now=0.0)  # silence (no VAD start yet): nothing owed
    assert j.overdue(now=10.0) is None
    j.vad_accepted("start", speaking=True)
    speak(j, 5, now=10.0)
    assert j.overdue(now=11.9) is None
    j.message_received(now=11.9)
    speak(j, 25, now=12.0)
    assert j.overdue(now=13.9) is None
    speak(j, 10, now=12.1)  # the silence the VAD waits for
    j.vad_accepted("stop", speaking=False, stop_secs=0.2)
    assert "after the caller spoke" in (j.overdue(now=14.1) or "")


def test_the_silence_before_a_vad_stop_owes_nothing() -> None:
    """Audio sent after the provider's last message that was the silence before a VAD stop is not owed."""
    j = journal(stall_timeout=2.0)
    j.vad_accepted("start", speaking=True)
    speak(j, 25, now=0.0)
    j.message_received(now=0.1)  # the last word's final
    speak(j, 10, now=0.2)  # silence, while the VAD still says speaking
    j.vad_accepted("stop", speaking=False, stop_secs=0.2)
    assert j.overdue(now=5.0) is None


def test_overdue_when_shown_words_are_not_finalized() -> None:
    """Words shown in an interim and not finalized within finalize_timeout of a request: a stall."""
    j = journal(finalize_timeout=0.5)
    speak(j, 50)
    j.finalize_requested(now=0.0)
    assert j.overdue(now=1.0) is None  # nothing was shown: nothing is owed
    j.result_received([(0.2, 0.4)], end=None, final=False)
    assert "finalize" in (j.overdue(now=1.0) or "")
    j.result_received([(0.2, 0.4)], end=0.4, final=True)
    assert j.overdue(now=1.0) is None


def test_words_shown_after_a_finalize_request_are_not_owed_by_it() -> None:
    """A finalize request covers the audio sent before it; words said after it owe it nothing."""
    j = journal(finalize_timeout=0.5)
    speak(j, 10)
    j.finalize_requested(now=0.0)  # nothing pending: the provider may not answer at all
    speak(j, 40)
    j.result_received([(0.4, 0.6)], end=None, final=False)
    assert j.overdue(now=1.0) is None


def test_overdue_when_a_send_does_not_complete() -> None:
    """A send still in progress after send_timeout is a stall."""
    j = journal(send_timeout=2.0)
    j.audio_accepted("a", CHUNK)
    [entry] = j.to_feed()
    j.audio_sent(entry, now=0.0)
    assert j.overdue(now=1.9) is None
    assert "send" in (j.overdue(now=2.1) or "")
    j.send_finished()
    assert j.overdue(now=2.1) is None


def test_nothing_is_overdue_without_observed_messages() -> None:
    """A provider whose messages are not observed is never taken for a stalled one by its silence."""
    j = AudioJournal(stall_timeout=1.0, replay_margin_s=0.0, observes_messages=False)
    j.vad_accepted("start", speaking=True)
    speak(j, 5)
    assert j.overdue(now=10.0) is None


def test_speech_reported_twice_for_one_turn_is_passed_once() -> None:
    """The provider's speech start is news once per turn, and never for audio already final."""
    j = journal(replay_margin_s=0.0)
    speak(j, 50)
    assert j.speech_reported(0.1)
    j.connection_lost(now=0.0)
    j.connection_restored(now=0.0)
    assert not j.speech_reported(0.0)  # the same turn, announced again by the fresh connection
    j.result_received([(0.1, 0.5)], end=0.5, final=True)
    assert j.speech_reported(0.6)  # the next turn


def test_giving_up_says_what_was_never_final() -> None:
    """Recovery giving up reports the audio not finalized, and the frames to pass on."""
    j = journal()
    j.vad_accepted("start", speaking=True)
    speak(j, 50)
    j.result_received([(0.0, 0.4)], end=0.4, final=True)
    j.connection_lost(now=0.0)
    stop = j.vad_accepted("stop", speaking=False)
    stop.passed = False
    j.frame_accepted("end", direction="down")
    lost = j.gave_up()
    assert lost.audio_s == pytest.approx(0.6)
    assert lost.speech_s == pytest.approx(0.6)
    assert lost.frames == (("stop", None), ("end", "down"))
    assert j.state is State.FAILED
    with pytest.raises(InvalidState):
        j.audio_accepted("more", CHUNK)
    j.revived()
    assert j.state.name == "RECOVERING"


def test_misuse_is_an_invalid_state() -> None:
    """Losing a connection that is not live, or restoring one that is, is a bug in the caller."""
    j = journal()
    with pytest.raises(InvalidState):
        j.connection_restored(now=0.0)
    j.connection_lost(now=0.0)
    with pytest.raises(InvalidState):
        j.connection_lost(now=0.0)
    with pytest.raises(InvalidState):
        j.stream_started()
    with pytest.raises(InvalidState):
        j.revived()


def test_an_acknowledgement_covers_the_oldest_finalize_request_in_flight() -> None:
    """A replay sends the Finalize of each VAD stop it carries at once: the first answer is the first's
    (it must not count the audio up to the second request as final)."""
    j = journal(replay_margin_s=0.0)
    speak(j, 50)
    j.finalize_requested(now=1.0)
    speak(j, 50)
    j.finalize_requested(now=1.0)  # the first is not answered yet
    j.finalize_confirmed()
    assert j.heard_until == pytest.approx(1.0)


# ----------------------------------------------------------------------
# A fresh connection that never answers (a half-open replacement)
# ----------------------------------------------------------------------


def _replayed_after_a_stop(j: AudioJournal, *, now: float) -> None:
    """The caller said 1 s and stopped (VAD); nothing was final; the connection dropped and a fresh one
    took the replay."""
    j.vad_accepted("start", speaking=True)
    speak(j, 50, now=0.0)
    j.message_received(now=0.0)  # the first connection was alive...
    j.vad_accepted("stop", speaking=False, stop_secs=0.2)
    speak(j, 10, now=0.0)
    j.connection_lost(now=now)  # ...and died before finalizing anything
    j.connection_restored(now=now)
    for entry in j.to_feed():
        if entry.kind is EntryKind.AUDIO:
            j.audio_sent(entry, now=now)
            j.send_finished()


def test_a_fresh_connection_that_never_answers_the_replayed_speech_is_overdue() -> None:
    """Speech not final replayed after the caller stopped: a fresh connection that says nothing is a stall
    (the caller being silent no longer hides it)."""
    j = journal(stall_timeout=2.0)
    _replayed_after_a_stop(j, now=5.0)
    assert not j.speaking
    assert j.overdue(now=6.9) is None
    assert "after the caller spoke" in (j.overdue(now=7.1) or "")


def test_a_fresh_connection_that_said_anything_owes_no_answer_to_the_replay() -> None:
    """Once a fresh connection said something it is alive: its silence about replayed speech is not a stall
    (a provider may say nothing about a cough)."""
    j = journal(stall_timeout=2.0)
    j.vad_accepted("start", speaking=True)
    speak(j, 50, now=0.0)
    j.vad_accepted("stop", speaking=False, stop_secs=0.2)
    speak(j, 10, now=0.0)
    j.connection_lost(now=5.0)
    j.connection_restored(now=5.0)
    j.message_received(now=5.0)  # AssemblyAI's Begin, say
    for entry in j.to_feed():
        if entry.kind is EntryKind.AUDIO:
            j.audio_sent(entry, now=5.0)
            j.send_finished()
    assert j.overdue(now=10.0) is None


def _replay_answered_in_part(j: AudioJournal) -> None:
    """The caller said 1 s and stopped; "I would" (0.1-0.4 s) was final; the connection died; the fresh
    one was sent the replay from 0.3 s and answered with an interim of the first new word, then went
    quiet (as a replacement that goes half-open a few messages in does)."""
    j.vad_accepted("start", speaking=True)
    speak(j, 50, now=0.0)
    j.result_received([(0.1, 0.2), (0.22, 0.4)], end=0.4, final=True)
    j.vad_accepted("stop", speaking=False, stop_secs=0.2)
    speak(j, 10, now=0.0)
    j.connection_lost(now=5.0)
    j.connection_restored(now=5.0)
    for entry in j.to_feed():
        if entry.kind is EntryKind.AUDIO:
            j.audio_sent(entry, now=5.0)
            j.send_finished()
    j.message_received(now=5.1)
    # Stream time 0 is caller 0.4 (the replay margin is 0 here): "like" at caller 0.42-0.6.
    j.result_received([(0.02, 0.2)], end=0.2, final=False)


def test_replayed_speech_stays_owed_until_a_result_reaches_past_it() -> None:
    """A provider whose results say how far they reach (Deepgram): a fresh connection that answered the
    start of the replay owes the rest of its speech, so going quiet while the caller is silent is a
    stall, found out stall_timeout after its last message (not when the caller next speaks)."""
    j = journal(stall_timeout=2.0, covers_audio=True)
    _replay_answered_in_part(j)
    assert not j.speaking
    assert j.overdue(now=7.0) is None
    assert "after the caller spoke" in (j.overdue(now=7.2) or "")

    j = journal(stall_timeout=2.0, covers_audio=True)
    _replay_answered_in_part(j)
    j.message_received(now=6.0)
    j.result_received([(0.02, 0.2), (0.25, 0.55)], end=0.6, final=False)  # reaches the speech's end
    assert j.overdue(now=60.0) is None

    j = journal(stall_timeout=2.0, covers_audio=True)
    _replay_answered_in_part(j)
    j.message_received(now=6.0)  # an empty result, say: alive, and the speech still owed
    assert j.overdue(now=7.9) is None
    assert j.overdue(now=8.1) is not None


def _last_word_unanswered(j: AudioJournal) -> None:
    """The caller says 1 s; the provider's last message reaches 0.6 s (it went half-open on the last
    word, 0.7-0.95 s); the 0.2 s of silence the VAD waits for goes in after that message; VAD stop."""
    j.vad_accepted("start", speaking=True)
    speak(j, 50, now=0.0)
    j.message_received(now=0.1)
    j.result_received([(0.1, 0.3), (0.35, 0.6)], end=0.6, final=False)
    speak(j, 10, now=0.2)
    j.vad_accepted("stop", speaking=False, stop_secs=0.2, now=0.2)


def test_speech_before_a_stop_that_no_result_reached_stays_owed() -> None:
    """With coverage, the silence before a VAD stop going in after the provider's last message does not
    mean all was answered: the last word, which no result reached, is owed, so a provider that went
    half-open on it is a stall, found out while the caller is silent."""
    j = journal(stall_timeout=2.0, covers_audio=True)
    _last_word_unanswered(j)
    assert j.overdue(now=2.1) is None
    assert "after the caller spoke" in (j.overdue(now=2.3) or "")

    j = journal(stall_timeout=2.0, covers_audio=True)
    _last_word_unanswered(j)
    j.message_received(now=0.3)
    j.result_received([(0.1, 0.3), (0.35, 0.6), (0.7, 0.95)], end=1.0, final=False)
    assert j.overdue(now=60.0) is None

    j = journal(stall_timeout=2.0)  # no coverage: the silence went in last, nothing is owed
    _last_word_unanswered(j)
    assert j.overdue(now=60.0) is None


def test_a_provider_whose_results_do_not_say_how_far_they_reach_is_trusted_once_it_answered() -> None:
    """Without coverage (AssemblyAI's results carry only words) a fresh connection that said anything
    is alive: the replay's speech may hold no word (a cough) for it to answer."""
    j = journal(stall_timeout=2.0)
    _replay_answered_in_part(j)
    assert j.overdue(now=60.0) is None


def test_a_replay_of_only_the_silence_before_a_stop_owes_nothing() -> None:
    """The silence a VAD stop waited for is not speech a fresh connection must answer, nor is audio
    before any VAD (no VAD: nobody knows what is speech)."""
    j = journal(stall_timeout=2.0)
    j.vad_accepted("start", speaking=True)
    speak(j, 40, now=0.0)
    j.result_received([(0.0, 0.8)], end=0.8, final=True)  # every word final
    speak(j, 10, now=0.0)  # the 0.2 s of silence the VAD waits for
    j.vad_accepted("stop", speaking=False, stop_secs=0.2)
    j.connection_lost(now=1.0)
    j.connection_restored(now=1.0)
    for entry in j.to_feed():
        j.audio_sent(entry, now=1.0)
        j.send_finished()
    assert j.overdue(now=10.0) is None

    j = journal(stall_timeout=2.0)
    speak(j, 50, now=0.0)  # no VAD at all
    j.connection_lost(now=1.0)
    j.connection_restored(now=1.0)
    for entry in j.to_feed():
        j.audio_sent(entry, now=1.0)
        j.send_finished()
    assert j.overdue(now=10.0) is None


# ----------------------------------------------------------------------
# VAD stops held back until the speech before them is final
# ----------------------------------------------------------------------


def _stopped(j: AudioJournal, *, now: float = 0.0) -> Entry:
    """1 s of speech, then a VAD stop (0.2 s after the speech), fed and taken by the live instance."""
    j.vad_accepted("start", speaking=True)
    speak(j, 50, now=now)
    j.message_received(now=now)
    speak(j, 10, now=now)
    stop = j.vad_accepted("stop", speaking=False, stop_secs=0.2, now=now)
    assert [e for e in j.to_feed() if e is stop] == [stop]
    j.stop_taken(stop, now=now)
    return stop


def test_a_stop_passes_once_the_speech_before_it_is_final() -> None:
    """A stop waits for a final that covers the speech before it (within the VAD's tolerance)."""
    j = journal(finalize_timeout=0.5)
    stop = _stopped(j)
    assert not stop.passed and j.pending_stops() == [stop]
    j.result_received([(0.2, 0.6)], end=0.6, final=True)  # the last words are not final
    assert j.stops_to_pass(now=0.1) == []
    j.result_received([(0.7, 0.95)], end=0.95, final=True)
    assert j.stops_to_pass(now=0.1) == [stop]
    assert stop.passed and j.pending_stops() == []


def test_a_finalize_acknowledgement_lets_the_stop_pass() -> None:
    """The provider's answer to the finalize request covers everything sent before it."""
    j = journal()
    stop = _stopped(j)
    j.finalize_requested(now=0.0)
    assert j.stops_to_pass(now=0.1) == []
    j.finalize_confirmed()
    assert j.stops_to_pass(now=0.1) == [stop]


def test_a_stop_the_live_connection_owes_nothing_for_passes_after_the_finalize_timeout() -> None:
    """A provider that answered all the speech and showed no word it has not finalized has nothing to say
    about the end of it (a cough): the stop passes finalize_timeout after the instance took it."""
    j = journal(finalize_timeout=0.5)
    stop = _stopped(j, now=1.0)
    assert j.stop_deadline() == pytest.approx(1.5)
    assert j.stops_to_pass(now=1.4) == []
    assert j.stops_to_pass(now=1.5) == [stop]


def test_a_stop_is_held_while_the_connection_owes_words_it_showed() -> None:
    """A word shown in an interim and not final: the connection owes it, and the stop waits for it (the
    watchdog declares the connection dead if it never comes)."""
    j = journal(finalize_timeout=0.5)
    stop = _stopped(j, now=1.0)
    j.result_received([(0.7, 0.95)], end=None, final=False)
    assert j.stops_to_pass(now=3.0) == []
    j.result_received([(0.7, 0.95)], end=0.95, final=True)
    assert j.stops_to_pass(now=3.0) == [stop]


def test_a_held_stop_waits_through_a_drop_for_the_fresh_connection() -> None:
    """The connection that took the stop died: the stop waits while recovering, is taken again by the
    fresh connection in the replay, and passes once the fresh connection finalized the speech."""
    j = journal(finalize_timeout=0.5)
    stop = _stopped(j, now=1.0)
    j.result_received([(0.7, 0.95)], end=None, final=False)
    j.connection_lost(now=2.0)
    assert stop.taken_at is None
    assert j.stops_to_pass(now=4.0) == []  # recovering: no instance can take it
    j.connection_restored(now=4.0)
    replay = j.to_feed()
    assert stop in replay
    for entry in replay:
        if entry.kind is EntryKind.AUDIO:
            j.audio_sent(entry, now=4.0)
            j.send_finished()
    j.stop_taken(stop, now=4.0)
    assert j.stops_to_pass(now=4.6) == []  # the fresh connection has not answered the replayed speech
    j.result_received([(0.0, 0.95)], end=0.95, final=True)
    assert j.stops_to_pass(now=4.6) == [stop]


def test_a_stop_whose_speech_is_final_passes_while_recovering() -> None:
    """Nothing left to transcribe before it: a stop that arrives during a recovery need not wait for it."""
    j = journal()
    j.vad_accepted("start", speaking=True)
    speak(j, 50)
    j.result_received([(0.2, 1.0)], end=1.0, final=True)
    j.connection_lost(now=1.0)
    speak(j, 10, send=False)
    stop = j.vad_accepted("stop", speaking=False, stop_secs=0.2, now=1.0)
    assert j.stops_to_pass(now=1.0) == [stop]


def test_a_stop_is_held_at_most_stop_hold_timeout() -> None:
    """However long the recovery takes, a stop passes stop_hold_timeout after it arrived: never held for
    good."""
    j = AudioJournal(replay_margin_s=0.0, stop_hold_timeout=3.0)
    stop = _stopped(j, now=1.0)
    j.result_received([(0.7, 0.95)], end=None, final=False)
    j.connection_lost(now=1.5)
    assert j.stop_deadline() == pytest.approx(4.0)
    assert j.stops_to_pass(now=3.9) == []
    assert j.stops_to_pass(now=4.0) == [stop]


def test_stops_are_not_held_for_a_provider_whose_messages_are_not_observed_nor_while_muted() -> None:
    """Nothing can say the speech is final: a stop passes once an instance took it, as before."""
    j = AudioJournal(replay_margin_s=0.0, observes_messages=False)
    stop = _stopped(j)
    assert not stop.waits and j.stops_to_pass(now=0.0) == [stop]
    j = journal()
    j.mute_accepted("mute", mute=True)
    stop = _stopped(j)
    assert not stop.waits and j.stops_to_pass(now=0.0) == [stop]


def test_a_held_stop_is_passed_on_when_recovery_gives_up() -> None:
    """Giving up hands the held stops back to pass on."""
    j = journal()
    stop = _stopped(j)
    lost = j.gave_up()
    assert ("stop", None) in lost.frames
    assert stop.passed and j.pending_stops() == []
