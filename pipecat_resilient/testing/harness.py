"""Run a TTS processor in a real pipeline and see what a listener heard.

:class:`Scenario` builds ``recorder -> tts -> listener -> assistant aggregator``,
runs it with a :class:`~pipecat.pipeline.worker.PipelineWorker`, lets a test
push frames and wait on conditions, and reports:

* what a listener at the end of the pipeline *heard*, decoded from the audio
  (:mod:`pipecat_resilient.testing.speech`), never from text frames;
* what the LLM context received, from Pipecat's own assistant aggregator;
* what went upstream (errors) and the order of the TTS frames downstream.

Example::

    async with ElevenLabsEmulator(plan=plan) as emulator:
        async with Scenario(ResilientTTS(make_tts), spc=emulator.samples_per_char(24000)) as run:
            await run.send(TTSSpeakFrame("Hello there, how are you today?"))
            await run.wait_until(lambda: run.listener.stopped == 1)
        assert run.heard == ["Hello", "there,", "how", "are", "you", "today?"]
        assert run.context_text == "Hello there, how are you today?"
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    MetricsFrame,
    ServiceMetadataFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.observers.base_observer import BaseObserver
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from pipecat_resilient.testing.speech import SpeechDecoder, encode

__all__ = ["Listener", "Scenario", "SessionScenario", "UpstreamRecorder", "start_worker"]


@dataclass
class _Mark:
    """One event seen by the listener, with when it arrived."""

    kind: str
    at: float
    detail: str = ""


class Listener(FrameProcessor):
    """Stands where the output transport would, and decodes what it hears.

    Args:
        spc: Samples per character of the emulator's speech code.
        **kwargs: Passed to ``FrameProcessor``.
    """

    def __init__(self, spc: int, **kwargs: object) -> None:
        """Create a listener."""
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.decoder = SpeechDecoder(spc)
        self.spc = spc
        self.marks: list[_Mark] = []
        self.started = 0
        self.stopped = 0
        self.responses_started = 0
        self.responses_ended = 0
        self.audio_frames = 0
        self.context_words: list[str] = []
        self.first_audio_at: float | None = None
        self.audio_times: list[tuple[float, int]] = []
        self.metrics: list[MetricsFrame] = []
        self.service_metadata: list[ServiceMetadataFrame] = []
        self._changed = asyncio.Condition()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Record the frame, then pass it on."""
        await super().process_frame(frame, direction)
        if direction is FrameDirection.DOWNSTREAM:
            self._record(frame)
        await self.push_frame(frame, direction)
        async with self._changed:
            self._changed.notify_all()

    def _record(self, frame: Frame) -> None:
        now = time.monotonic()
        if isinstance(frame, TTSAudioRawFrame):
            self.decoder.feed(frame.audio)
            self.audio_frames += 1
            self.audio_times.append((now, len(frame.audio)))
            if self.first_audio_at is None:
                self.first_audio_at = now
            if not self.marks or self.marks[-1].kind != "audio":
                self.marks.append(_Mark("audio", now))
        elif isinstance(frame, TTSStartedFrame):
            self.started += 1
            self.marks.append(_Mark("started", now, frame.context_id or ""))
        elif isinstance(frame, TTSStoppedFrame):
            self.stopped += 1
            self.marks.append(_Mark("stopped", now, frame.context_id or ""))
        elif isinstance(frame, TTSTextFrame):
            if frame.append_to_context:
                self.context_words.extend(frame.text.split())
            self.marks.append(_Mark("text", now, frame.text))
        elif isinstance(frame, LLMFullResponseStartFrame):
            self.responses_started += 1
            self.marks.append(_Mark("response-start", now))
        elif isinstance(frame, LLMFullResponseEndFrame):
            self.responses_ended += 1
            self.marks.append(_Mark("response-end", now))
        elif isinstance(frame, InterruptionFrame):
            self.marks.append(_Mark("interruption", now))
        elif isinstance(frame, MetricsFrame):
            self.metrics.append(frame)
        elif isinstance(frame, ServiceMetadataFrame):
            self.service_metadata.append(frame)

    @property
    def heard(self) -> list[str]:
        """Words heard in full, in order."""
        return self.decoder.heard()

    def silences(self, sample_rate: int, *, threshold: float = 0.05) -> list[tuple[float, float]]:
        """Dead air a transport playing the audio as it arrived would have produced.

        Plays each audio frame at its arrival or when the one before it ends,
        whichever is later, and reports each gap between the end of one and
        the start of the next (after the first audio).

        Args:
            sample_rate: The audio's sample rate (16-bit mono assumed).
            threshold: Gaps shorter than this many seconds are ignored.

        Returns:
            ``(started_at, seconds)`` for each gap, ``started_at`` on the
            ``time.monotonic`` clock.
        """
        gaps: list[tuple[float, float]] = []
        playing_until: float | None = None
        for arrived, size in self.audio_times:
            duration = size / (2 * sample_rate)
            if playing_until is not None and arrived - playing_until > threshold:
                gaps.append((playing_until, arrived - playing_until))
            start = arrived if playing_until is None else max(arrived, playing_until)
            playing_until = start + duration
        return gaps

    def playing_until(self, sample_rate: int) -> float | None:
        """When the audio received so far would finish playing, or None before any."""
        playing_until: float | None = None
        for arrived, size in self.audio_times:
            start = arrived if playing_until is None else max(arrived, playing_until)
            playing_until = start + size / (2 * sample_rate)
        return playing_until

    @property
    def fragments(self) -> list[str]:
        """Words heard only in part."""
        return self.decoder.fragments()

    def kinds(self) -> list[str]:
        """The order of started/stopped/response marks (audio and text collapsed)."""
        return [m.kind for m in self.marks if m.kind not in ("audio", "text")]

    async def notify(self) -> None:
        """Check the waits again now, for a condition that changed outside the frames (an event)."""
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds (checked after every frame and :meth:`notify`).

        Raises:
            TimeoutError: If it does not hold within ``timeout`` seconds.
        """
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    async def settle(self, done: Callable[[], bool], *, idle: float = 1.0, limit: float = 20.0) -> bool:
        """Wait until ``done()`` holds, or nothing has arrived for ``idle`` seconds, or ``limit`` passed.

        For a service that may never finish (a stock one that lost the rest
        of its sentence): it is over when it has gone quiet.

        Returns:
            Whether ``done()`` held.
        """
        started = time.monotonic()
        seen, changed = -1, started
        while time.monotonic() - started < limit:
            try:
                await self.wait_until(done, min(0.1, idle))
                return True
            except TimeoutError:
                activity = len(self.marks) + self.audio_frames
                if activity != seen:
                    seen, changed = activity, time.monotonic()
                elif time.monotonic() - changed > idle:
                    return done()
        return done()


class UpstreamRecorder(FrameProcessor):
    """Heads the pipeline and records what comes back upstream (errors above all)."""

    def __init__(self, **kwargs: object) -> None:
        """Create a recorder."""
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.frames: list[Frame] = []
        self._changed = asyncio.Condition()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Record upstream frames, then pass everything on."""
        await super().process_frame(frame, direction)
        if direction is FrameDirection.UPSTREAM:
            self.frames.append(frame)
        await self.push_frame(frame, direction)
        async with self._changed:
            self._changed.notify_all()

    @property
    def errors(self) -> list[ErrorFrame]:
        """Error frames that reached the head of the pipeline."""
        return [f for f in self.frames if isinstance(f, ErrorFrame)]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds (checked after every upstream frame)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)


