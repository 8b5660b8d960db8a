"""Audio-time evidence of what a listener heard, for the ledger: the text, a context's timeline, the rate.

A word counts as heard when the audio that covers it has gone downstream.
For one provider context on the live instance, a :class:`Timeline` holds the
seconds of audio pushed downstream and the *anchors* the provider reported:
"the audio of the text up to position p ends at t seconds" (a word's start
time anchors the text before it, its end time the word itself). Anchors may
arrive before or after the audio they describe, grouped and late; an anchor
counts only once the audio pushed reaches its time. Past the last anchor the
position is estimated from the :class:`SpeakingRate` learned in this session,
conservatively (its spread widens the margin), and always rounded *down* to
the end of a whole word, so that a word is never counted heard on a guess that
might be wrong: the worst an estimate does is have a word said again.

Only speech moves an estimate: silence in the audio past the last anchor (a
pause between sentences, measured by :func:`silent_seconds`) covers no text,
and the whitespace between two pieces of text handed to the provider
separately (which it never received, so never spoke) takes no time.

:class:`Text` keeps an utterance's text in chunks, so that appending a token and
reading the few characters around a position cost the same at the end of a
100,000-token turn as at its start.

Nothing here reads a clock or touches I/O; times are seconds of audio.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

__all__ = ["SpeakingRate", "Text", "Timeline", "silent_seconds"]

# How far past the match cursor a word the provider timed may be found.
# Word timings carry the text as spoken, so normally only whitespace separates
# the cursor from the next word; the slack covers words a text transform
# dropped before synthesis.
MATCH_WINDOW_CHARS = 64

# Audio times compare with this tolerance (seconds): providers round them.
_EPSILON_S = 1e-6

# slow() not yet computed for a margin (None is a value: the rate is not known).
_UNSET = object()

# Text is kept in chunks of about this many characters.
_CHUNK_CHARS = 512

# Characters that do not count when a timed word is matched to the text.
_NOT_WORD = re.compile(r"[^\w]+")

# A whitespace-delimited token.
_TOKEN = re.compile(r"\S+")

# A whitespace character and any other one (``str.isspace``: \s is the same
# test for text patterns).
_SPACE = re.compile(r"\s")
_NON_SPACE = re.compile(r"\S")

# Silence: a window of audio whose samples all stay within this amplitude
# (16-bit; about -66 dBFS: the digital silence TTS providers put between
# sentences), in windows of this many seconds.
SILENCE_PEAK = 16
SILENCE_WINDOW_S = 0.01


def silent_seconds(audio: bytes, sample_rate: int, channels: int = 1) -> float:
    """Seconds of silence in a piece of 16-bit PCM (whole quiet windows of ``SILENCE_WINDOW_S``).

    A quiet stretch inside a word (a stop consonant) may count too: that only
    makes an estimate of what was heard smaller, which is the safe side. A
    piece's tail shorter than a window is not judged (a pause lasts longer).
    """
    if sample_rate <= 0:
        return 0.0
    per_second = sample_rate * max(1, channels)
    window = max(1, int(per_second * SILENCE_WINDOW_S))
    whole = len(audio) // 2 // window * window
    if not whole:
        return 0.0
    samples = np.frombuffer(audio, dtype=np.int16, count=whole).reshape(-1, window)
    # The absolute value of -32768 stays -32768 in 16 bits; read as unsigned
    # it is 32768, loud, as it should be (and no wider copy is made).
    peaks = np.abs(samples).view(np.uint16).max(axis=1)
    return int(np.count_nonzero(peaks <= SILENCE_PEAK)) * window / per_second


class Text:
    """Append-only text kept in chunks.

    Appending is O(1) amortised and a slice costs O(log n + its length), so
    per-token work does not grow with the length of the text. ``str(text)``
    joins the whole (cached until the next append).
    """

    __slots__ = ("_joined", "_length", "_parts", "_starts")

    def __init__(self, text: str = "") -> None:
        """Create a text, empty or holding ``text``."""
        self._parts: list[str] = []
        self._starts: list[int] = []
        self._length = 0
        self._joined: str | None = ""
        if text:
            self.append(text)

    def append(self, text: str) -> None:
        """Add ``text`` at the end."""
        if not text:
            return
        if self._parts and len(self._parts[-1]) < _CHUNK_CHARS and self._joined is None:
            # Tokens are short: gather them into chunks, so that a slice spans
            # one or two parts (copying at most a chunk per token).
            self._parts[-1] += text
        else:
            self._parts.append(text)
            self._starts.append(self._length)
        self._length += len(text)
        self._joined = None

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        if self._joined is None:
            self._joined = "".join(self._parts)
            self._parts, self._starts = [self._joined], [0]
        return self._joined

    def slice(self, start: int, end: int) -> str:
        """``str(self)[start:end]`` for ``0 <= start``, without joining the whole."""
        parts = self._parts
        if len(parts) == 1 and end >= 0:
            # Joined, or short (a sentence is one chunk).
            return parts[0][start:end]
        if self._joined is not None:
            return self._joined[start:end]
        end = min(end, self._length)
        if start >= end:
            return ""
        index = bisect.bisect_right(self._starts, start) - 1
        offset = self._starts[index]
        part = self._parts[index]
        if end - offset <= len(part):
            # Within one chunk (nearly always: slices are a few words long).
            return part[start - offset : end - offset]
        pieces: list[str] = []
        while index < len(self._parts) and self._starts[index] < end:
            part, offset = self._parts[index], self._starts[index]
            pieces.append(part[max(0, start - offset) : end - offset])
            index += 1
        return "".join(pieces)

    def next_word_start(self, position: int) -> int:
        """The index of the first non-space character at or after ``position``."""
        if len(self._parts) == 1 and position >= 0:
            # One chunk (a sentence): searched in place.
            found = _NON_SPACE.search(self._parts[0], position)
            return self._length if found is None else found.start()
        while position < self._length:
            window = self.slice(position, position + MATCH_WINDOW_CHARS)
            stripped = len(window) - len(window.lstrip())
            position += stripped
            if stripped < len(window):
                return position
        return self._length

    def word_end_at_or_before(self, position: int, floor: int) -> int:
        """``position`` moved back so that it does not cut a word (never below ``floor``).

        A position inside a word moves back to that word's start: half a word
        heard is not a word heard.
        """
        position = min(position, self._length)
        if position <= floor:
            return floor
        if self._boundary(position):
            return position
        # Inside a word: back past its characters to the whitespace before it.
        while position > floor:
            window_start = max(floor, position - MATCH_WINDOW_CHARS)
            window = self.slice(window_start, position)
            for offset in range(len(window) - 1, -1, -1):
                if window[offset].isspace():
                    return window_start + offset + 1
            position = window_start
        return floor

    def _boundary(self, position: int) -> bool:
        """Whether ``position`` is outside a word: at either end of the text or at whitespace."""
        if position <= 0 or position >= self._length:
            return True
        parts = self._parts
        if len(parts) == 1:
            return parts[0][position].isspace()
        return self.slice(position, position + 1).isspace()

    def words_after(self, position: int, count: int) -> int:
        """The end of the ``count``-th whole word after ``position`` (or the end of the text)."""
        for _ in range(count):
            start = self.next_word_start(position)
            if start >= self._length:
                return self._length
            position = self._word_end_from(start)
        return position

    def _word_end_from(self, start: int) -> int:
        position = start
        while position < self._length:
            window = self.slice(position, position + MATCH_WINDOW_CHARS)
            space = _SPACE.search(window)
            if space is not None:
                return position + space.start()
            position += len(window)
        return self._length

    def find_word(self, word: str, start: int, end: int | None = None) -> int | None:
        """Find ``word`` as a whole whitespace-delimited token near ``start``, before ``end``.

        Compared as written first, then ignoring case and punctuation (a
        provider may time the spoken form: "hello" for "Hello,").

        Args:
            word: The word.
            start: Where to look from.
            end: Where the text that may hold it ends (the text handed to the
                provider: a text still growing ends mid-word, which is no end).

        Returns:
            Where it starts, or None when it is not within the match window.
        """
        found = self.find_token(word, start, end)
        return None if found is None else found[0]

    def find_token(self, word: str, start: int, end: int | None = None) -> tuple[int, int] | None:
        """:meth:`find_word`, with the end of the token found: ``(start, end)`` or None.

        Reads one window of the text (the match window, a character either
        side for the word boundaries, and the token's rest), not a slice per
        check: it runs for every word a provider times.
        """
        end = self._length if end is None else min(end, self._length)
        # The usual case first: the word, as written, is the next one.
        begin = self.next_word_start(start)
        after = begin + len(word)
        if (
            word
            and after <= end
            and self.slice(begin, after) == word
            and self._boundary(after)
            and (begin == 0 or self.slice(begin - 1, begin).isspace())
        ):
            return begin, after
        low = max(0, start - 1)
        reach = start + 2 * MATCH_WINDOW_CHARS + len(word) + 1
        chunk = self.slice(low, reach)
        offset = start - low
        lead = len(chunk) - offset - len(chunk[offset:].lstrip())
        if lead > MATCH_WINDOW_CHARS:
            # More whitespace than the window holds: none of it can hold the
            # word, so look from where the next word starts.
            return self.find_token(word, self.next_word_start(start), end)
        limit = min(end, start + lead + MATCH_WINDOW_CHARS + len(word))
        if limit <= start:
            return None  # nothing to look in (the text that may hold it ends before)
        window = chunk[offset : limit - low]
        length = self._length

        def spaced(position: int) -> bool:
            # A boundary: either end of the text, or whitespace (inside the chunk).
            return position <= 0 or position >= length or chunk[position - low].isspace()

        def whole(begin: int, size: int) -> bool:
            after = begin + size
            return (begin == 0 or spaced(begin - 1)) and (after >= end or spaced(after))

        def token(begin: int) -> tuple[int, int]:
            match = _TOKEN.match(chunk, begin - low)
            stop = low + (match.end() if match else begin - low)
            if stop >= low + len(chunk) and stop < length:
                stop = self._word_end_from(begin)  # a token longer than the chunk holds
            return begin, stop

        position = window.find(word)
        while position >= 0:
            if whole(start + position, len(word)):
                return token(start + position)
            position = window.find(word, position + 1)
        wanted = _NOT_WORD.sub("", word).casefold()
        if not wanted:
            return None
        for match in _TOKEN.finditer(window):
            begin = start + match.start()
            text = match.group(0)
            if whole(begin, len(text)) and _NOT_WORD.sub("", text).casefold() == wanted:
                return token(begin)
        return None

    def token_length(self, position: int) -> int:
        """The length of the whitespace-delimited token starting at ``position``."""
        return self._word_end_from(position) - position


class SpeakingRate:
    """Seconds of audio per character, as measured in this session: mean and spread.

    Samples are weighted by the characters they cover (Welford's method).
    :meth:`slow` is the conservative figure for estimating how much text some
    audio covered: a slower rate means fewer characters, so an estimate errs
    towards saying a word again, never towards skipping one.
    """

    __slots__ = ("_chars", "_m2", "_mean", "_samples", "_slow")

    # An estimate needs a few samples before its spread means anything, or one
    # long one (a whole sentence, from a provider without word timings).
    MIN_SAMPLES = 3
    MIN_CHARS = 10
    ENOUGH_CHARS = 40

    def __init__(self) -> None:
        """Start with nothing measured."""
        self._chars = 0.0
        self._mean = 0.0
        self._m2 = 0.0
        self._samples = 0
        # slow() as last computed, by margin (asked for every piece of audio;
        # it changes only with a sample).
        self._slow: dict[float, float | None] = {}

    def assume(self, chars_per_second: float) -> None:
        """Start from a known rate (as if a few sentences at it had been measured).

        Measurements refine it from there; a rate given too fast would make
        estimates skip words, so give the slowest the voice speaks at.
        """
        for _ in range(self.MIN_SAMPLES):
            self.add(self.MIN_CHARS / chars_per_second, self.MIN_CHARS)

    def add(self, seconds: float, chars: int) -> None:
        """Record that ``chars`` characters took ``seconds`` of audio."""
        if chars <= 0 or seconds <= 0 or not math.isfinite(seconds):
            return
        value = seconds / chars
        self._slow.clear()
        self._samples += 1
        self._chars += chars
        delta = value - self._mean
        self._mean += delta * chars / self._chars
        self._m2 += chars * delta * (value - self._mean)

    @property
    def known(self) -> bool:
        """Whether enough was measured to estimate with."""
        if self._chars >= self.ENOUGH_CHARS:
            return True
        return self._samples >= self.MIN_SAMPLES and self._chars >= self.MIN_CHARS

    @property
    def mean(self) -> float | None:
        """Mean seconds per character, when known."""
        return self._mean if self.known else None

    def slow(self, *, margin: float = 0.0) -> float | None:
        """A slow bound on seconds per character: the mean plus two deviations, plus ``margin`` of it."""
        value = self._slow.get(margin, _UNSET)
        if value is not _UNSET:
            return value  # type: ignore[return-value]
        value = None
        if self.known:
            spread = math.sqrt(max(0.0, self._m2 / self._chars))
            value = (self._mean + 2 * spread) * (1 + margin)
        self._slow[margin] = value
        return value

    def fast(self) -> float | None:
        """A fast bound on seconds per character (how little audio some text may take)."""
        if not self.known:
            return None
        spread = math.sqrt(max(0.0, self._m2 / self._chars))
        return max(self._mean - 2 * spread, self._mean / 2)


class Timeline:
    """What the audio of one provider context covers of one utterance's text.

    Args:
        text: The utterance's text.
        base: Where in ``text`` this context's speech begins.
    """

    __slots__ = (
        "_ahead",
        "_gaps",
        "_known",
        "_known_s",
        "_pieces",
        "_reached",
        "_spaced_end",
        "anchors_reached",
        "audio_s",
        "base",
        "final",
        "handed_end",
        "handed_words",
        "match_pos",
        "text",
        "timed",
    )

    def __init__(self, text: Text, base: int) -> None:
        """Start a context's timeline at ``base``."""
        self.text = text
        self.base = base
        self.handed_end = base
        self.handed_words = 0
        self.match_pos = base
        self.audio_s = 0.0
        self.final = False
        self.timed = False  # the provider reported word timings for it
        self._ahead: deque[tuple[int, float]] = deque()  # anchors the audio has not reached
        self._reached = (base, 0.0)  # the furthest anchor it has
        self.anchors_reached = 0  # how many anchors the audio has reached so far
        # The pieces of audio from the one the furthest anchor falls in (all of
        # them, until an anchor is reached): [end, seconds, silence], the
        # silence measured only when an estimate needs it.
        self._pieces: deque[list[Any]] = deque()
        self._known = 0  # of them, how many from the first have their silence in _known_s
        self._known_s = 0.0
        self._spaced_end = True  # the text handed so far ended in whitespace
        self._gaps: set[int] = set()  # word ends whose following whitespace was never handed

    # -- inputs ------------------------------------------------------------

    def handed(self, words: int, text: str | None = None) -> None:
        """``words`` more words of the text were handed to the provider in this context.

        Args:
            words: How many words.
            text: The text as handed, when known: whitespace between it and
                the text handed before it that neither carries was never
                spoken.
        """
        if text:
            if words and self.handed_words and not self._spaced_end and not text[:1].isspace():
                self._gaps.add(self.handed_end)
            self._spaced_end = text[-1:].isspace()
        self.handed_words += words
        self.handed_end = self.text.words_after(self.handed_end, words)

    def audio(self, seconds: float, silence: float | Callable[[], float] = 0.0) -> None:
        """``seconds`` more audio of this context went downstream.

        Args:
            seconds: How much.
            silence: How much of it was silent, or a callable that measures
                it (called only if an estimate past the last anchor needs it:
                with word timings, rarely).
        """
        self.audio_s += seconds
        self._pieces.append([self.audio_s, seconds, silence])
        self._advance()

    @property
    def silence_s(self) -> float:
        """Seconds of silence in the audio from the piece the furthest anchor falls in
        (in all of this context's audio, if no anchor was reached)."""
        pieces = self._pieces
        for index in range(self._known, len(pieces)):
            piece = pieces[index]
            if callable(piece[2]):
                piece[2] = piece[2]()  # measured once (and the audio let go)
            piece[2] = min(max(piece[2], 0.0), piece[1])
            self._known_s += piece[2]
        self._known = len(pieces)
        return max(0.0, self._known_s)

    def timed_words(
        self, words: Iterable[tuple[str, float, float | None]], rate: SpeakingRate, *, last_partial: bool
    ) -> int:
        """The provider timed ``words`` (``(word, start, end)``, seconds from the context's start).

        Args:
            words: In order; ``end`` may be None when the provider gives starts only.
            rate: The session's speaking rate, fed from consecutive anchors.
            last_partial: The last word is a prefix of a word whose audio is
                still arriving (its end is where the audio so far ends).

        Returns:
            How many words were matched to the text.
        """
        items = list(words)
        matched = 0
        for index, (word, start, end) in enumerate(items):
            if last_partial and index == len(items) - 1:
                # A word still arriving: the beginning of the next word (looked
                # for first: the same letters as a whole word further on are
                # not it). Only the characters that arrived are anchored; the
                # word is whole (and heard) once its anchor reaches its end.
                position = self._prefix_at(word)
                if position is None:
                    found = self.text.find_token(word, self.match_pos, self.handed_end)
                    if found is None:
                        continue
                    position = found[0]
                matched += 1
                self.timed = True
                self._anchor(position, start, rate)
                if end is not None:
                    self._anchor(position + len(word), end, rate)
                continue
            found = self.text.find_token(word, self.match_pos, self.handed_end)
            if found is None:
                continue
            position, token_end = found
            matched += 1
            self.timed = True
            self._anchor(position, start, rate)
            if end is not None:
                self._anchor(token_end, end, rate)
            self.match_pos = token_end
        self._advance()
        return matched

    def _prefix_at(self, prefix: str) -> int | None:
        start = self.text.next_word_start(self.match_pos)
        if start + len(prefix) <= self.handed_end and self.text.slice(start, start + len(prefix)) == prefix:
            return start
        return None

    def _anchor(self, position: int, time: float, rate: SpeakingRate) -> None:
        last_position, last_time = self._ahead[-1] if self._ahead else self._reached
        if position <= last_position or time < last_time - _EPSILON_S:
            return  # not past the last anchor: a repeat, or out of order
        # A sample of the speaking rate. From the context's start it includes
        # any leading silence, which only makes the rate look slower: safe.
        rate.add(time - last_time, position - last_position)
        self._ahead.append((position, time))

    def _advance(self) -> None:
        ahead, audio = self._ahead, self.audio_s + _EPSILON_S
        reached = None
        while ahead and ahead[0][1] <= audio:
            reached = self._reached = ahead.popleft()
            self.anchors_reached += 1
        if reached is not None:
            # Audio wholly before the anchor no longer counts. The silence of
            # the piece it falls in may lie after it: counting all of it as
            # after only makes estimates smaller.
            pieces, time = self._pieces, reached[1]
            while pieces and pieces[0][0] <= time:
                piece = pieces.popleft()
                if self._known:
                    self._known -= 1
                    self._known_s -= piece[2]

    # -- outputs -----------------------------------------------------------

    def voiced_end(self, rate: SpeakingRate, *, margin: float) -> int:
        """The end of the last whole word whose audio went downstream, as far as the evidence shows.

        Args:
            rate: The session's speaking rate, for the text past the last anchor.
            margin: Extra slowness assumed for that estimate (for providers
                without word timings, whose estimate has nothing to correct it).
        """
        if self.final:
            return self.handed_end
        position, time = self._reached
        slow = rate.slow(margin=margin)
        after = self.audio_s - time
        # Silence only takes away from an estimate: it is measured only when
        # the audio past the anchor could cover a character at all.
        if slow is not None and after > 0 and int(after / slow + _EPSILON_S) > 0:
            speech = after - self.silence_s
            if speech > 0:
                if position in self._gaps:
                    position = self.text.next_word_start(position)
                position += int(speech / slow + _EPSILON_S)
        position = min(position, self.handed_end)
        return self.text.word_end_at_or_before(position, self.base)

    def owes_audio(self, rate: SpeakingRate, *, slack_s: float) -> bool:
        """Whether the provider clearly owes audio for text handed to it (a stall, if none comes)."""
        if self.final or self.handed_words == 0:
            return False
        fast = rate.fast()
        if fast is None or not self.timed:
            return False
        return (self.handed_end - self.base) * fast > self.audio_s + slack_s
