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
    splice = Splice(heard="Once upon a time ", heard_audio=17 * RATE, hold=0.3, now=10.0)
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
