"""The splice of a continuation onto what was heard, without asyncio: what is dropped, held, passed."""

from __future__ import annotations

from pipecat_resilient.splice import Held, Splice

RATE = 480  # bytes per character: 10 ms of 24 kHz 16-bit audio
STORY = "Once upon a time there was a socket that never closed."


def feed(splice: Splice, text: str, *, chunk: int = 5, now: float = 0.0) -> None:
    """The continuation ``text`` as Gemini sends it: each chunk's audio, then its transcription."""
    for start in range(0, len(text), chunk):
        piece = text[start : start + chunk]
        splice.held(("audio", piece), Held.AUDIO, size=len(piece) * RATE, now=now)
        splice.held(("text", piece), Held.TRANSCRIPT, text=piece, now=now)
        splice.held(("mirror", piece), Held.MIRROR, text=piece, now=now)


def kept(splice: Splice) -> tuple[int, str]:
    """Audio bytes and transcription released, after the skips."""
    audio, text = 0, ""
    for release in splice.releases():
        _, piece = release.item  # type: ignore[misc]
        if release.kind is Held.AUDIO:
            audio += len(piece) * RATE - release.skip
        elif release.kind is Held.TRANSCRIPT:
            text += piece[release.skip :]
    return audio, text


def cut_after(chars: int, *, transcribed: int | None = None) -> Splice:
    """A splice for a reply cut after ``chars`` characters of audio, ``transcribed`` of them transcribed."""
    said = STORY[: chars if transcribed is None else transcribed]
    cut = said.rfind(" ") + 1
    return Splice(heard=said[:cut], tail=said[cut:], heard_audio=chars * RATE, hold=0.3)


def test_a_continuation_after_the_words_heard_passes_whole() -> None:
    """The model went on after what was heard: nothing is dropped, and it is decided at its first word."""
    splice = cut_after(20)  # heard "Once upon a time ", "the" in part
    feed(splice, STORY[17:27])  # "there was "
    assert splice.decided and splice.drop_chars == 0 and splice.drop_bytes == 0
    assert kept(splice) == (10 * RATE, "there was ") and splice.heard_late == ""


def test_a_word_heard_in_part_is_known_to_play_from_its_first_piece() -> None:
    """The cut reply's transcription ran ahead of its audio (as Vertex AI sends it): "there" was heard
    only to "th". The model goes on with that word: whatever it turns out to be, it is played, so the
    splice decides on the first piece of its transcription, not once it is whole (its audio would wait
    for the word's whole transcription: dead air)."""
    splice = Splice(heard="Once upon a time ", tail="there was", heard_audio=19 * RATE, hold=0.3)
    splice.held(("audio", 0), Held.AUDIO, size=2 * RATE, now=0.0)
    splice.held(("text", 0), Held.TRANSCRIPT, text="th", now=0.0)
    assert splice.decided and (splice.drop_chars, splice.drop_bytes) == (0, 0)
    assert [release.skip for release in splice.releases()] == [0, 0]

    # A first piece that may still be a word heard in full (a restart's "Once") is waited for.
    splice = Splice(heard="Once upon a time ", tail="there was", heard_audio=19 * RATE, hold=0.3)
    splice.held(("text", 0), Held.TRANSCRIPT, text="Onc", now=0.0)
    assert not splice.decided


def test_a_restart_drops_exactly_the_words_heard_in_full() -> None:
    """The model said it all again: the audio and text of the words heard are dropped, the rest plays."""
    splice = cut_after(20)
    feed(splice, STORY[:25])
    # Where the repeat ends in the audio takes an exact rate: the end of the
    # continuation's (the session has none yet).
    assert not splice.decided and splice.releases() == []
    splice.ended(now=0.0)
    assert splice.decided
    assert (splice.drop_chars, splice.drop_bytes) == (17, 17 * RATE)  # "Once upon a time "
    audio, text = kept(splice)
    assert audio == (25 - 17) * RATE and text == "there wa"
    assert splice.heard_late == ""


