"""The ledger under random interleavings: nothing lost, none heard twice, the context equal to the hearing.

A simulated provider speaks what the ledger feeds it, character by character
(10 ms each, spaces included), sends each word's timing ahead of its audio,
with it, or grouped later, and fails at any moment; a simulated listener
counts a word heard when all of its audio went out in one piece. Hypothesis
draws the interleaving: text arriving, audio going out, timings, drops (with
some of the failed instance's audio drained), interruptions and settings
updates. Checked after every run:

* no word of an utterance that was not interrupted is lost;
* with the speaking rate known, no word is heard twice; without it, words may
  be said again, never lost;
* the context receives exactly the words heard, in order (without a known
  rate: only words heard, in order);
* a settings update is fed only once every utterance accepted before it is
  settled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from pipecat_resilient._timeline import Text
from pipecat_resilient.ledger import ActionKind, Ledger, State, Utterance

CHAR_S = 0.01
WORDS = ["alpha", "be", "gamma,", "delta.", "e", "zeta?", "etaeta", "theta!"]
# When a word's timing is sent: before its audio, right after it, or later (grouped).
TIMINGS = ["ahead", "after", "late"]


class Frame:
    """A stand-in frame: the ledger only needs identity."""


@dataclass
class Segment:
    """Text handed to one provider context: ``utterance.text[start:end]``, voiced up to ``spoken``."""

    utterance: Utterance
    context: str
    base: int  # where the context's speech starts in the utterance's text
    start: int
    end: int
    spoken: int = 0  # characters of this segment already voiced
    timed: int = 0  # words of this segment whose timing was sent


@dataclass
class Sim:
    """A provider instance, a listener and the context, around a ledger."""

    ledger: Ledger
    segments: list[Segment] = field(default_factory=list)
    contexts: int = 0
    context_of: dict[int, str] = field(default_factory=dict)  # utterance -> its context on this instance
    cursor: dict[str, int] = field(default_factory=dict)  # context -> where its next handed text starts
    base: dict[str, int] = field(default_factory=dict)  # context -> where its speech starts
    heard: dict[int, list[int]] = field(default_factory=dict)  # utterance -> start positions of words heard
    context: list[str] = field(default_factory=list)
    ends: dict[int, Frame] = field(default_factory=dict)  # turn -> its end frame
    settings_waits: dict[int, list[Utterance]] = field(default_factory=dict)
    settings_fed_early: bool = False
    interrupted: set[int] = field(default_factory=set)
    # Everything keyed by id() above stays alive for the whole run, so that no
    # id is reused by a later object.
    keep: list[object] = field(default_factory=list)

    # -- the provider instance ---------------------------------------------------

    def feed(self) -> None:
        """Do what the ledger says to feed, as the shell and the stock service would."""
        for action in self.ledger.to_feed():
            u = action.utterance
            if action.kind is ActionKind.FRAME and id(action.frame) in self.settings_waits:
                if any(not e.settled for e in self.settings_waits[id(action.frame)]):
                    self.settings_fed_early = True
                self.ledger.frame_emerged(action.frame)
            elif action.kind in (ActionKind.TEXT, ActionKind.SPEAK) and u is not None:
                self.hand(u, action.text)
                if action.kind is ActionKind.SPEAK:
                    self.ledger.closing_processed(u)
            elif action.kind is ActionKind.FRAME and u is not None:
                # A turn's end: all its text was handed. It comes out behind
                # the turn's audio (at once, when there is none to wait for).
                self.ledger.closing_processed(u)
                if not any(seg.utterance is u and seg.start + seg.spoken < seg.end for seg in self.segments):
                    if isinstance(action.frame, Frame):
                        self.ledger.frame_emerged(action.frame)
            elif action.kind is ActionKind.CLOSE and u is not None:
                self.ledger.stopped_downstream(u)
                if isinstance(action.frame, Frame):
                    self.ledger.frame_emerged(action.frame)

    def hand(self, u: Utterance, text: str) -> None:
        context = self.context_of.get(id(u))
        if context is None:
            self.contexts += 1
            context = self.context_of[id(u)] = f"c{self.contexts}"
            self.cursor[context] = u.fed_from
            self.base[context] = u.fed_from + len(text) - len(text.lstrip())
        start = self.cursor[context]
        self.cursor[context] = start + len(text)
        if text.strip():
            self.ledger.text_handed(u, context, text, now=0.0)
            self.segments.append(Segment(u, context, self.base[context], start, start + len(text)))

    def speak(self, chars: int, timing: str) -> None:
        """Voice up to ``chars`` characters of the first segment with speech left, sending timings."""
        segment = next((s for s in self.segments if s.start + s.spoken < s.end), None)
        if segment is None:
            return
        if timing == "ahead":
            self.time_words(segment, upto=segment.end)
        last = self.voice(segment, chars)
        if timing == "after":
            self.time_words(segment, upto=last)
        u = segment.utterance
        if last == segment.end and segment.end >= len(u.text.rstrip()) and u.flushed:
            # All of it voiced: the provider's final signal, then the turn's end.
            self.time_words(segment, upto=segment.end)
            if self.ledger.context_stopped(segment.context) is not None:
                self.tell_context(u)
                self.ledger.stopped_downstream(u)
            end = self.ends.get(id(u))
            if end is not None:
                self.ledger.frame_emerged(end)

    def voice(self, segment: Segment, chars: int) -> int:
        """Push the audio of the next ``chars`` characters; the listener hears the words they complete."""
        u, text = segment.utterance, segment.utterance.text
        first = segment.start + segment.spoken
        last = min(segment.end, first + chars)
        if last > first:
            self.ledger.audio_pushed(segment.context, (last - first) * CHAR_S, now=0.0)
        for position in range(first, last):
            if not text[position].isspace() and (position + 1 == len(text) or text[position + 1].isspace()):
                word_start = position
                while word_start > 0 and not text[word_start - 1].isspace():
                    word_start -= 1
                # Heard only if all of it was voiced in this piece of speech
                # (a replay starts at a word: a cut word is a fragment).
                if word_start >= segment.start:
                    self.heard.setdefault(id(u), []).append(word_start)
        segment.spoken = last - segment.start
        self.tell_context(u)
        return last

    def time_words(self, segment: Segment, *, upto: int) -> None:
        """Send the timings of the segment's words that end by ``upto`` and were not sent yet."""
        text, words, position = segment.utterance.text, [], segment.start
        for index, word in enumerate(text[segment.start : segment.end].split()):
            position = text.index(word, position)
            if index >= segment.timed and position + len(word) <= upto:
                start = (position - segment.base) * CHAR_S
                words.append((word, start, start + len(word) * CHAR_S))
                segment.timed = index + 1
            position += len(word)
        if words:
            self.ledger.words_timed(segment.context, words)
            self.tell_context(segment.utterance)

    def tell_context(self, u: Utterance) -> None:
        self.context.extend(self.ledger.context_text(u).split())

    # -- failures ---------------------------------------------------------------

    def drop(self, drained: int) -> None:
        """The instance fails; what it had received (``drained`` characters) still goes out; a fresh one."""
        if self.ledger.state is not State.LIVE:
            return
        self.ledger.connection_lost(now=0.0)
        segment = next((s for s in self.segments if s.start + s.spoken < s.end), None)
        if segment is not None and drained:
            self.voice(segment, drained)
        for _, text in self.ledger.pending_context_text():
            self.context.extend(text.split())
        self.ledger.drained()
        self.ledger.connection_restored()
        self.segments.clear()
        self.context_of.clear()
        self.cursor.clear()
        self.base.clear()

    def interrupt(self) -> None:
        for u in self.ledger.interrupted():
            self.interrupted.add(id(u))
        self.ledger.interruption_passed()
        self.segments = [s for s in self.segments if not s.utterance.settled]


