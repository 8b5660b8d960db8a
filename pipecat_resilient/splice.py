"""Sans-I/O check of a continuation against what the user heard of the reply it continues.

When a speech-to-speech reply is cut and a fresh (or resumed) session is asked
to go on with it, the model is given what the user heard as its own partial
turn. Real models then do one of three things: continue after the words heard,
say the whole reply again, or repeat the last phrase before going on. Which,
shows only in the continuation's output transcription, and the audio comes
with (or before) it. A :class:`Splice` holds the continuation's output back
until the transcription says where it joins what was heard, then releases it
with the audio of words the user already heard cut out:

* the *heard point* is where the cut reply's audio stopped, in characters of
  its transcription: the audio that went downstream divided by the speech
  rate (bytes per character). The rate is learnt from the session's whole
  replies, else from the continuation itself (its audio against its
  transcription, measured as a slope so that a transcription running ahead
  of or behind the audio does not bias it);
* the continuation is aligned with the cut reply's transcription at a word
  start (the earliest that the words agree with), or after it. Its leading
  words that the cut reply's transcription confirms, and whose audio ended
  before the heard point, were heard: their audio and text are dropped. A
  word the user heard whose transcription had not arrived before the cut is
  dropped from the audio and handed back as *heard late*, for the context;
* nothing else is ever dropped: a word the cut reply's transcription does not
  confirm, or one the user heard only in part, is played;
* it decides as soon as the transcription shows where the continuation joins:
  at the first word past the heard point, or at the last word of the cut
  reply's transcription when the continuation repeated all of it from where
  it joins (no word after that one can change what is dropped), so new audio
  is not held for the transcription of a word that comes after it;
* the hold is bounded: ``hold`` seconds after the continuation's first audio
  the splice decides with what it knows (words confirmed so far), so a late
  transcription costs at most that much delay, never a lost word. The hold
  counts from the first audio, not from the reply's start: until audio comes,
  nothing is held back from the listener, and a continuation whose first
  output is slow to come has said nothing to decide on.

Inputs are the held output, in order (:meth:`Splice.held`), the end of the
continuation (:meth:`Splice.ended`) and the clock (:meth:`Splice.expired`);
the output is :meth:`Splice.releases`: every held item with how much of its
start to skip. Time and sizes are passed in; nothing here reads a clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

__all__ = ["Held", "Release", "Splice"]

_WORD = re.compile(r"\S+")
_PUNCTUATION = ".,;:!?\"'()[]{}-\u2014\u2013\u2026"
# A rate measured over fewer characters than this is too coarse to trust.
_MIN_SLOPE_CHARS = 8


class Held(Enum):
    """What a held item carries.

    Parameters:
        AUDIO: Audio of the continuation (its size in bytes).
        TRANSCRIPT: The continuation's output transcription (its text): what
            the decision is read from, trimmed of the repeated words.
        MIRROR: Another copy of that text (an ``LLMTextFrame`` for RTVI),
            trimmed the same way.
        OTHER: Anything else; held only to keep the order.
    """

    AUDIO = "audio"
    TRANSCRIPT = "transcript"
    MIRROR = "mirror"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Release:
    """One held item, released.

    Parameters:
        item: What the caller held.
        kind: What it carries.
        skip: Leading bytes (audio) or characters (text) to drop; the whole
            item is dropped when ``skip`` is its size.
    """

    item: object
    kind: Held
    skip: int


@dataclass
class _Item:
    item: object
    kind: Held
    size: int


def _norm(word: str) -> str:
    return word.strip(_PUNCTUATION).casefold()


def _agree(ours: str, theirs: str, *, ours_whole: bool, theirs_whole: bool) -> bool:
    """Whether two words can be the same word (one of them may still be arriving)."""
    a, b = _norm(ours), _norm(theirs)
    if ours_whole and theirs_whole:
        return a == b
    if not ours_whole and not theirs_whole:
        return a.startswith(b) or b.startswith(a)
    partial, whole = (a, b) if not ours_whole else (b, a)
    return whole.startswith(partial)


class Splice:
    """Where a continuation joins what the user heard of the reply it continues.

    Args:
        heard: The cut reply's transcription that went downstream with its
            audio, in whole words (what the model was told it had said).
        tail: Transcription of the cut reply received past ``heard`` (a word
            still arriving, or words whose audio had not all arrived).
        heard_audio: Bytes of the cut reply's audio that went downstream,
            from where ``audio_from`` says.
        audio_from: Characters of ``heard`` before that audio began (0 unless
            the cut reply was itself a continuation).
        bytes_per_char: The session's speech rate, learnt from whole replies,
            or None when there is none yet.
        hold: Longest the output is held, in seconds, counted from its first audio.
    """

    def __init__(
        self,
        *,
        heard: str,
        tail: str = "",
        heard_audio: int = 0,
        audio_from: int = 0,
        bytes_per_char: float | None = None,
        hold: float = 0.3,
    ) -> None:
        """Start checking a continuation."""
        self._said = heard + tail
        self._heard_end = len(heard.rstrip())
        self._said_words = [(m.start(), m.group()) for m in _WORD.finditer(self._said)]
        # The last word of the cut reply's transcription may be incomplete.
        self._said_last_whole = not self._said or self._said[-1].isspace()
        self._heard_audio = heard_audio
        self._audio_from = audio_from
        self._prior = bytes_per_char if bytes_per_char and bytes_per_char > 0 else None
        self._hold = hold
        self._started: float | None = None  # when the first audio was held: the hold counts from there
        self._items: list[_Item] = []
        self._audio = 0  # bytes of continuation audio held so far
        self._text = ""  # the continuation's transcription so far
        self._mirror = 0  # characters of mirrored text so far
        self._anchors: list[tuple[int, int]] = []  # (audio bytes, transcript chars) at each piece
        self._ended = False
        self.decided = False
        """Whether the splice point is known (held output is then released)."""
        self.drop_chars = 0
        """Characters of the continuation's transcription repeating what was heard."""
        self.drop_bytes = 0
        """Bytes of the continuation's audio repeating what was heard."""
        self.heard_late = ""
        """Words the user heard whose transcription arrived only with the continuation."""
        self._released_audio = 0
        self._released_text = 0
        self._released_mirror = 0

    # -- inputs ----------------------------------------------------------------

    def held(self, item: object, kind: Held, *, size: int = 0, text: str = "", now: float) -> None:
        """The continuation produced ``item`` (audio of ``size`` bytes, or ``text``); it is held."""
        if kind is Held.AUDIO:
            self._audio += size
            if self._started is None:
                self._started = now
        elif kind is Held.TRANSCRIPT:
            size = len(text)
            self._text += text
            self._anchors.append((self._audio, len(self._text)))
        elif kind is Held.MIRROR:
            size = len(text)
            self._mirror += size
        self._items.append(_Item(item, kind, size))
        self._decide(now=now, final=False)

    def ended(self, *, now: float) -> None:
        """The continuation ended (all of its output is in)."""
        self._ended = True
        self._decide(now=now, final=True)

    def expired(self, *, now: float) -> bool:
        """Check the hold bound; True once the splice is decided."""
        if not self.decided and self._hold_over(now):
            self._decide(now=now, final=True)
        return self.decided

    def _hold_over(self, now: float) -> bool:
        return self._started is not None and now - self._started >= self._hold

    @property
    def deadline(self) -> float | None:
        """When the hold ends at the latest."""
        return None if self._started is None else self._started + self._hold

    # -- outputs ---------------------------------------------------------------

    def releases(self) -> list[Release]:
        """Held items that may go on now (all of them once decided), with what to skip of each."""
        if not self.decided:
            return []
        items, self._items = self._items, []
        return [Release(item.item, item.kind, self._skip(item.kind, item.size)) for item in items]

    def passing(self, kind: Held, size: int) -> int:
        """For output after the decision: how much of the start of this one to skip."""
        return self._skip(kind, size)

    @property
    def done(self) -> bool:
        """Decided, and nothing more will be dropped."""
        return (
            self.decided
            and not self._items
            and self._released_audio >= self.drop_bytes
            and self._released_text >= self.drop_chars
            and self._released_mirror >= self.drop_chars
        )

    def _skip(self, kind: Held, size: int) -> int:
        if kind is Held.AUDIO:
            skip = min(size, max(0, self.drop_bytes - self._released_audio))
            self._released_audio += size
        elif kind is Held.TRANSCRIPT:
            skip = min(size, max(0, self.drop_chars - self._released_text))
            self._released_text += size
        elif kind is Held.MIRROR:
            skip = min(size, max(0, self.drop_chars - self._released_mirror))
            self._released_mirror += size
        else:
            skip = 0
        return skip

    # -- the decision ----------------------------------------------------------

    def rate(self) -> tuple[float | None, bool]:
        """Bytes of audio per character of transcription as best known now, and whether it is exact.

        Exact: the whole continuation's (once it ended) or the session's
        (learnt from whole replies). Otherwise an estimate: a slope across the
        continuation's transcription pieces (a transcription running ahead of
        or behind its audio by a constant amount does not bias a slope, but
        pieces and audio chunks that do not line up make it coarse), or the
        ratio at one piece. An estimate decides that nothing need be dropped;
        audio is dropped on an estimate only when the hold ends.
        """
        if self._ended and self._audio and self._text:
            return self._audio / len(self._text), True
        if self._prior is not None:
            return self._prior, True
        spoken = [(audio, chars) for audio, chars in self._anchors if audio > 0 and chars > 0]
        if len(spoken) >= 2:
            (a0, c0), (a1, c1) = spoken[0], spoken[-1]
            if c1 - c0 >= _MIN_SLOPE_CHARS and a1 > a0:
                return (a1 - a0) / (c1 - c0), False
        if spoken:
            audio, chars = spoken[-1]
            return audio / chars, False
        return None, False

    def _slope(self) -> tuple[float | None, bool]:
        """The slope across the continuation's pieces, and whether it spans enough to be used at all."""
        spoken = [(audio, chars) for audio, chars in self._anchors if audio > 0 and chars > 0]
        if len(spoken) >= 2:
            (a0, c0), (a1, c1) = spoken[0], spoken[-1]
            if c1 - c0 >= _MIN_SLOPE_CHARS and a1 > a0:
                return (a1 - a0) / (c1 - c0), True
        return None, False

    def _heard_point(self, rate: float | None) -> float | None:
        """Where, in characters of the cut reply's transcription, its audio stopped."""
        if not self._heard_audio:
            return float(max(self._audio_from, self._heard_end))
        if rate is None:
            return None
        return max(self._audio_from + self._heard_audio / rate, float(self._heard_end))

    def _decide(self, *, now: float, final: bool) -> None:
        if self.decided:
            return
        final = final or self._hold_over(now)
        rate, exact = self.rate()
        words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(self._text)]
        # The continuation's last word is whole once whitespace follows it, or it ended.
        last_whole = self._ended or (bool(self._text) and self._text[-1].isspace())
        start = self._alignment(words, last_whole)
        if start is None:
            # It agrees with no word of the cut reply: all of it is new.
            self._settle(0, [], rate)
            return
        point = self._heard_point(rate)
        if point is None:
            if final:
                self._settle(start, [], rate)
            return
        repeated: list[tuple[int, int, str]] = []
        beyond = False  # a word of the continuation past the heard point is known
        for index, (begin, end, word) in enumerate(words):
            whole = index < len(words) - 1 or last_whole
            position = start + index
            if position >= len(self._said_words):
                beyond = True  # past the cut reply's transcription: unconfirmed, new
                break
            said_at = self._said_words[position][0]
            if said_at + len(word) > point + 0.5 or said_at >= point:
                beyond = True  # not heard in full
                break
            if not whole:
                if index == 0:
                    # The continuation's first word, still arriving, at the
                    # earliest word of the cut reply it can be. More of it can
                    # only move the alignment later, so if that word was not
                    # heard in full, neither was any it may turn out to be:
                    # whatever it is, it is played. Known now, not once the
                    # word's transcription is whole (which may come well after
                    # its audio).
                    said = self._said_words[position][1].rstrip(_PUNCTUATION)
                    if said_at + len(said) > point + 0.5:
                        beyond = True
                break  # still arriving
            repeated.append((begin, end, word))
        if not beyond and words and last_whole and start + len(words) >= len(self._said_words):
            # Every word of the cut reply from the alignment on was repeated:
            # the next word of the continuation is past its transcription
            # (new, and no word past it can move the alignment), so it is
            # known now what the next word would show. Deciding at once saves
            # waiting for that word's transcription, which may come well after
            # its audio.
            beyond = True
        if not repeated:
            if beyond or final:
                self._settle(start, [], rate)
            return
        # Words to drop: where they end in the audio must be known, which takes
        # an exact rate (the session's, or the whole continuation's). At the
        # bound, the words confirmed so far go: placed by the exact rate when
        # there is one (not waiting for the next word changes which words are
        # known repeated, not where they end), else by the slope across the
        # continuation's pieces; with neither, nothing is dropped.
        if exact and (beyond or self._ended):
            self._settle(start, repeated, rate)
        elif final:
            _, coarse = self._slope()
            self._settle(start, repeated if exact or coarse else [], rate)

    def _alignment(self, words: list[tuple[int, int, str]], last_whole: bool) -> int | None:
        """The earliest word of the cut reply the continuation can start at, or None."""
        said = self._said_words
        for start in range(len(said) + 1):
            if start == len(said) and not self._said_last_whole:
                break  # after a word still arriving: that word's start is the candidate
            consistent = True
            for index, (_, _, word) in enumerate(words):
                position = start + index
                if position >= len(said):
                    break
                whole = index < len(words) - 1 or last_whole
                said_whole = position < len(said) - 1 or self._said_last_whole
                if not _agree(word, said[position][1], ours_whole=whole, theirs_whole=said_whole):
                    consistent = False
                    break
            if consistent:
                return start
        return None

    def _settle(self, start: int, repeated: list[tuple[int, int, str]], rate: float | None) -> None:
        self.decided = True
        if not repeated or rate is None:
            return
        end = repeated[-1][1]
        # The whitespace after the last repeated word goes with it.
        while end < len(self._text) and self._text[end].isspace():
            end += 1
        self.drop_chars = end
        drop = round(end * rate)
        self.drop_bytes = drop - drop % 2  # whole 16-bit samples
        late = [
            word
            for index, (_, _, word) in enumerate(repeated)
            if self._said_words[start + index][0] >= self._heard_end
        ]
        self.heard_late = " ".join(late) + " " if late else ""