def test_a_repeated_phrase_is_dropped_and_the_rest_passes() -> None:
    """The model repeated the last words heard, then went on: the repeat goes, nothing new does."""
    splice = cut_after(20)
    continuation = "upon a time there was a socket"
    for start in range(0, len(continuation), 5):
        piece = continuation[start : start + 5]
        splice.held(("a", start), Held.AUDIO, size=len(piece) * RATE, now=0.0)
        splice.held(("t", start), Held.TRANSCRIPT, text=piece, now=0.0)
    splice.ended(now=0.0)
    assert splice.decided and splice.drop_chars == len("upon a time ")


def test_a_word_heard_but_not_yet_transcribed_is_dropped_and_handed_back() -> None:
    """The cut's transcription stopped at "tim" though "time" was heard: its repeat goes, to the context."""
    splice = cut_after(20, transcribed=15)  # heard "Once upon a ", then "tim" transcribed
    feed(splice, "time there was")
    splice.ended(now=0.0)
    assert splice.decided and splice.drop_chars == len("time ")
    assert splice.heard_late == "time "


def test_a_new_word_is_never_dropped() -> None:
    """A restart that diverges from what was said keeps every word; only a confirmed repeat could go."""
    splice = cut_after(20)
    feed(splice, "Once upon a midnight dreary")
    assert splice.decided and splice.drop_chars == 0


def test_words_heard_beyond_the_cuts_transcription_are_not_dropped_unconfirmed() -> None:
    """Audio heard past the transcription, of words it never named: played again rather than guessed."""
    splice = cut_after(20, transcribed=5)  # "Once " transcribed, "Once upon a time the" heard
    feed(splice, STORY[:30])
    splice.ended(now=0.0)
    assert splice.decided and splice.drop_chars == len("Once ")
    assert kept(splice)[1] == STORY[5:30]


def test_the_hold_is_bounded() -> None:
    """No transcription comes: at the bound the audio is released as it is, nothing dropped."""
    splice = Splice(heard="Once upon a time ", heard_audio=17 * RATE, hold=0.3)
    splice.held("a1", Held.AUDIO, size=2400, now=10.0)
    assert not splice.expired(now=10.29)
    assert splice.expired(now=10.3)
    assert [(r.item, r.skip) for r in splice.releases()] == [("a1", 0)]
    assert splice.deadline == 10.3


def test_an_untrusted_rate_drops_nothing() -> None:
    """One transcription piece, behind its audio: where the repeat ends is unknown; nothing goes."""
    splice = Splice(heard="Once upon a time ", heard_audio=17 * RATE, hold=0.3)
    # Three chunks of audio, then the first five characters' transcription.
    splice.held("a1", Held.AUDIO, size=3 * 5 * RATE, now=0.0)
    splice.held("t1", Held.TRANSCRIPT, text="Once ", now=0.0)
    assert not splice.decided
    splice.expired(now=1.0)
    assert splice.decided and splice.drop_chars == 0


def test_at_the_bound_the_slope_decides() -> None:
    """Still going when the hold ends: the slope across its pieces places the repeat in the audio."""
    splice = cut_after(20)
    feed(splice, STORY[:40], now=0.0)
    assert not splice.decided
    assert splice.expired(now=0.3)
    assert (splice.drop_chars, splice.drop_bytes) == (17, 17 * RATE)


def test_the_sessions_rate_is_trusted_at_once() -> None:
    """With the rate learnt from whole replies, the first piece of a restart decides as soon as it can."""
    splice = Splice(heard="Once upon a ", heard_audio=12 * RATE, bytes_per_char=RATE, hold=0.3)
    splice.held("a1", Held.AUDIO, size=15 * RATE, now=0.0)
    splice.held("t1", Held.TRANSCRIPT, text="Once upon a tim", now=0.0)
    assert splice.decided and (splice.drop_chars, splice.drop_bytes) == (12, 12 * RATE)