operations = st.lists(
    st.one_of(
        st.tuples(st.just("speak"), st.lists(st.sampled_from(WORDS), min_size=1, max_size=6)),
        st.tuples(
            st.just("turn"), st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=4), max_size=3)
        ),
        st.tuples(
            st.just("audio"),
            st.integers(min_value=1, max_value=9),
            st.sampled_from(["ahead", "after", "late"]),
        ),
        st.tuples(st.just("drop"), st.integers(min_value=0, max_value=12)),
        st.tuples(st.just("interrupt")),
        st.tuples(st.just("settings")),
    ),
    max_size=40,
)


def run(ops: list[tuple], *, rate_known: bool) -> tuple[Sim, list[Utterance]]:
    ledger = Ledger(speaking_rate=1 / CHAR_S if rate_known else None)
    sim = Sim(ledger)
    utterances: list[Utterance] = []
    for op in ops:
        kind = op[0]
        if kind == "speak":
            frame = Frame()
            utterances.append(ledger.speak_accepted(frame, " ".join(op[1])))
            sim.keep.append(frame)
        elif kind == "turn":
            start, end = Frame(), Frame()
            u = ledger.turn_started(start)
            for sentence in op[1]:
                ledger.text_accepted(" ".join(sentence) + " ")
            ledger.turn_ended(end)
            sim.ends[id(u)] = end
            sim.keep += [u, start, end]
            ledger.frame_emerged(start)
            if op[1]:
                utterances.append(u)
        elif kind == "audio":
            sim.speak(op[1], op[2])
        elif kind == "drop":
            sim.drop(op[1])
        elif kind == "interrupt":
            sim.interrupt()
        elif kind == "settings":
            frame = Frame()
            ledger.settings_accepted(frame)
            sim.settings_waits[id(frame)] = [u for u in utterances if not u.settled]
            sim.keep.append(frame)
        sim.feed()
    # Let everything still owed be said, without faults.
    for _ in range(2000):
        if all(u.settled for u in utterances):
            break
        sim.speak(7, "late")
        sim.feed()
    return sim, utterances


