"""Run a speech-to-text processor in a real pipeline and see what of the caller's words got through.

A :class:`Caller` turns a script of utterances into the audio a transport
would deliver: speech code (:mod:`pipecat_resilient.testing.speech`) in 20 ms
``InputAudioRawFrame``\\ s, silence between utterances, and the
``VADUserStartedSpeakingFrame`` / ``VADUserStoppedSpeakingFrame`` a VAD would
emit around each one. It knows every word it said, and when.

:class:`STTScenario` runs ``recorder -> stt -> transcripts -> user aggregator``
with :func:`~pipecat_resilient.testing.harness.start_worker`. The user
aggregator is Pipecat's own (``LLMContextAggregatorPair(context).user()``),
with the turn strategies a VAD-driven cascade uses: a turn starts at
``VADUserStartedSpeakingFrame`` (:class:`VADUserTurnStartStrategy`) and is
committed to the context once the VAD stopped and a transcript arrived
(:class:`SpeechTimeoutUserTurnStopStrategy`). It reports:

* the final transcripts (``TranscriptionFrame``) and interim ones that reached
  the pipeline, and the caller's words that never did (:meth:`STTScenario.lost`);
* the user messages committed to the LLM context;
* what went upstream (errors above all).

A test feeds the caller's frames as fast as the pipeline takes them, or paced
(``pace=1.0`` is real time), and waits on conditions, never on fixed sleeps.
Unpaced, each utterance waits until the turn before it ended: the turn
strategies run on wall-clock timers and would merge utterances sent in the
same instant. :func:`measure` sums a run up against the emulator it used (the
words lost, the time to reconnect, the errors), to pin a service's behaviour.

Example::

    caller = Caller(["Hello there, how are you?", "A table for two, please."])
    async with DeepgramSTTEmulator() as emulator:
        stt = DeepgramSTTService(api_key="test-key", base_url=emulator.url)
        async with STTScenario(stt) as run:
            await run.speak(caller)  # as fast as possible; pace=1.0 for real time
            await run.wait_until(lambda: len(run.user_messages) == 2)
    assert run.final_words == caller.words
    assert run.user_messages == list(caller.utterances)
    assert run.lost(caller) == [] and run.errors == []
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pipecat.audio.vad.vad_analyzer import VAD_STOP_SECS
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    MetricsFrame,
    ServiceMetadataFrame,
    TranscriptionFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.turns.user_start import VADUserTurnStartStrategy
from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from pipecat_resilient.testing._server import ConnectionRecord
from pipecat_resilient.testing.deepgram_stt import StreamRecord
from pipecat_resilient.testing.harness import PipelineRun, UpstreamRecorder, start_worker
from pipecat_resilient.testing.speech import encode

__all__ = [
    "Caller",
    "Cue",
    "Measurement",
    "STTScenario",
    "SaidWord",
    "Transcript",
    "TranscriptRecorder",
    "measure",
]

# How often waits re-check conditions that no frame announces (emulator state).
_POLL_SECONDS = 0.02


@dataclass(frozen=True, slots=True)
class SaidWord:
    """A word the caller said.

    Parameters:
        text: The word, punctuation included.
        utterance: Which utterance it belongs to (0-based).
        start: Seconds into the call its audio starts.
        end: Seconds into the call its audio ends.
    """

    text: str
    utterance: int
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Cue:
    """One frame of the call, at its time in the caller's stream.

    Parameters:
        at: Seconds into the call.
        kind: ``"audio"``, ``"speech_started"`` or ``"speech_stopped"`` (VAD).
        audio: The PCM of an audio cue.
    """

    at: float
    kind: Literal["audio", "speech_started", "speech_stopped"]
    audio: bytes = b""

    def frame(self, sample_rate: int) -> Frame:
        """A fresh frame for this cue (frames are single-use; VAD frames carry the time they are made)."""
        if self.kind == "speech_started":
            return VADUserStartedSpeakingFrame()
        if self.kind == "speech_stopped":
            return VADUserStoppedSpeakingFrame(stop_secs=VAD_STOP_SECS)
        return InputAudioRawFrame(audio=self.audio, sample_rate=sample_rate, num_channels=1)


class Caller:
    """The audio of a caller saying a script of utterances, and the words it said.

    The call is ``lead`` seconds of silence, then each utterance followed by
    ``pause`` seconds of silence, cut into ``frame_ms`` frames. A VAD start
    precedes each utterance's first frame, and a VAD stop follows the frame
    where ``vad_stop_secs`` of its trailing silence have passed, as Pipecat's
    VAD would emit them.

    Args:
        utterances: What the caller says, one string per utterance.
        sample_rate: Sample rate of the audio.
        ms_per_char: Duration of one character of speech code (the emulator's
            ``ms_per_char``).
        frame_ms: Duration of each audio frame.
        lead: Seconds of silence before the first utterance.
        pause: Seconds of silence after each utterance (more than ``vad_stop_secs``).
        vad_stop_secs: Silence after an utterance before the VAD stop.
    """

    def __init__(
        self,
        utterances: Sequence[str],
        *,
        sample_rate: int = 16000,
        ms_per_char: float = 10.0,
        frame_ms: int = 20,
        lead: float = 0.1,
        pause: float = 0.6,
        vad_stop_secs: float = VAD_STOP_SECS,
    ) -> None:
        """Build the call."""
        if not utterances or any(not text.strip() for text in utterances):
            raise ValueError("a caller needs at least one non-blank utterance")
        if pause <= vad_stop_secs:
            raise ValueError("pause must be longer than vad_stop_secs")
        self.utterances = tuple(text.strip() for text in utterances)
        self.sample_rate = sample_rate
        self.ms_per_char = ms_per_char
        self.frame_ms = frame_ms
        self.said: list[SaidWord] = []
        self._audio = bytearray(self._silence(lead))
        self._spans: list[tuple[float, float]] = []
        for index, text in enumerate(self.utterances):
            start = self._seconds(len(self._audio))
            self._audio += encode(text, sample_rate=sample_rate, ms_per_char=ms_per_char)
            end = self._seconds(len(self._audio))
            self._spans.append((start, end))
            self.said.extend(self._words(text, index, start))
            self._audio += self._silence(pause)
        self._vad_stop_secs = vad_stop_secs

    @property
    def words(self) -> list[str]:
        """Every word said, in order."""
        return [word.text for word in self.said]

    @property
    def duration(self) -> float:
        """Seconds of audio in the call."""
        return self._seconds(len(self._audio))

    def utterance_words(self, index: int) -> list[str]:
        """The words of one utterance."""
        return [word.text for word in self.said if word.utterance == index]

    def words_between(self, start: float, end: float) -> list[str]:
        """The words whose audio overlaps ``[start, end)`` seconds into the call."""
        return [word.text for word in self.said if word.end > start and word.start < end]

    def cues(self) -> Iterator[Cue]:
        """The call, frame by frame, with the VAD frames in place."""
        frame_bytes = self.sample_rate * self.frame_ms // 1000 * 2
        spans = list(self._spans)
        started: set[int] = set()
        for offset in range(0, len(self._audio), frame_bytes):
            at = self._seconds(offset)
            frame_end = self._seconds(min(offset + frame_bytes, len(self._audio)))
            for index, (start, _) in enumerate(spans):
                if index not in started and start < frame_end:
                    started.add(index)
                    yield Cue(at, "speech_started")
            yield Cue(at, "audio", bytes(self._audio[offset : offset + frame_bytes]))
            for index, (_, end) in enumerate(spans):
                stop_at = end + self._vad_stop_secs
                if index in started and at < stop_at <= frame_end:
                    yield Cue(frame_end, "speech_stopped")

    def _seconds(self, size: int) -> float:
        return size / (2 * self.sample_rate)

    def _silence(self, seconds: float) -> bytes:
        return bytes(2 * round(seconds * self.sample_rate))

    def _words(self, text: str, utterance: int, start: float) -> list[SaidWord]:
        step = self.ms_per_char / 1000
        words, index = [], 0
        for word in text.split():
            index = text.index(word, index)
            begin = start + index * step
            words.append(SaidWord(word, utterance, begin, begin + len(word) * step))
            index += len(word)
        return words


@dataclass(frozen=True, slots=True)
class Transcript:
    """A transcription frame seen downstream of the STT.

    Parameters:
        text: The frame's text.
        at: ``time.monotonic()`` when it arrived.
        finalized: The frame's ``finalized`` flag (final transcripts only).
    """

    text: str
    at: float
    finalized: bool = False


class TranscriptRecorder(FrameProcessor):
    """Stands right after the STT and records the transcripts that come out of it.

    Args:
        on_change: Called after every frame (the scenario wakes its waiters).
        **kwargs: Passed to ``FrameProcessor``.
    """

    def __init__(self, on_change: Callable[[], None] | None = None, **kwargs: object) -> None:
        """Create a recorder."""
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.finals: list[Transcript] = []
        self.interims: list[Transcript] = []
        self.metrics: list[MetricsFrame] = []
        self.service_metadata: list[ServiceMetadataFrame] = []
        self.audio_frames = 0
        self._on_change = on_change

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Record transcripts (and metrics, service metadata), then pass everything on."""
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame):
            self.finals.append(Transcript(frame.text, time.monotonic(), frame.finalized))
        elif isinstance(frame, InterimTranscriptionFrame):
            self.interims.append(Transcript(frame.text, time.monotonic()))
        elif isinstance(frame, InputAudioRawFrame) and direction is FrameDirection.DOWNSTREAM:
            self.audio_frames += 1
        elif isinstance(frame, MetricsFrame):
            self.metrics.append(frame)
        elif isinstance(frame, ServiceMetadataFrame) and direction is FrameDirection.DOWNSTREAM:
            self.service_metadata.append(frame)
        await self.push_frame(frame, direction)
        if self._on_change is not None:
            self._on_change()


