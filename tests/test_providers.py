"""Provider adapters: what they read of a provider's messages, on message shapes the emulators do not send."""

from __future__ import annotations

import base64
import json
import os

import pytest

from pipecat_resilient.providers.elevenlabs import _without_audio

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