def words_of(u: Utterance) -> list[int]:
    text, starts, position = u.text, [], 0
    for word in text.split():
        position = text.index(word, position)
        starts.append(position)
        position += len(word)
    return starts


@settings(max_examples=300, deadline=None)
@given(operations)
def test_with_a_known_rate_nothing_is_lost_or_repeated_and_the_context_is_what_was_heard(
    ops: list[tuple],
) -> None:
    """Timings in any order, drops anywhere: every word heard exactly once; the context equals the hearing."""
    sim, utterances = run(ops, rate_known=True)
    assert not sim.settings_fed_early
    heard_all: list[str] = []
    for u in utterances:
        heard = sim.heard.get(id(u), [])
        if id(u) not in sim.interrupted:
            assert u.settled
            assert sorted(heard) == words_of(u), f"{u.text!r}: heard at {heard}"
        else:
            assert len(heard) == len(set(heard))
        heard_all.extend(u.text[p:].split(maxsplit=1)[0] for p in heard)
    assert sim.context == heard_all


@settings(max_examples=300, deadline=None)
@given(operations)
def test_without_a_rate_words_may_be_said_again_but_none_is_lost_and_the_context_never_lies(
    ops: list[tuple],
) -> None:
    """No rate to estimate: a replay may repeat words, none is lost, the context holds only heard ones."""
    sim, utterances = run(ops, rate_known=False)
    for u in utterances:
        heard = sim.heard.get(id(u), [])
        if id(u) not in sim.interrupted:
            assert u.settled
            assert set(heard) == set(words_of(u))
    heard_words = [
        u.text[p:].split(maxsplit=1)[0] for u in utterances for p in dict.fromkeys(sim.heard.get(id(u), []))
    ]
    # Each word in the context was heard, in order.
    remaining = iter(heard_words)
    assert all(word in remaining for word in sim.context)


_WORDS = ["a", "the", "then", "Hello,", "hello", "x", "world.", "wor"]