async def start_worker(
    pipeline: Pipeline,
    *,
    params: PipelineParams | None = None,
    observers: list[BaseObserver] | None = None,
    timeout: float = 10.0,
) -> tuple[PipelineWorker, asyncio.Task[None]]:
    """Run ``pipeline`` in a worker; return once its StartFrame got through.

    Returns:
        The worker (to queue frames into, cancel) and the task running it.

    Raises:
        TimeoutError: If the pipeline does not start within ``timeout`` seconds.
    """
    worker = PipelineWorker(
        pipeline,
        params=params or PipelineParams(),
        observers=observers or [],
        cancel_on_idle_timeout=False,
        check_dangling_tasks=False,
    )
    started = asyncio.Event()
    worker.add_event_handler("on_pipeline_started", lambda *_: started.set())
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    task = asyncio.create_task(runner.run())
    waiter = asyncio.create_task(started.wait())
    done, _ = await asyncio.wait({waiter, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        if task in done:
            task.result()
        raise TimeoutError("the pipeline did not start")
    return worker, task


class PipelineRun:
    """A pipeline started with :func:`start_worker`: send frames in, end it or cancel it.

    The base of the scenario classes; subclasses set ``_worker`` and ``_task``
    when they start.
    """

    _worker: PipelineWorker | None = None
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            await self.end()
        else:
            await self.cancel()

    async def start(self, timeout: float = 10.0) -> None:
        """Build and start the pipeline; return once the StartFrame got through."""
        raise NotImplementedError

    async def send(self, *frames: Frame) -> None:
        """Push frames in at the head of the pipeline, in order."""
        assert self._worker is not None, "start() first"
        for frame in frames:
            await self._worker.queue_frame(frame)

    async def end(self, timeout: float = 20.0) -> None:
        """Send an EndFrame and wait for the pipeline to finish.

        A processor holding the EndFrame back (an LLM stuck in a stalled
        request, a stock service with a cut reply open) makes this time out;
        use :meth:`cancel` then.
        """
        if self._task is None or self._worker is None:
            return
        await self._worker.queue_frame(EndFrame())
        await asyncio.wait_for(asyncio.shield(self._task), timeout)
        self._task = None

    async def cancel(self) -> None:
        """Cancel the pipeline at once."""
        if self._task is None or self._worker is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._worker.cancel(), 5.0)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self._task, 5.0)
        self._task = None