def test_output_after_the_decision_is_trimmed_until_the_drop_is_done() -> None:
    """Transcription ahead of the audio: the decision comes first, the audio to drop after it."""
    splice = Splice(heard="Once upon a time ", heard_audio=17 * RATE, bytes_per_char=RATE, hold=0.3)
    splice.held("t1", Held.TRANSCRIPT, text="Once upon a time there ", now=0.0)
    assert splice.decided and splice.drop_bytes == 17 * RATE
    assert [r.skip for r in splice.releases()] == [17]
    assert splice.passing(Held.AUDIO, 10 * RATE) == 10 * RATE
    assert not splice.done
    assert splice.passing(Held.AUDIO, 10 * RATE) == 7 * RATE
    assert splice.passing(Held.MIRROR, 30) == 17
    assert splice.done


def test_the_end_of_the_continuation_decides() -> None:
    """A continuation that ends inside what was heard is decided when it ends."""
    splice = Splice(heard="Once upon a time ", heard_audio=17 * RATE, bytes_per_char=RATE, hold=0.3)
    splice.held("a1", Held.AUDIO, size=10 * RATE, now=0.0)
    splice.held("t1", Held.TRANSCRIPT, text="Once upon ", now=0.0)
    assert not splice.decided
    splice.held("end", Held.OTHER, now=0.0)
    splice.ended(now=0.0)
    assert splice.decided and splice.drop_chars == len("Once upon ")
    assert [r.skip for r in splice.releases()] == [10 * RATE, 10, 0]


def test_nothing_heard_means_nothing_to_drop() -> None:
    """A reply cut before any of it was heard: the answer plays whole."""
    splice = Splice(heard="", hold=0.3)
    feed(splice, STORY[:10])
    assert splice.decided and splice.drop_chars == 0


def test_a_repeat_of_the_last_words_said_decides_with_its_last_word() -> None:
    """The continuation repeated every word of the cut's transcription from where it joins: decided then.

    Its next word is past that transcription, so nothing it can say moves the
    splice; waiting for it (its transcription may come well after its audio)
    would only hold the new audio back.
    """
    # Heard "Once upon a time" ("tim" transcribed before the cut), the rate known.
    splice = Splice(heard="Once upon a ", tail="tim", heard_audio=16 * RATE, bytes_per_char=RATE, hold=0.3)
    splice.held("a1", Held.AUDIO, size=5 * RATE, now=0.0)
    splice.held("t1", Held.TRANSCRIPT, text="time", now=0.0)
    assert not splice.decided  # "time" may be "timer": not yet whole
    splice.held("t2", Held.TRANSCRIPT, text=" ", now=0.0)
    assert splice.decided and (splice.drop_chars, splice.drop_bytes) == (5, 5 * RATE)
    assert splice.heard_late == "time "
    assert [r.skip for r in splice.releases()] == [5 * RATE, 4, 1]


def test_a_restart_through_all_that_was_said_decides_with_its_last_word() -> None:
    """A restart that has said every word of the cut's transcription, all heard: decided with the last one."""
    splice = Splice(heard="Once upon a time ", heard_audio=17 * RATE, bytes_per_char=RATE, hold=0.3)
    feed(splice, "Once upon a time ")
    assert splice.decided and (splice.drop_chars, splice.drop_bytes) == (17, 17 * RATE)
    assert splice.heard_late == ""


def test_a_repeat_short_of_what_was_said_still_waits_for_the_next_word() -> None:
    """Words of the cut's transcription remain after the repeat: the next word may be one heard; it waits."""
    # "Once upon a time " heard, and "the" transcribed and heard.
    splice = Splice(
        heard="Once upon a time ", tail="the", heard_audio=20 * RATE, bytes_per_char=RATE, hold=0.3
    )
    feed(splice, "Once upon a time ")
    assert not splice.decided  # "the" (heard) or "there" (not all heard) comes next
    feed(splice, "the ")
    assert splice.decided and splice.drop_chars == len("Once upon a time the ")