def _find_in_string(text: str, word: str, start: int, end: int | None) -> tuple[int, int] | None:
    """``Text.find_token``'s rule on a plain string: whole tokens only, from the next word on."""
    import re

    end = len(text) if end is None else min(end, len(text))
    first = start
    while first < len(text) and text[first].isspace():
        first += 1
    window = text[start : min(end, first + 64 + len(word))]

    def spaced(p: int) -> bool:
        return p <= 0 or p >= len(text) or text[p].isspace()

    def whole(begin: int, size: int) -> bool:
        return (begin == 0 or spaced(begin - 1)) and (begin + size >= end or spaced(begin + size))

    def token(begin: int) -> tuple[int, int]:
        match = re.compile(r"\S+").match(text, begin)
        return begin, match.end() if match else begin

    position = window.find(word)
    while position >= 0:
        if whole(start + position, len(word)):
            return token(start + position)
        position = window.find(word, position + 1)
    wanted = re.sub(r"[^\w]+", "", word).casefold()
    for match in re.finditer(r"\S+", window):
        begin = start + match.start()
        if wanted and whole(begin, len(match.group(0))):
            if re.sub(r"[^\w]+", "", match.group(0)).casefold() == wanted:
                return token(begin)
    return None


def _chunked(text: str, chunks: list[int]) -> Text:
    """``text`` appended to a ``Text`` in pieces of the sizes ``chunks`` gives, in turn."""
    chunked, at = Text(), 0
    for size in chunks * (len(text) // 3 + 1):
        if at >= len(text):
            break
        chunked.append(text[at : at + size])
        at += size
    return chunked


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(
        st.tuples(st.sampled_from(_WORDS), st.sampled_from([1, 2, 70, 150])), min_size=1, max_size=10
    ),
    chunks=st.lists(st.integers(min_value=3, max_value=700), min_size=1, max_size=20),
    word=st.sampled_from(_WORDS),
    data=st.data(),
)
def test_a_timed_word_is_found_in_chunked_text_as_in_the_plain_string(
    tokens: list[tuple[str, int]], chunks: list[int], word: str, data: st.DataObject
) -> None:
    """The one-window search over chunks finds what a search of the joined string finds,
    past runs of whitespace longer than the window and with the text ending before the next word."""
    text = "".join(token + " " * spaces for token, spaces in tokens)
    chunked = _chunked(text, chunks)
    start = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    end = data.draw(st.none() | st.integers(min_value=0, max_value=len(text)))
    assert chunked.find_token(word, start, end) == _find_in_string(text, word, start, end)


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(
        st.tuples(st.sampled_from(_WORDS), st.sampled_from([1, 2, 70, 150])), min_size=1, max_size=10
    ),
    chunks=st.lists(st.integers(min_value=3, max_value=700), min_size=1, max_size=20),
    data=st.data(),
)
def test_word_positions_in_chunked_text_are_those_of_the_plain_string(
    tokens: list[tuple[str, int]], chunks: list[int], data: st.DataObject
) -> None:
    """Where the next word starts, where a word ends and where a cut rounds down to are
    the same whether the text is kept in one chunk (a sentence) or in many."""
    text = "".join(token + " " * spaces for token, spaces in tokens)
    chunked = _chunked(text, chunks)
    whole = Text(text)
    str(whole)  # joined: one chunk
    position = data.draw(st.integers(min_value=0, max_value=len(text)))
    floor = data.draw(st.integers(min_value=0, max_value=position))
    next_start = next((i for i in range(position, len(text)) if not text[i].isspace()), len(text))
    cut = position
    if 0 < cut < len(text) and not text[cut].isspace():
        while cut > floor and not text[cut - 1].isspace():
            cut -= 1
    for kept in (chunked, whole):
        assert kept.next_word_start(position) == next_start
        assert kept.word_end_at_or_before(position, floor) == max(cut, floor)
        assert kept.words_after(position, 1) == next(
            (i for i in range(next_start, len(text)) if text[i].isspace()), len(text)
        )
