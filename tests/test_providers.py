"""Provider adapters: what they read of a provider's messages, on message shapes the emulators do not send."""

from __future__ import annotations

import base64
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipecat_resilient.providers.elevenlabs import _advance, _advance_by_char, _Clock, _without_audio

_ALIGNMENT = {
    "chars": list('Say "hi" {now}: a/b\\c '),
    "charStartTimesMs": list(range(22)),
    "charDurationsMs": [5] * 22,
}
_AUDIO = base64.b64encode(os.urandom(3000)).decode()  # has "/" and "+", never a quote


@pytest.mark.parametrize(
    "message",
    [
        {
            "audio": _AUDIO,
            "isFinal": None,
            "normalizedAlignment": _ALIGNMENT,
            "alignment": _ALIGNMENT,
            "contextId": "c1",
        },
        {"contextId": "c2", "alignment": _ALIGNMENT, "audio": _AUDIO},  # audio last
        {"audio": None, "alignment": None, "contextId": "c3"},  # no audio
        {"isFinal": True, "contextId": "c4"},
        {"error": "bad", "message": 'the "audio": field', "code": 1008, "contextId": "c5"},
    ],
)
@pytest.mark.parametrize("encode", ["compact", "spaced", "indented", "escaped slashes"])
def test_elevenlabs_messages_are_read_whole_but_for_their_audio(message: dict, encode: str) -> None:
    """The base64 audio is left undecoded (the stock service decodes it); every other field reads the same."""
    raw = {
        "compact": lambda: json.dumps(message, separators=(",", ":")),
        "spaced": lambda: json.dumps(message),
        "indented": lambda: json.dumps(message, indent=2),
        "escaped slashes": lambda: json.dumps(message).replace("/", "\\/"),
    }[encode]()
    read = json.loads(_without_audio(raw))
    rest = {key: value for key, value in message.items() if key != "audio"}
    assert {key: value for key, value in read.items() if key != "audio"} == rest
    if isinstance(message.get("audio"), str):
        assert read["audio"] == ""  # left out, not decoded
        assert len(_without_audio(raw)) < len(raw) - 3000


_CHARS = st.sampled_from(list("ab .,\u00e9\t\n\u00a0\u3000'"))
_MESSAGE = st.integers(min_value=0, max_value=12).flatmap(
    lambda n: st.tuples(
        st.lists(_CHARS, min_size=n, max_size=n),
        st.lists(st.integers(min_value=0, max_value=400), min_size=n, max_size=n + 1),
        st.lists(st.integers(min_value=0, max_value=90), min_size=max(0, n - 1), max_size=n),
    )
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_MESSAGE, max_size=6))
def test_elevenlabs_alignment_read_a_word_at_a_time_gives_what_a_char_at_a_time_gives(messages: list) -> None:
    """Words, their times, the word still arriving and the clock: the same from both readings,
    over messages that split words anywhere, lead or end with whitespace, or carry uneven lists."""
    fast, slow = _Clock(), _Clock()
    for chars, starts, durations in messages:
        alignment = {"chars": chars, "charStartTimesMs": starts, "charDurationsMs": durations}
        assert _advance(fast, alignment) == _advance_by_char(slow, chars, starts, durations)
        assert (fast.at, fast.word, fast.word_start, fast.word_end) == (
            slow.at,
            slow.word,
            slow.word_start,
            slow.word_end,
        )


def test_elevenlabs_alignment_with_entries_longer_than_a_character_is_read_a_character_at_a_time() -> None:
    clock = _Clock()
    words = _advance(
        clock, {"chars": ["ab", " ", "c"], "charStartTimesMs": [0, 10, 20], "charDurationsMs": [10, 10, 10]}
    )
    assert words == [("ab", 0.0, 0.01)]
    assert (clock.word, clock.at) == ("c", 0.03)
