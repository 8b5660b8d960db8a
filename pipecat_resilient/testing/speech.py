"""A deterministic "speech" code: PCM audio that spells out the text it stands for.

The emulators synthesize text with :func:`encode` instead of a voice: every
character becomes a run of identical 16-bit samples whose value carries the
character and three flags. :class:`SpeechDecoder` reads any stream of such
audio back into words, so a test can assert on what a listener at the end of
a pipeline *heard*, from the audio alone, without trusting text frames.

Sample layout (little-endian signed 16-bit, always positive)::

    bits  0-10  character code point (characters above U+07FF become "?")
    bit   11    WORD_END     last character of a word
    bit   12    WORD_START   first character of a word
    bit   13    PARITY       alternates per character, so "ll" is two runs
    bit   14    MESSAGE_END  last character of one text message

A word is *heard* when all of its characters were played, its last one
included. A word whose audio was cut off (by a dropped socket or an
interruption) is a *fragment*: a listener heard part of it. Zero samples are
silence and are skipped. A decoded word spans the samples its audio took in
the stream: a character cut short (a stream that starts inside it, or ends
inside it) still decodes, but only the samples it had count toward the word.
"""

from __future__ import annotations

import array
import sys
from dataclasses import dataclass, field

__all__ = [
    "MESSAGE_END",
    "PARITY",
    "WORD_END",
    "WORD_START",
    "HeardWord",
    "SpeechDecoder",
    "encode",
    "samples_per_char",
]

CODE_MASK = 0x07FF
WORD_END = 0x0800
WORD_START = 0x1000
PARITY = 0x2000
MESSAGE_END = 0x4000
_SPACE = ord(" ")


def samples_per_char(sample_rate: int, ms_per_char: float) -> int:
    """Samples that encode one character at ``sample_rate``.

    Args:
        sample_rate: Audio sample rate in Hz.
        ms_per_char: Duration of one character in milliseconds.

    Returns:
        At least one sample.
    """
    return max(1, round(sample_rate * ms_per_char / 1000))


def encode(
    text: str,
    *,
    sample_rate: int,
    ms_per_char: float,
    message_end: bool = True,
    after: str = " ",
    then: str | None = None,
) -> bytes:
    """Encode ``text`` as speech-code PCM.

    Args:
        text: The characters to encode (spaces included; they take time too).
        sample_rate: Audio sample rate in Hz.
        ms_per_char: Duration of each character in milliseconds.
        message_end: Whether the last character closes a text message.
        after: The character spoken just before ``text`` (when a message is
            encoded in chunks), so a word split across chunks starts once.
        then: The character spoken just after ``text``, so a word split
            across chunks ends once (None: ``text`` ends its message, or a
            space follows when ``message_end`` is False).

    Returns:
        Little-endian 16-bit mono PCM.
    """
    spc = samples_per_char(sample_rate, ms_per_char)
    samples = array.array("h")
    previous = after or " "
    last = len(text) - 1
    following = " " if then is None else (then or " ")
    for index, char in enumerate(text):
        value = _code(char)
        if not char.isspace() and previous.isspace():
            value |= WORD_START
        following_char = text[index + 1] if index < last else following
        if not char.isspace() and following_char.isspace():
            value |= WORD_END
        if index % 2:
            value |= PARITY
        if message_end and index == last:
            value |= MESSAGE_END
        samples.extend([value] * spc)
        previous = char
    if sys.byteorder != "little":
        samples.byteswap()
    return samples.tobytes()


def _code(char: str) -> int:
    point = ord(char)
    if char.isspace():
        return _SPACE
    return point if 0 < point <= CODE_MASK else ord("?")


@dataclass(frozen=True, slots=True)
class HeardWord:
    """A word decoded from audio.

    Parameters:
        text: The characters heard.
        complete: Whether the whole word was heard (False for a fragment).
        offset: Sample index, in the decoded stream, where it began.
        end: Sample index, in the decoded stream, just past its last sample
            (a character cut short counts only the samples it had).
    """

    text: str
    complete: bool
    offset: int
    end: int


@dataclass
class SpeechDecoder:
    """Incremental decoder of speech-code audio into words.

    Feed it PCM in any chunking with :meth:`feed`; read :attr:`words`
    (everything so far, the word in progress included as a fragment),
    :meth:`heard` or :meth:`fragments`.

    Args:
        spc: Samples per character the audio was encoded with.
    """

    spc: int
    _run_value: int = 0
    _run_length: int = 0
    _run_start: int = 0
    _position: int = 0
    _done: list[HeardWord] = field(default_factory=list)
    _current: list[str] = field(default_factory=list)
    _current_offset: int = 0
    _current_end: int = 0
    _pending_byte: bytes = b""

    def feed(self, audio: bytes) -> None:
        """Decode another piece of PCM."""
        data = self._pending_byte + audio
        size = len(data) - len(data) % 2
        self._pending_byte = data[size:]
        block = 2 * self.spc
        value, length, start = self._run_value, self._run_length, self._run_start
        position = self._position
        offset = 0
        while offset < size:
            sample = data[offset : offset + 2]
            current = int.from_bytes(sample, "little", signed=True)
            if current != value or not length:
                if length:
                    self._end_run(value, length, start)
                value, length, start = current, 0, position
            # Whole characters at a time (compared in C), then the odd sample.
            pattern = sample * self.spc
            while offset + block <= size and data[offset : offset + block] == pattern:
                offset += block
                length += self.spc
                position += self.spc
            while offset < size and data[offset : offset + 2] == sample:
                offset += 2
                length += 1
                position += 1
        self._run_value, self._run_length, self._run_start = value, length, start
        self._position = position

    @property
    def words(self) -> list[HeardWord]:
        """Every word decoded so far; one still being spoken is a fragment."""
        words = list(self._done)
        pending = self._pending_words()
        return words + pending

    def heard(self) -> list[str]:
        """The words heard in full, in order."""
        return [word.text for word in self.words if word.complete]

    def fragments(self) -> list[str]:
        """The words heard only in part, in order."""
        return [word.text for word in self.words if not word.complete]

    def _pending_words(self) -> list[HeardWord]:
        # Decode the open run on a scratch copy, without consuming it.
        scratch = SpeechDecoder(self.spc)
        scratch._current = list(self._current)
        scratch._current_offset = self._current_offset
        scratch._current_end = self._current_end
        if self._run_length:
            scratch._end_run(self._run_value, self._run_length, self._run_start)
        if scratch._current:
            scratch._emit(complete=False)
        return scratch._done

    def _end_run(self, value: int, length: int, start: int) -> None:
        if value <= 0:
            # Silence, or something that is not speech code.
            return
        count = max(1, round(length / self.spc))
        char = chr(value & CODE_MASK)
        for index in range(count):
            offset = start + index * self.spc
            # The last character of the run ends where the run does: one cut
            # short (the stream began or ended inside it) spans what it had.
            end = start + length if index == count - 1 else offset + self.spc
            self._char(char, value, offset, end)

    def _char(self, char: str, value: int, offset: int, end: int) -> None:
        if char == " ":
            if self._current:
                # A space after a word whose end was not heard: cut off.
                self._emit(complete=False)
            return
        if value & WORD_START and self._current:
            # A new word began before the last one ended: the last was cut off.
            self._emit(complete=False)
        if not self._current:
            self._current_offset = offset
        self._current.append(char)
        self._current_end = end
        if value & (WORD_END | MESSAGE_END):
            self._emit(complete=True)

    def _emit(self, *, complete: bool) -> None:
        self._done.append(
            HeardWord("".join(self._current), complete, self._current_offset, self._current_end)
        )
        self._current = []