class _Tail(FrameProcessor):
    """Ends the pipeline: counts the user turns the aggregator announced, and wakes the waiters."""

    def __init__(self, on_change: Callable[[], None], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._on_change = on_change
        self.turns_started = 0
        self.turns_stopped = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction is FrameDirection.DOWNSTREAM:
            if isinstance(frame, UserStartedSpeakingFrame):
                self.turns_started += 1
            elif isinstance(frame, UserStoppedSpeakingFrame):
                self.turns_stopped += 1
        await self.push_frame(frame, direction)
        self._on_change()


@dataclass
class STTScenario(PipelineRun):
    """A pipeline around one STT processor, with Pipecat's user aggregator and a real context.

    Args:
        stt: The processor under test (a stock service or a resilient one).
        sample_rate: The pipeline's input sample rate (the caller's).
        user_speech_timeout: Silence after a VAD stop before a turn may end.
        user_turn_stop_timeout: Seconds without a turn signal before the
            aggregator gives up on a turn.
        context: The conversation; a new, empty one when omitted.
        user_turn_strategies: The aggregator's turn strategies, in place of
            the VAD-driven ones (``ExternalUserTurnStrategies()`` for a
            provider that owns turn detection).
        observers: Pipeline observers (``TranscriptionLogObserver()``...).
        enable_metrics: Collect processing and usage metrics
            (:attr:`TranscriptRecorder.metrics`).
        after: Processors put right after the STT (a pass-through stage, to
            measure what one more stage costs).
    """

    stt: FrameProcessor
    sample_rate: int = 16000
    user_speech_timeout: float = 0.2
    user_turn_stop_timeout: float = 5.0
    context: LLMContext = field(default_factory=LLMContext)
    user_turn_strategies: UserTurnStrategies | None = None
    observers: Sequence[BaseObserver] = ()
    enable_metrics: bool = False
    after: Sequence[FrameProcessor] = ()
    recorder: UpstreamRecorder = field(init=False)
    transcripts: TranscriptRecorder = field(init=False)
    speaking_since: float | None = field(init=False, default=None)
    pace: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.recorder = UpstreamRecorder(name="UpstreamRecorder")
        self.transcripts = TranscriptRecorder(self._changed_now, name="TranscriptRecorder")
        self._tail = _Tail(self._changed_now, name="Tail")
        self._changed = asyncio.Event()
        self._speaking: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 10.0) -> None:
        """Build and start the pipeline; return once the StartFrame got through."""
        strategies = self.user_turn_strategies or UserTurnStrategies(
            start=[VADUserTurnStartStrategy()],
            stop=[SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=self.user_speech_timeout)],
        )
        params = LLMUserAggregatorParams(
            user_turn_strategies=strategies, user_turn_stop_timeout=self.user_turn_stop_timeout
        )
        user = LLMContextAggregatorPair(self.context, user_params=params).user()
        pipeline = Pipeline([self.recorder, self.stt, *self.after, self.transcripts, user, self._tail])
        self._worker, self._task = await start_worker(
            pipeline,
            params=PipelineParams(
                audio_in_sample_rate=self.sample_rate,
                enable_metrics=self.enable_metrics,
                enable_usage_metrics=self.enable_metrics,
            ),
            observers=list(self.observers),
            timeout=timeout,
        )

    async def end(self, timeout: float = 20.0) -> None:
        """Stop speaking, send an EndFrame and wait for the pipeline to finish."""
        await self._stop_speaking()
        await super().end(timeout)

    async def cancel(self) -> None:
        """Stop speaking and cancel the pipeline at once."""
        await self._stop_speaking()
        await super().cancel()

    # -- the caller ----------------------------------------------------------

    async def speak(self, caller: Caller, *, pace: float | None = None, turn_timeout: float = 2.0) -> None:
        """Send the caller's frames in, in order.

        Args:
            caller: The call.
            pace: The speed relative to real time (1.0: each frame when its
                audio would have been captured), or None to send as fast as
                the pipeline takes them. Unpaced, each utterance waits until
                the aggregator ended the turn before it (or ``turn_timeout``
                passed): the turn strategies run on wall-clock timers, and
                would otherwise merge utterances said in the same instant.
            turn_timeout: The longest an unpaced utterance waits for the turn
                before it to end.
        """
        if pace is not None and pace <= 0:
            raise ValueError("pace must be positive")
        loop = asyncio.get_running_loop()
        began = loop.time()
        self.speaking_since, self.pace = time.monotonic(), pace
        stopped = 0
        for cue in caller.cues():
            if pace is not None:
                delay = began + cue.at / pace - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif cue.kind == "speech_started" and stopped:
                await self._wait_for_turns(stopped, turn_timeout)
            await self.send(cue.frame(caller.sample_rate))
            if cue.kind == "speech_stopped":
                stopped = self.turns_stopped + 1
            if pace is None:
                await asyncio.sleep(0)

    async def _wait_for_turns(self, count: int, timeout: float) -> None:
        """Wait until ``count`` turns ended, at most ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await self.wait_until(lambda: self.turns_stopped >= count, timeout)

    def start_speaking(self, caller: Caller, *, pace: float | None = 1.0) -> asyncio.Task[None]:
        """Speak in the background (see :meth:`speak`); the task is cancelled when the run ends."""
        self._speaking = asyncio.create_task(self.speak(caller, pace=pace))
        return self._speaking

    def call_time(self, at: float) -> float | None:
        """Seconds into the call at ``time.monotonic()`` ``at`` (paced calls only)."""
        if self.speaking_since is None or self.pace is None:
            return None
        return (at - self.speaking_since) * self.pace

    async def _stop_speaking(self) -> None:
        task, self._speaking = self._speaking, None
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- waiting -------------------------------------------------------------

    def _changed_now(self) -> None:
        self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds: checked after every frame, and every few ms.

        Raises:
            TimeoutError: If it does not hold within ``timeout`` seconds.
        """
        # A deadline rather than asyncio.timeout() around wait_for(): Pipecat
        # replaces wait_for with wait_for2, whose answer to a cancellation that
        # races a completion (CancelledWithResultError) asyncio.timeout() would
        # not turn into a TimeoutError.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(_POLL_SECONDS, remaining))

    async def settle(self, done: Callable[[], bool], *, idle: float = 1.0, limit: float = 20.0) -> bool:
        """Wait until ``done()`` holds, or no transcript arrived for ``idle`` seconds, or ``limit`` passed.

        For a service that may never deliver (a stock one that lost words):
        it is over when it has gone quiet.

        Returns:
            Whether ``done()`` held.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        seen, changed = -1, started
        while loop.time() - started < limit:
            if done():
                return True
            activity = len(self.transcripts.finals) + len(self.transcripts.interims) + len(self.user_messages)
            if activity != seen:
                seen, changed = activity, loop.time()
            elif loop.time() - changed > idle:
                return done()
            with contextlib.suppress(TimeoutError):
                await self.wait_until(done, min(0.1, idle))
        return done()

    # -- what happened -------------------------------------------------------

    @property
    def turns_started(self) -> int:
        """User turns the aggregator started (``UserStartedSpeakingFrame`` downstream)."""
        return self._tail.turns_started

    @property
    def turns_stopped(self) -> int:
        """User turns the aggregator ended (``UserStoppedSpeakingFrame`` downstream)."""
        return self._tail.turns_stopped

    @property
    def final_texts(self) -> list[str]:
        """The text of each final transcript, in order."""
        return [t.text for t in self.transcripts.finals]

    @property
    def final_words(self) -> list[str]:
        """Every word of the final transcripts, in order."""
        return [word for text in self.final_texts for word in text.split()]

    @property
    def interim_texts(self) -> list[str]:
        """The text of each interim transcript, in order."""
        return [t.text for t in self.transcripts.interims]

    @property
    def user_messages(self) -> list[str]:
        """The user messages committed to the LLM context, in order."""
        texts = []
        for message in self.context.get_messages():
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    texts.append(content)
                elif isinstance(content, list):
                    texts.append(" ".join(part.get("text", "") for part in content if isinstance(part, dict)))
        return texts

    @property
    def user_words(self) -> list[str]:
        """Every word of the user messages in the context, in order."""
        return [word for text in self.user_messages for word in text.split()]

    @property
    def errors(self) -> list[ErrorFrame]:
        """Error frames that reached the head of the pipeline."""
        return self.recorder.errors

    def lost(self, caller: Caller, words: Sequence[str] | None = None) -> list[str]:
        """The caller's words missing from ``words`` (the final transcripts by default), in order.

        Words are matched in order, so a word said twice must arrive twice.
        """
        got = self.final_words if words is None else list(words)
        said = caller.words
        matcher = difflib.SequenceMatcher(a=said, b=got, autojunk=False)
        matched = {i for block in matcher.get_matching_blocks() for i in range(block.a, block.a + block.size)}
        return [word for i, word in enumerate(said) if i not in matched]

    def extra(self, caller: Caller, words: Sequence[str] | None = None) -> list[str]:
        """Words in ``words`` (the final transcripts by default) the caller did not say: garbage, repeats."""
        got = self.final_words if words is None else list(words)
        matcher = difflib.SequenceMatcher(a=caller.words, b=got, autojunk=False)
        matched = {i for block in matcher.get_matching_blocks() for i in range(block.b, block.b + block.size)}
        return [word for i, word in enumerate(got) if i not in matched]


class _STTEmulator(Protocol):
    """What :func:`measure` reads of a speech-to-text emulator."""

    @property
    def connections(self) -> list[ConnectionRecord]: ...

    @property
    def streams(self) -> list[StreamRecord]: ...


@dataclass(frozen=True, slots=True)
class Measurement:
    """What happened to a caller's words on their way through a run, to pin a service's behaviour.

    Returned by :func:`measure` -- do not instantiate directly.

    Parameters:
        said: How many words the caller said.
        lost: The words said that no final transcript carried, in order.
        extra: Words of the final transcripts the caller did not say (the
            tail of a word cut by a reconnect, repeats).
        dropped: Words a connection heard and never finalized: they died
            with it, or with a provider error.
        user_messages: The user messages committed to the LLM context.
        errors: The text of each error frame that went upstream.
        handshakes: Per handshake, the HTTP status it was refused with (None
            when it was not refused).
        reconnect: Seconds from the first fault to the next served handshake;
            None when no connection followed it.
    """

    said: int
    lost: tuple[str, ...]
    extra: tuple[str, ...]
    dropped: tuple[str, ...]
    user_messages: tuple[str, ...]
    errors: tuple[str, ...]
    handshakes: tuple[int | None, ...]
    reconnect: float | None


def measure(run: STTScenario, caller: Caller, emulator: _STTEmulator) -> Measurement:
    """Summarize a run of ``caller`` through ``run`` against ``emulator`` (call before tearing down)."""
    records = emulator.connections
    served = {stream.index for stream in emulator.streams}  # not refused, not left hanging
    faulted = next((r for r in records if r.fault_at is not None), None)
    reconnect = None
    if faulted is not None and faulted.fault_at is not None:
        later = [r for r in records[faulted.index + 1 :] if r.index in served]
        reconnect = later[0].opened_at - faulted.fault_at if later else None
    return Measurement(
        said=len(caller.words),
        lost=tuple(run.lost(caller)),
        extra=tuple(run.extra(caller)),
        dropped=tuple(word for stream in emulator.streams for word in stream.words_dropped),
        user_messages=tuple(run.user_messages),
        errors=tuple(error.error for error in run.errors),
        handshakes=tuple(record.refused for record in records),
        reconnect=reconnect,
    )