@dataclass
class Scenario(PipelineRun):
    """A pipeline around one TTS processor, with a listener and a real context.

    Args:
        tts: The processor under test (a stock service or a resilient one).
        spc: Samples per character of the emulator's speech code.
        sample_rate: Output sample rate of the pipeline.
        after: Processors placed between the one under test and the listener
            (a reference pass-through in a benchmark, a ``ServiceSwitcher``...).
        enable_metrics: Run with metrics and usage metrics enabled (``MetricsFrame``
            seen by the listener are in ``listener.metrics``).
        observers: Pipeline observers to run with.
    """

    tts: FrameProcessor
    spc: int
    sample_rate: int = 24000
    after: Sequence[FrameProcessor] = ()
    enable_metrics: bool = False
    observers: Sequence[BaseObserver] = ()
    listener: Listener = field(init=False)
    recorder: UpstreamRecorder = field(init=False)
    context: LLMContext = field(init=False)

    def __post_init__(self) -> None:
        self.listener = Listener(self.spc, name="Listener")
        self.recorder = UpstreamRecorder(name="UpstreamRecorder")
        self.context = LLMContext()

    async def start(self, timeout: float = 10.0) -> None:
        """Build and start the pipeline; return once the StartFrame got through."""
        aggregator = LLMContextAggregatorPair(self.context).assistant()
        pipeline = Pipeline([self.recorder, self.tts, *self.after, self.listener, aggregator])
        params = PipelineParams(
            audio_out_sample_rate=self.sample_rate,
            enable_metrics=self.enable_metrics,
            enable_usage_metrics=self.enable_metrics,
        )
        self._worker, self._task = await start_worker(
            pipeline, params=params, observers=list(self.observers), timeout=timeout
        )

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; checked whenever a frame reaches the listener
        and on :meth:`notify`."""
        await self.listener.wait_until(predicate, timeout)

    async def notify(self) -> None:
        """Check the waits again now (call it from an event handler the predicate looks at)."""
        await self.listener.notify()

    async def wait_heard(self, count: int, timeout: float = 10.0) -> None:
        """Wait until the listener has heard at least ``count`` whole words."""
        await self.wait_until(lambda: len(self.listener.heard) >= count, timeout)

    @property
    def heard(self) -> list[str]:
        """Words the listener heard in full."""
        return self.listener.heard

    @property
    def errors(self) -> list[ErrorFrame]:
        """Error frames that reached the head of the pipeline."""
        return self.recorder.errors

    @property
    def context_messages(self) -> list[str]:
        """The assistant messages the LLM context received, in order."""
        texts = []
        for message in self.context.get_messages():
            if isinstance(message, dict) and message.get("role") == "assistant":
                content = message.get("content")
                if isinstance(content, str):
                    texts.append(content)
                elif isinstance(content, list):
                    texts.append(" ".join(part.get("text", "") for part in content if isinstance(part, dict)))
        return texts

    @property
    def context_text(self) -> str:
        """All assistant text the context received, joined by spaces."""
        return " ".join(self.context_messages)

    @property
    def context_words(self) -> list[str]:
        """The assistant text the context received, as words."""
        return self.context_text.split()


@dataclass
class SessionScenario(PipelineRun):
    """A pipeline around a speech-to-speech LLM (Gemini Live), with a listener and a real context.

    Builds ``recorder -> user aggregator -> llm -> listener -> assistant
    aggregator``. Leaving the ``async with`` block cancels the pipeline (a
    stock service holding a cut reply open would defer an ``EndFrame`` 30 s).

    Args:
        llm: The processor under test (a stock service or a resilient one).
        spc: Samples per character of the emulator's speech code.
        context: The conversation; a new, empty one when omitted.
    """

    llm: FrameProcessor
    spc: int
    context: LLMContext = field(default_factory=LLMContext)
    listener: Listener = field(init=False)
    recorder: UpstreamRecorder = field(init=False)

    def __post_init__(self) -> None:
        self.listener = Listener(self.spc, name="Listener")
        self.recorder = UpstreamRecorder(name="UpstreamRecorder")

    async def start(self, timeout: float = 10.0) -> None:
        """Build and start the pipeline; return once the StartFrame got through."""
        pair = LLMContextAggregatorPair(self.context)
        pipeline = Pipeline([self.recorder, pair.user(), self.llm, self.listener, pair.assistant()])
        self._worker, self._task = await start_worker(pipeline, timeout=timeout)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.cancel()

    async def start_conversation(self, user_text: str | None = None) -> None:
        """Hand the LLM its context (which it answers when ``user_text`` is given)."""
        if user_text is not None:
            self.context.add_message({"role": "user", "content": user_text})
        await self.send(LLMContextFrame(self.context))

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; checked after every frame at the listener."""
        await self.listener.wait_until(predicate, timeout)

    async def speak(self, text: str, *, sample_rate: int = 16000) -> None:
        """Say ``text`` as the user would, in 20 ms frames of speech-code audio."""
        audio = encode(text, sample_rate=sample_rate, ms_per_char=10)
        frame_bytes = sample_rate // 50 * 2
        await self.send(
            *[
                InputAudioRawFrame(audio=audio[i : i + frame_bytes], sample_rate=sample_rate, num_channels=1)
                for i in range(0, len(audio), frame_bytes)
            ]
        )

    @property
    def assistant_texts(self) -> list[str]:
        """The assistant messages the context received."""
        return [
            str(m.get("content"))
            for m in self.context.get_messages()
            if isinstance(m, dict) and m.get("role") == "assistant"
        ]

    @property
    def errors(self) -> list[ErrorFrame]:
        """Error frames that reached the head of the pipeline."""
        return self.recorder.errors