def _cut(said: str, space: int, cut: int) -> Splice:
    """A reply cut after ``cut`` characters of audio, ``said`` transcribed (whole words to ``space``)."""
    tail = said[space:]
    return Splice(heard=said[:space], tail=tail, heard_audio=cut * RATE, bytes_per_char=RATE, hold=0.3)


def test_deciding_early_decides_as_the_whole_continuation_would() -> None:
    """Fed piece by piece, transcription with or behind its audio: decided as on all of it, ended."""
    for cut in range(1, 40):
        for transcribed in {cut, max(0, cut - 3), cut + 6}:  # with, behind or ahead of the audio
            said = STORY[:transcribed]
            space = said.rfind(" ", 0, cut) + 1  # the words heard: whole within the audio
            repeat_from = STORY.rfind(" ", 0, max(0, space - 1)) + 1
            for start in (space, 0, repeat_from):  # continue, restart, repeat the last word
                text = STORY[start:]
                for chunk in (1, 3, 5, 7):
                    for lag in (0, 2):
                        whole = _cut(said, space, cut)
                        whole.held("t", Held.TRANSCRIPT, text=text, now=0.0)
                        whole.held("a", Held.AUDIO, size=len(text) * RATE, now=0.0)
                        whole.ended(now=0.0)
                        early = _cut(said, space, cut)
                        pieces = [text[i : i + chunk] for i in range(0, len(text), chunk)]
                        for index in range(len(pieces) + lag):
                            if index < len(pieces):
                                early.held("a", Held.AUDIO, size=len(pieces[index]) * RATE, now=0.0)
                            if index >= lag:
                                early.held("t", Held.TRANSCRIPT, text=pieces[index - lag], now=0.0)
                        early.ended(now=0.0)
                        case = (cut, transcribed, start, chunk, lag)
                        assert early.drop_chars == whole.drop_chars, case
                        assert early.drop_bytes == whole.drop_bytes, case
                        assert early.heard_late == whole.heard_late, case


def test_at_the_bound_the_sessions_rate_drops_the_words_confirmed_so_far() -> None:
    """The hold ends before the first new word's transcription: the words confirmed repeated still go.

    One chunk of a restart and its transcription came ("Once "): too little for
    a slope, but the session's rate (learnt from whole replies) places the word
    in the audio exactly. It was heard in full before the cut: dropped, not
    played a second time because the next word's transcription was late.
    """
    splice = Splice(heard="Once upon a time ", heard_audio=17 * RATE, bytes_per_char=RATE, hold=0.3)
    splice.held("a1", Held.AUDIO, size=5 * RATE, now=0.0)
    splice.held("t1", Held.TRANSCRIPT, text="Once ", now=0.0)
    assert not splice.decided  # "upon" may be repeated too: the next word is awaited
    assert splice.expired(now=0.3)
    assert (splice.drop_chars, splice.drop_bytes) == (5, 5 * RATE)
    assert [(r.item, r.skip) for r in splice.releases()] == [("a1", 5 * RATE), ("t1", 5)]


def test_the_hold_counts_from_the_first_audio() -> None:
    """A continuation slow to begin has said nothing to decide on: the hold waits for its first audio.

    The reply opened at 0; nothing came for a second (a long conversation given
    to a fresh session, say). Deciding then would find nothing repeated and
    play a restart whole; the bound counts from the first audio instead.
    """
    splice = Splice(heard="Once upon a time ", heard_audio=17 * RATE, bytes_per_char=RATE, hold=0.3)
    assert not splice.expired(now=1.0) and splice.deadline is None
    splice.held("a1", Held.AUDIO, size=5 * RATE, now=1.0)
    splice.held("t1", Held.TRANSCRIPT, text="Once ", now=1.0)
    assert splice.deadline == 1.3 and not splice.decided
    assert splice.expired(now=1.3)
    assert (splice.drop_chars, splice.drop_bytes) == (5, 5 * RATE)
