"""The ledger, driven synchronously: no event loop, no Pipecat frames (plain objects stand in)."""

from __future__ import annotations

import pytest

from pipecat_resilient.errors import InvalidState
from pipecat_resilient.ledger import ActionKind, Ledger, State, UtteranceKind


class F:
    """A stand-in frame: the ledger only needs identity."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"F({self.name})"


def kinds(actions) -> list[str]:
    return [a.kind.value for a in actions]


# The tests' provider speaks each character in 10 ms, spaces included.
CHAR_S = 0.01


def timings(text: str, *, offset: int = 0) -> list[tuple[str, float, float]]:
    """Word timings of ``text`` as a provider would report them (from the context's start)."""
    words, position = [], 0
    for word in text.split():
        position = text.index(word, position)
        words.append((word, (position - offset) * CHAR_S, (position - offset + len(word)) * CHAR_S))
        position += len(word)
    return words


def audio_for(text: str) -> float:
    """Seconds of audio for ``text``."""
    return len(text) * CHAR_S


def heard(u) -> str:
    """The text the ledger counts as heard."""
    return u.text[: u.voiced].rstrip()


def test_speak_is_fed_once_then_replayed_from_the_first_unheard_word() -> None:
    """Audio covering timed words moves the cursor; a loss replays from the next word."""
    ledger = Ledger()
    speak = F("speak")
    u = ledger.speak_accepted(speak, "Hello world, this is a test.")
    [action] = ledger.to_feed()
    assert action.kind is ActionKind.SPEAK and action.frame is speak and action.text == u.text
    assert ledger.to_feed() == []
    ledger.text_handed(u, "c1", u.text, now=0.0)
    ledger.words_timed("c1", timings(u.text))
    ledger.audio_pushed("c1", audio_for("Hello world, th"), now=0.1)
    assert heard(u) == "Hello world,"
    ledger.connection_lost(now=0.2)
    assert ledger.to_feed() == []  # nothing while recovering
    ledger.connection_restored()
    [action] = ledger.to_feed()
    assert action.kind is ActionKind.SPEAK
    assert action.text == "this is a test."
    assert action.frame is None  # a partial replay needs a new frame


def test_timings_ahead_of_the_audio_prove_nothing_yet() -> None:
    """Every word timed before any audio: nothing is heard until the audio reaches each word's end."""
    ledger = Ledger()
    u = ledger.speak_accepted(F(), "one two three")
    ledger.to_feed()
    ledger.text_handed(u, "c", u.text, now=0.0)
    assert ledger.words_timed("c", timings(u.text)) is None
    assert u.voiced == 0
    ledger.audio_pushed("c", audio_for("one tw"), now=0.0)
    assert heard(u) == "one"
    ledger.audio_pushed("c", audio_for("o three"), now=0.0)
    assert heard(u) == "one two three"


def test_audio_ahead_of_its_timings_is_settled_when_they_come() -> None:
    """Audio for three words and timings for one: the others count once their timings arrive."""
    ledger = Ledger()
    u = ledger.speak_accepted(F(), "alpha beta gamma delta")
    ledger.to_feed()
    ledger.text_handed(u, "c", u.text, now=0.0)
    ledger.audio_pushed("c", audio_for("alpha beta gamma "), now=0.0)
    ledger.words_timed("c", timings(u.text)[:1])
    # Too few timings to know the speaking rate: only what is timed counts.
    assert heard(u) == "alpha"
    assert ledger.words_timed("c", timings(u.text)[1:3]) is u
    assert heard(u) == "alpha beta gamma"


def test_a_word_whose_audio_all_arrived_counts_before_anything_follows_it() -> None:
    """The last word of a sentence, timed as far as its audio goes (a partial word): whole, so heard."""
    ledger = Ledger()
    u = ledger.speak_accepted(F(), "Alpha beta gamma. Delta")
    ledger.to_feed()
    ledger.text_handed(u, "c", u.text, now=0.0)
    words = timings("Alpha beta gamma.")
    ledger.words_timed("c", words, last_partial=True)
    ledger.audio_pushed("c", audio_for("Alpha beta gamma."), now=0.0)
    assert heard(u) == "Alpha beta gamma."
    # A partial that is only the start of the word does not make it heard.
    v = ledger.speak_accepted(F(), "one seven")
    ledger.to_feed()
    ledger.text_handed(v, "d", v.text, now=0.0)
    ledger.words_timed("d", [("one", 0.0, 0.03), ("sev", 0.04, 0.07)], last_partial=True)
    ledger.audio_pushed("d", audio_for("one sev"), now=0.0)
    assert heard(v) == "one"


def test_whitespace_never_handed_to_the_provider_takes_no_audio_time() -> None:
    """Sentences handed without the space between them: a cut right after the next word counts it heard."""
    ledger = Ledger(speaking_rate=1 / CHAR_S)
    u = ledger.turn_started(F())
    ledger.text_accepted("Address monday price. ")
    ledger.text_accepted("Phone ship today.")
    ledger.to_feed()
    # Pipecat hands each sentence stripped: the provider never gets the space.
    ledger.text_handed(u, "c", "Address monday price.", now=0.0)
    ledger.text_handed(u, "c", "Phone ship today.", now=0.0)
    first = "Address monday price."
    ledger.words_timed("c", timings(first))
    # The socket dies after the audio of "Phone" and before its timings.
    ledger.audio_pushed("c", audio_for(first + "Phone"), now=0.0)
    assert heard(u) == "Address monday price. Phone"
    # One character short of it: not heard (rounded down).
    v = ledger.speak_accepted(F(), "One two. Three four")
    ledger.to_feed()
    ledger.text_handed(v, "d", "One two.", now=0.0)
    ledger.text_handed(v, "d", "Three four", now=0.0)
    ledger.words_timed("d", timings("One two."))
    ledger.audio_pushed("d", audio_for("One two.Thre"), now=0.0)
    assert heard(v) == "One two."


def test_a_space_the_provider_was_handed_takes_time() -> None:
    """The same cut, with the space handed: it was spoken, so "Phone" is one character short."""
    ledger = Ledger(speaking_rate=1 / CHAR_S)
    u = ledger.speak_accepted(F(), "Address monday price. Phone ship")
    ledger.to_feed()
    ledger.text_handed(u, "c", "Address monday price. ", now=0.0)
    ledger.text_handed(u, "c", "Phone ship", now=0.0)
    ledger.words_timed("c", timings("Address monday price."))
    ledger.audio_pushed("c", audio_for("Address monday price.Phone"), now=0.0)
    assert heard(u) == "Address monday price."


def test_silence_past_the_last_timed_word_covers_no_text() -> None:
    """A pause between sentences is not speech: the estimate past the last timing counts only speech."""
    ledger = Ledger(speaking_rate=1 / CHAR_S)
    u = ledger.speak_accepted(F(), "Alpha beta. Gamma delta")
    ledger.to_feed()
    ledger.text_handed(u, "c", "Alpha beta.", now=0.0)
    ledger.text_handed(u, "c", "Gamma delta", now=0.0)
    ledger.words_timed("c", timings("Alpha beta."))
    ledger.audio_pushed("c", audio_for("Alpha beta."), now=0.0)
    # 50 ms of silence, then the audio of "Gam": without the silence rule the
    # estimate would reach past "Gamma".
    ledger.audio_pushed("c", 0.05 + audio_for("Gam"), now=0.0, silence=0.05)
    assert heard(u) == "Alpha beta."
    ledger.audio_pushed("c", audio_for("ma"), now=0.0)
    assert heard(u) == "Alpha beta. Gamma"


def test_silent_seconds_counts_whole_quiet_windows() -> None:
    """10 ms windows whose samples all stay near zero; speech, even quiet speech, is not silence."""
    import array

    from pipecat_resilient._timeline import silent_seconds

    rate = 16000
    quiet = array.array("h", [3, -5] * 800).tobytes()  # 100 ms of near-silence
    assert silent_seconds(array.array("h", [40] * 1600).tobytes(), rate) == 0.0  # quiet sound
    loud = array.array("h", [2000, -2000] * 400).tobytes()  # 50 ms of sound
    assert silent_seconds(quiet, rate) == pytest.approx(0.1)
    assert silent_seconds(loud, rate) == 0.0
    assert silent_seconds(loud + quiet + loud, rate) == pytest.approx(0.1, abs=0.011)
    assert silent_seconds(b"", rate) == 0.0
    # An odd trailing byte, and a tail shorter than a window, are not judged.
    assert silent_seconds(quiet[:101], rate) == 0.0
    assert silent_seconds(quiet[:641], rate) == pytest.approx(0.02)
    # Full scale negative is the loudest sample there is (its absolute value
    # does not fit in 16 bits).
    assert silent_seconds(array.array("h", [-32768, 0] * 800).tobytes(), rate) == 0.0


def test_unrecognised_words_do_not_move_the_cursor() -> None:
    """A timed word not in the text (or far ahead) anchors nothing; what matched stays."""
    ledger = Ledger()
    u = ledger.speak_accepted(F(), "alpha beta gamma")
    ledger.to_feed()
    ledger.text_handed(u, "c", u.text, now=0.0)
    ledger.words_timed("c", [("alpha", 0.0, 0.05), ("zeta", 0.06, 0.1)])
    ledger.audio_pushed("c", audio_for(u.text), now=0.0)
    assert heard(u) == "alpha"


def test_words_match_whole_tokens_only() -> None:
    """'a' inside 'and' is not the word 'a'."""
    ledger = Ledger()
    u = ledger.speak_accepted(F(), "and a cat")
    ledger.to_feed()
    ledger.text_handed(u, "c", u.text, now=0.0)
    ledger.words_timed("c", [("and", 0.0, 0.03), ("a", 0.04, 0.05)])
    ledger.audio_pushed("c", audio_for("and a"), now=0.0)
    assert heard(u) == "and a"


def test_timed_words_match_their_spoken_form() -> None:
    """A provider timing "hello" for "Hello," (case, punctuation) still anchors it."""
    ledger = Ledger()
    u = ledger.speak_accepted(F(), "Hello, World!")
    ledger.to_feed()
    ledger.text_handed(u, "c", u.text, now=0.0)
    ledger.words_timed("c", [("hello", 0.0, 0.06), ("world", 0.07, 0.13)])
    ledger.audio_pushed("c", 0.065, now=0.0)
    assert heard(u) == "Hello,"


def test_without_timings_the_rate_learned_from_finished_turns_estimates_conservatively() -> None:
    """No word timings: a finished context teaches the speaking rate, and an estimate never runs ahead."""
    ledger = Ledger(word_timings=False)
    for index in range(4):
        done = ledger.speak_accepted(F(), "A finished sentence that teaches the rate.")
        ledger.to_feed()
        ledger.text_handed(done, f"d{index}", done.text, now=0.0)
        ledger.closing_processed(done)
        ledger.audio_pushed(f"d{index}", audio_for(done.text), now=0.0)
        ledger.context_stopped(f"d{index}")
        assert done.settled
    u = ledger.speak_accepted(F(), "one two three four five six seven eight nine ten")
    ledger.to_feed()
    ledger.text_handed(u, "c", u.text, now=0.0)
    truly = "one two three four five six seven eight nine ten el"
    ledger.audio_pushed("c", audio_for(truly), now=0.0)
    # The estimate (5% slower than measured) stops short of the truth by a
    # word or two: said again, never skipped.
    whole = truly.rsplit(" ", 1)[0]
    assert whole.startswith(heard(u))
    assert len(heard(u).split()) >= len(whole.split()) - 2


def test_without_timings_or_a_rate_nothing_is_guessed() -> None:
    """No timings and no measured rate: only the final signal counts."""
    ledger = Ledger(word_timings=False)
    u = ledger.speak_accepted(F(), "one two three")
    ledger.to_feed()
    ledger.text_handed(u, "c", u.text, now=0.0)
    ledger.audio_pushed("c", audio_for(u.text), now=0.0)
    assert u.voiced == 0


def test_context_text_is_exactly_what_was_heard_once() -> None:
    """The context gets each heard word once, as it becomes heard, and never a word not yet heard."""
    ledger = Ledger()
    u = ledger.speak_accepted(F(), "one two three")
    ledger.to_feed()
    ledger.text_handed(u, "c", u.text, now=0.0)
    ledger.words_timed("c", timings(u.text))
    assert ledger.context_text(u) == ""
    ledger.audio_pushed("c", audio_for("one two"), now=0.0)
    assert ledger.context_text(u) == "one two"
    assert ledger.context_text(u) == ""
    ledger.audio_pushed("c", audio_for(" three"), now=0.0)
    assert ledger.context_text(u) == " three"


def test_final_signal_marks_a_flushed_utterance_heard_and_settles_it() -> None:
    """The provider's final for a fully handed speak means all of it was synthesized."""
    ledger = Ledger()
    u = ledger.speak_accepted(F(), "Short one.")
    ledger.to_feed()
    ledger.text_handed(u, "c", u.text, now=0.0)
    ledger.closing_processed(u)
    ledger.audio_pushed("c", 0.05, now=0.1)
    ledger.context_stopped("c")
    assert u.settled and u.voiced == len(u.text)
    assert ledger.context_text(u) == "Short one."
    assert ledger.in_flight == 0


def test_turn_replays_start_remaining_text_and_end_in_order() -> None:
    """A turn cut mid-way: a fresh start (its start already went out), the rest of the text, the end."""
    ledger = Ledger()
    start, end = F("start"), F("end")
    t1, t2 = F("t1"), F("t2")
    u = ledger.turn_started(start)
    ledger.text_accepted("First sentence. ", source=t1)
    ledger.text_accepted("Second one.", source=t2)
    ledger.turn_ended(end)
    actions = ledger.to_feed()
    assert kinds(actions) == ["start", "text", "text", "frame"]
    assert [a.frame for a in actions] == [start, t1, t2, end]
    ledger.frame_emerged(start)
    ledger.text_handed(u, "c", "First sentence.", now=0.0)
    ledger.words_timed("c", timings("First sentence."))
    ledger.audio_pushed("c", audio_for("First s"), now=0.1)
    ledger.connection_lost(now=0.2)
    ledger.connection_restored()
    actions = ledger.to_feed()
    assert kinds(actions) == ["start", "text", "text", "frame"]
    assert actions[0].frame is None  # synthetic: the original start already went downstream
    assert [a.text for a in actions[1:3]] == ["sentence. ", "Second one."]
    assert actions[3].frame is end
    assert u.kind is UtteranceKind.TURN


def test_a_replayed_context_is_timed_from_where_its_speech_begins() -> None:
    """After a drop, the fresh context's audio starts at the first unheard word."""
    ledger = Ledger()
    u = ledger.speak_accepted(F(), "one two three four")
    ledger.to_feed()
    ledger.text_handed(u, "c", u.text, now=0.0)
    ledger.words_timed("c", timings(u.text))
    ledger.audio_pushed("c", audio_for("one two th"), now=0.0)
    ledger.connection_lost(now=0.0)
    ledger.connection_restored()
    [action] = ledger.to_feed()
    assert action.text == "three four"
    ledger.text_handed(u, "d", action.text, now=0.0)
    ledger.words_timed("d", timings(action.text))
    ledger.audio_pushed("d", audio_for("three"), now=0.0)
    assert heard(u) == "one two three"


def test_turn_settles_when_its_end_frame_comes_out() -> None:
    """The end frame is queued behind the turn's audio: once it emerges the turn is done."""
    ledger = Ledger()
    start, end = F(), F()
    u = ledger.turn_started(start)
    ledger.text_accepted("Hi.")
    ledger.turn_ended(end)
    ledger.to_feed()
    assert ledger.frame_emerged(start)
    assert not u.settled
    assert ledger.frame_emerged(end)
    assert u.settled and ledger.in_flight == 0
    assert not ledger.frame_emerged(end)


def test_text_arriving_while_recovering_is_queued_then_fed() -> None:
    """Nothing is fed during recovery; everything is fed, in order, once restored."""
    ledger = Ledger()
    start = F()
    ledger.turn_started(start)
    ledger.to_feed()
    ledger.connection_lost(now=0.0)
    ledger.text_accepted("More text.")
    other = F("other")
    ledger.frame_accepted(other)
    assert ledger.to_feed() == []
    ledger.connection_restored()
    actions = ledger.to_feed()
    assert kinds(actions) == ["start", "text", "frame"]
    assert actions[0].frame is start  # never emerged, so the original goes again
    assert actions[2].frame is other


def test_interruption_drops_unsettled_interruptible_work() -> None:
    """Interrupted text is never replayed; uninterruptible work survives."""
    ledger = Ledger()
    keep = F("keep")
    ledger.speak_accepted(F(), "drop me")
    ledger.speak_accepted(keep, "keep me", interruptible=False)
    ledger.frame_accepted(F("frame"))
    ledger.to_feed()
    dropped = ledger.interrupted()
    assert [u.text for u in dropped] == ["drop me"]
    ledger.connection_lost(now=0.0)
    ledger.connection_restored()
    [action] = ledger.to_feed()
    assert action.kind is ActionKind.SPEAK and action.frame is keep


def test_interruption_closes_the_open_turn() -> None:
    """After an interruption, new text starts a new (loose) turn."""
    ledger = Ledger()
    first = ledger.turn_started(F())
    ledger.text_accepted("cut")
    ledger.interrupted()
    second = ledger.text_accepted("fresh")
    assert second is not first and second.text == "fresh"


def test_end_frame_closes_a_loose_turn() -> None:
    """An EndFrame flushes the open turn and settles it when it comes out."""
    ledger = Ledger()
    u = ledger.text_accepted("loose text")
    end = F("end")
    assert ledger.frame_accepted(end, closes_turn=True) is u
    assert u.closed
    ledger.to_feed()
    ledger.frame_emerged(end)
    assert u.settled


def test_spoken_utterance_with_nothing_left_is_closed_downstream() -> None:
    """A speak fully heard before the loss but never stopped downstream is closed, not replayed."""
    ledger = Ledger()
    u = ledger.speak_accepted(F(), "Two words", push_aggregation=True)
    ledger.to_feed()
    ledger.text_handed(u, "c", u.text, now=0.0)
    ledger.started_downstream(u, "c")
    ledger.words_timed("c", timings(u.text))
    ledger.audio_pushed("c", audio_for(u.text), now=0.0)
    ledger.connection_lost(now=0.1)
    ledger.connection_restored()
    [action] = ledger.to_feed()
    assert action.kind is ActionKind.CLOSE and action.utterance is u
    assert u.settled


def test_turn_with_nothing_left_closes_before_its_end_frame() -> None:
    """A turn heard in full whose end never came out: close it downstream, then its end."""
    ledger = Ledger()
    start, end = F(), F()
    u = ledger.turn_started(start)
    ledger.text_accepted("All of it.")
    ledger.turn_ended(end)
    ledger.to_feed()
    ledger.frame_emerged(start)
    ledger.text_handed(u, "c", "All of it.", now=0.0)
    ledger.started_downstream(u, "c")
    ledger.words_timed("c", timings("All of it."))
    ledger.audio_pushed("c", audio_for("All of it."), now=0.0)
    ledger.connection_lost(now=0.1)
    ledger.connection_restored()
    actions = ledger.to_feed()
    assert kinds(actions) == ["close"]
    assert actions[0].frame is end


def test_first_audio_watchdog() -> None:
    """Text handed and no audio within the timeout: overdue."""
    ledger = Ledger(first_audio_timeout=1.0, stall_timeout=1.0)
    u = ledger.speak_accepted(F(), "one two three four")
    ledger.to_feed()
    ledger.text_handed(u, "c", u.text, now=10.0)
    assert ledger.overdue(now=10.9) is None
    assert "no audio" in (ledger.overdue(now=11.1) or "")
    ledger.audio_pushed("c", 0.01, now=11.05)
    assert ledger.overdue(now=11.1) is None


def test_stall_watchdog_waits_only_while_audio_is_owed() -> None:
    """Audio pausing while a timed provider clearly owes more is a stall; a finished sentence is not."""
    ledger = Ledger(first_audio_timeout=1.0, stall_timeout=1.0)
    warm = ledger.speak_accepted(F(), "Warm up the measured speaking rate here.")
    ledger.to_feed()
    ledger.text_handed(warm, "w", warm.text, now=0.0)
    ledger.closing_processed(warm)
    ledger.words_timed("w", timings(warm.text))
    ledger.audio_pushed("w", audio_for(warm.text), now=0.0)
    ledger.context_stopped("w")
    u = ledger.turn_started(F())
    sentence = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen."
    ledger.text_accepted(sentence + " ")
    ledger.to_feed()
    ledger.text_handed(u, "c", sentence, now=0.0)
    ledger.words_timed("c", timings(sentence))
    ledger.audio_pushed("c", audio_for("one two"), now=0.1)
    assert ledger.overdue(now=0.5) is None
    assert "stalled" in (ledger.overdue(now=1.2) or "")
    # All of the sentence's audio arrived: it is done, the LLM is slow.
    ledger.audio_pushed("c", audio_for(sentence) - audio_for("one two"), now=1.3)
    assert ledger.overdue(now=5.0) is None


def test_flushed_utterance_owes_a_final_signal() -> None:
    """Once everything was handed over, silence without the final is a stall."""
    ledger = Ledger(first_audio_timeout=1.0, stall_timeout=1.0)
    u = ledger.speak_accepted(F(), "Hi")
    ledger.to_feed()
    ledger.text_handed(u, "c", "Hi", now=0.0)
    ledger.closing_processed(u)
    ledger.audio_pushed("c", 0.02, now=0.1)
    assert ledger.overdue(now=1.2) is not None
    ledger.context_stopped("c")
    assert ledger.overdue(now=5.0) is None


def test_without_word_timestamps_only_pending_and_final_count() -> None:
    """A service without word timings is not declared stalled between sentences."""
    ledger = Ledger(first_audio_timeout=1.0, stall_timeout=1.0)
    u = ledger.turn_started(F())
    ledger.text_accepted("one two three four. ")
    ledger.to_feed()
    ledger.text_handed(u, "c", "one two three four.", now=0.0)
    ledger.audio_pushed("c", 0.05, now=0.1)
    assert ledger.overdue(now=5.0) is None


def test_interruption_clears_the_first_audio_wait() -> None:
    """Text handed then interrupted owes no audio."""
    ledger = Ledger(first_audio_timeout=1.0)
    u = ledger.speak_accepted(F(), "never mind")
    ledger.to_feed()
    ledger.text_handed(u, "c", u.text, now=0.0)
    ledger.interrupted()
    assert ledger.overdue(now=5.0) is None


def test_evidence_from_a_draining_instance_counts_for_the_replay() -> None:
    """Audio already received by the failed instance still moves the cursor until drained."""
    ledger = Ledger()
    u = ledger.speak_accepted(F(), "one two three four")
    ledger.to_feed()
    ledger.text_handed(u, "c", u.text, now=0.0)
    ledger.words_timed("c", timings(u.text))
    ledger.connection_lost(now=0.1)
    ledger.audio_pushed("c", audio_for("one two "), now=0.1)
    ledger.drained()
    assert ledger.audio_pushed("c", audio_for("three"), now=0.2) is None
    ledger.connection_restored()
    [action] = ledger.to_feed()
    assert action.text == "three four"


def test_gave_up_names_the_unheard_text_and_returns_unemerged_frames() -> None:
    """Giving up empties the journal: the lost text and the frames still owed downstream."""
    ledger = Ledger()
    start, end = F("start"), F("end")
    u = ledger.turn_started(start)
    ledger.text_accepted("Heard part. Lost part.")
    ledger.turn_ended(end)
    ledger.to_feed()
    ledger.frame_emerged(start)
    ledger.text_handed(u, "c", "Heard part.", now=0.0)
    ledger.words_timed("c", timings("Heard part."))
    ledger.audio_pushed("c", audio_for("Heard part."), now=0.0)
    ledger.connection_lost(now=0.1)
    unspoken, frames = ledger.gave_up()
    assert unspoken == ["Lost part."]
    assert frames == [end]
    assert ledger.state is State.FAILED and ledger.in_flight == 0


def test_misuse_raises_invalid_state() -> None:
    """Restoring a connection that was never lost is a caller bug."""
    ledger = Ledger()
    with pytest.raises(InvalidState, match="connection restored while live"):
        ledger.connection_restored()
    ledger.connection_lost(now=0.0)
    with pytest.raises(InvalidState):
        ledger.connection_lost(now=0.0)
    with pytest.raises(InvalidState):
        ledger.text_handed(None, "c", "x", now=0.0)


def test_revive_after_giving_up() -> None:
    """A failed ledger can be revived for a fresh instance, with nothing to replay."""
    ledger = Ledger()
    ledger.connection_lost(now=0.0)
    ledger.gave_up()
    ledger.revived()
    ledger.connection_restored()
    assert ledger.state is State.LIVE and ledger.to_feed() == []


def test_memory_follows_what_is_in_flight() -> None:
    """A long session of settled utterances leaves nothing behind."""
    ledger = Ledger()
    for i in range(1000):
        start, end = F(), F()
        u = ledger.turn_started(start)
        ledger.text_accepted(f"Sentence number {i}.")
        ledger.turn_ended(end)
        ledger.to_feed()
        ledger.frame_emerged(start)
        ledger.text_handed(u, f"c{i}", u.text, now=float(i))
        ledger.audio_pushed(f"c{i}", 0.1, now=float(i))
        ledger.frame_emerged(end)
    assert ledger.in_flight == 0
    assert ledger._contexts == {}
    assert ledger._journal.by_frame == {}


def test_a_word_still_arriving_is_the_next_word_not_the_same_letters_further_on() -> None:
    """A provider's partial word ("the" of "then") anchors the next word, not a later whole "the"."""
    from pipecat_resilient._timeline import SpeakingRate, Text, Timeline

    text = "then the end"
    timeline, rate = Timeline(Text(text), 0), SpeakingRate()
    timeline.handed(3, text)
    timeline.audio(0.3)
    timeline.timed_words([("the", 0.0, 0.3)], rate, last_partial=True)
    # Its audio so far covers three letters of "then": no whole word is heard.
    assert timeline.voiced_end(rate, margin=0.0) == 0
    timeline.audio(0.1)
    timeline.timed_words([("then", 0.0, 0.4), ("th", 0.45, 0.5)], rate, last_partial=True)
    assert text[: timeline.voiced_end(rate, margin=0.0)] == "then"


def test_a_pause_before_a_late_timing_is_not_taken_for_speech() -> None:
    """Timings that arrive after their audio (and after a pause): the pause covers no words."""
    from pipecat_resilient._timeline import SpeakingRate, Text, Timeline

    text = "one two three"
    timeline, rate = Timeline(Text(text), 0), SpeakingRate()
    rate.assume(10)  # 0.1 s a character
    timeline.handed(3, text)
    timeline.audio(0.3)  # "one" and its space
    timeline.audio(0.5, silence=0.5)  # a pause
    timeline.audio(0.05)  # the start of "two"
    timeline.timed_words([("one", 0.0, 0.3)], rate, last_partial=False)
    # 0.55 s of audio after "one", of which 0.5 s silent: "two" is not heard yet.
    assert text[: timeline.voiced_end(rate, margin=0.0)] == "one"


def test_silence_is_measured_only_when_an_estimate_needs_it() -> None:
    """With timings covering the audio, the silence measurement (numpy on every frame) never runs."""
    from pipecat_resilient._timeline import SpeakingRate, Text, Timeline

    text = "alpha beta gamma"
    timeline, rate = Timeline(Text(text), 0), SpeakingRate()
    rate.assume(10)
    timeline.handed(3, text)
    measured: list[float] = []

    def silence() -> float:
        measured.append(0.0)
        return 0.0

    for word, start in (("alpha", 0.0), ("beta", 0.5), ("gamma", 1.0)):
        timeline.timed_words([(word, start, start + 0.5)], rate, last_partial=False)
        timeline.audio(0.5, silence=silence)
        timeline.voiced_end(rate, margin=0.0)
    assert measured == []
    assert text[: timeline.voiced_end(rate, margin=0.0)] == text
    # Audio past the last timing: now an estimate needs it (and measures the piece once).
    timeline.audio(0.4, silence=silence)
    timeline.voiced_end(rate, margin=0.0)
    timeline.voiced_end(rate, margin=0.0)
    assert len(measured) == 1
