"""ElevenLabs (multi-stream-input websocket): word timings to the character, error messages.

Every audio message carries the alignment of its characters (start and
duration in milliseconds, restarting at 0 in each message), so the audio that
covers each word is known exactly: the adapter turns it into word timings with
start and end, including the part of a word whose audio arrived so far (the
last word of a sentence is complete before anything follows it). An
``{"error": ..., "message": ..., "code": ...}`` message (the socket may stay open,
or close right after with 1008) fails the connection at once. Failures:
``code`` is an HTTP status or a close code: 401/403/402/4xx and policy closes
that name a bad key, voice or quota are permanent; 429, 5xx, 1011, 1012 are
transient.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from operator import add
from typing import Any

from pipecat_resilient.providers._base import (
    AdapterSink,
    TTSAdapter,
    WordTiming,
    failure_from_status,
    provider_closed,
    tap_messages,
)

__all__ = ["ElevenLabsAdapter"]

# A message is read only if it may carry one of these keys (audio messages
# without alignment, keepalive answers... are skipped unparsed).
_KEYS = re.compile(r'"(?:alignment|normalizedAlignment|error|isFinal)"')


@dataclass
class _Clock:
    """One context's audio clock and the word in progress at its end."""

    at: float = 0.0  # seconds of audio the context's messages covered so far
    word: str = ""
    word_start: float = 0.0
    word_end: float = 0.0
    words: list[WordTiming] = field(default_factory=list)


class ElevenLabsAdapter(TTSAdapter):
    """ElevenLabs' websocket TTS: exact word timings from the character alignment."""

    name = "ElevenLabs"

    def hook(self, service: Any, sink: AdapterSink) -> None:
        """Read each message before the stock service does."""
        clocks: dict[str, _Clock] = {}

        async def on_message(raw: str | bytes) -> None:
            if not isinstance(raw, str):
                return
            raw = _without_audio(raw)
            if _KEYS.search(raw) is None:
                return
            message = json.loads(raw)
            context_id = message.get("contextId") or message.get("context_id")
            if message.get("isFinal"):
                clocks.pop(context_id, None)
                return
            if message.get("error"):
                failure = failure_from_status(message.get("code"), self.name, "error message")
                await sink.provider_failed(failure, context_id)
                return
            alignment = message.get("normalizedAlignment") if _prefers_normalized(service) else None
            alignment = alignment or message.get("alignment") or message.get("normalizedAlignment")
            if not alignment or context_id is None:
                return
            clock = clocks.get(context_id)
            if clock is None:
                clock = clocks[context_id] = _Clock()
            words = _advance(clock, alignment)
            if words or clock.word:
                partial: list[WordTiming] = (
                    [(clock.word, clock.word_start, clock.word_end)] if clock.word else []
                )
                await sink.words_timed(context_id, words + partial, last_partial=bool(clock.word))

        tap_messages(service, on_message, lambda closed: provider_closed(closed, self.name, sink))


# The opening of the audio string: the key, then the value's opening quote
# (with JSON's whitespace around the colon, however the message is spaced).
_AUDIO_STRING = re.compile(r'"audio"[ \t\n\r]*:[ \t\n\r]*"')

# A word of an alignment: a run of characters that are not whitespace
# (``str.isspace``, as ``\s`` is for text patterns).
_TOKEN = re.compile(r"\S+")


def _without_audio(raw: str) -> str:
    """The message with its base64 audio left out (an empty string in its place).

    The stock service decodes every message whole anyway; decoding the audio
    a second time here (and scanning it for keys) would double the JSON cost
    of every message, which grows with its audio. Base64 has no quotes or
    backslashes, so the audio string ends at the next quote; a key inside a
    JSON string would have its quotes escaped, and only a key is followed by
    a colon, so ``"audio":`` found is the key. A message not shaped as
    expected is returned as it is.
    """
    found = _AUDIO_STRING.search(raw)
    if found is None:
        return raw  # no audio, null, or not a string
    end = raw.find('"', found.end())
    if end < 0:
        return raw
    return raw[: found.end()] + raw[end:]


def _prefers_normalized(service: Any) -> bool:
    # The stock service reads the normalized alignment only with pronunciation dictionaries.
    return bool(getattr(service, "_pronunciation_dictionary_locators", None))


def _advance(clock: _Clock, alignment: dict[str, Any]) -> list[WordTiming]:
    """Words completed by one message's alignment; ``clock`` keeps the word still arriving.

    Read a word at a time (the characters joined, split at whitespace), which
    gives what :func:`_advance_by_char` gives, for a fraction of its cost
    (it runs for every audio message); alignments whose entries are not
    single characters are read by that one.
    """
    chars = alignment.get("chars") or []
    starts = alignment.get("charStartTimesMs") or []
    durations = alignment.get("charDurationsMs") or []
    count = min(len(chars), len(starts), len(durations))
    if count < len(chars):
        chars = chars[:count]
    try:
        text = "".join(chars)
    except TypeError:
        return _advance_by_char(clock, chars, starts, durations)
    if len(text) != count:
        return _advance_by_char(clock, chars, starts, durations)
    at = clock.at
    words: list[WordTiming] = []
    if clock.word and count and text[0].isspace():
        words.append((clock.word, clock.word_start, clock.word_end))
        clock.word = ""
    for match in _TOKEN.finditer(text):
        first, after = match.span()
        word, start = match.group(), at + starts[first] / 1000
        end = at + starts[after - 1] / 1000 + durations[after - 1] / 1000
        if first == 0 and clock.word:
            word, start = clock.word + word, clock.word_start
        clock.word_start, clock.word_end = start, end
        if after < count:
            words.append((word, start, end))
            clock.word = ""
        else:
            clock.word = word
    if count:
        clock.at += max(0.0, max(map(add, starts[:count], durations[:count]))) / 1000
    return words


def _advance_by_char(
    clock: _Clock, chars: list[Any], starts: list[Any], durations: list[Any]
) -> list[WordTiming]:
    """:func:`_advance`, a character at a time."""
    words: list[WordTiming] = []
    end_ms = 0.0
    for char, start_ms, duration_ms in zip(chars, starts, durations, strict=False):
        start = clock.at + start_ms / 1000
        end = start + duration_ms / 1000
        end_ms = max(end_ms, start_ms + duration_ms)
        if char.isspace():
            if clock.word:
                words.append((clock.word, clock.word_start, clock.word_end))
                clock.word = ""
            continue
        if not clock.word:
            clock.word_start = start
        clock.word += char
        clock.word_end = end
    clock.at += end_ms / 1000
    return words
