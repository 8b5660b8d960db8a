"""Run an LLM service in a real Pipecat pipeline and record what it pushed.

:class:`LLMScenario` builds ``user aggregator -> llm -> assistant aggregator``
around one :class:`~pipecat.processors.aggregators.llm_context.LLMContext`,
runs it with a :class:`~pipecat.pipeline.worker.PipelineWorker`, lets a test
ask a question as the user would (an ``LLMMessagesAppendFrame`` that runs the
LLM) and wait on conditions, and reports:

* every frame the LLM pushed, in both directions and in push order, from a
  pipeline observer (:class:`LLMTimeline`), so an ``ErrorFrame`` going
  upstream can be placed between the text frames and the
  ``LLMFullResponseEndFrame`` going downstream;
* what the LLM context received, from Pipecat's own aggregators.

Example::

    async with OpenAIEmulator(plan=FaultPlan(Fault.abort(after_audio_chunks=3))) as emu:
        llm = OpenAILLMService(api_key="test", base_url=emu.base_url)
        async with LLMScenario(llm) as run:
            await run.ask("hello")
            await run.wait_until(lambda: run.responses_ended == 1)
        assert run.kinds() == ["start", "text", "error", "end"]
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    FunctionCallInProgressFrame,
    FunctionCallResultFrame,
    FunctionCallsStartedFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMMessagesAppendFrame,
    LLMTextFrame,
    MetricsFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from pipecat_resilient.testing.harness import PipelineRun, start_worker

__all__ = ["DownstreamRecorder", "LLMScenario", "LLMTimeline", "Pushed"]

# Short names for the frames an LLM pushes, as :meth:`LLMTimeline.kinds` lists them.
_KINDS: dict[type[Frame], str] = {
    LLMFullResponseStartFrame: "start",
    LLMTextFrame: "text",
    LLMFullResponseEndFrame: "end",
    ErrorFrame: "error",
    FunctionCallsStartedFrame: "calls",
    FunctionCallInProgressFrame: "call",
    FunctionCallResultFrame: "result",
}


@dataclass(frozen=True, slots=True)
class Pushed:
    """One frame the LLM pushed.

    Parameters:
        frame: The frame.
        direction: Where it went.
        at: ``time.monotonic()`` when the observer saw it (a queue hop after the push).
        clock: The pipeline clock at the push itself, in seconds.
    """

    frame: Frame
    direction: FrameDirection
    at: float
    clock: float

    @property
    def kind(self) -> str:
        """The frame's short name (``start``, ``text``, ``error``, ``end``, ...) or class name."""
        for cls in type(self.frame).__mro__:
            if cls in _KINDS:
                return _KINDS[cls]
        return type(self.frame).__name__


class LLMTimeline(BaseObserver):
    """A pipeline observer of the frames one processor pushes, in push order.

    Args:
        source: The processor whose pushes are recorded.
        **kwargs: Passed to ``BaseObserver``.
    """

    def __init__(self, source: FrameProcessor, **kwargs: object) -> None:
        """Create a timeline."""
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.source = source
        self.pushed: list[Pushed] = []
        self._changed = asyncio.Condition()

    async def on_push_frame(self, data: FramePushed) -> None:
        """Record a push from the source; metrics frames are left out."""
        if data.source is not self.source or isinstance(data.frame, MetricsFrame):
            return
        self.pushed.append(Pushed(data.frame, data.direction, time.monotonic(), data.timestamp / 1e9))
        async with self._changed:
            self._changed.notify_all()

    def kinds(self, *, collapse: bool = False) -> list[str]:
        """The short names of the frames pushed downstream, and of errors pushed upstream, in order.

        Frames some services push both ways (function-call frames) are listed once.

        Args:
            collapse: Merge runs of ``text`` into one entry.
        """
        kinds = [
            p.kind
            for p in self.pushed
            if p.kind in _KINDS.values() and (p.direction is FrameDirection.DOWNSTREAM or p.kind == "error")
        ]
        if collapse:
            kinds = [k for i, k in enumerate(kinds) if not (k == "text" and i and kinds[i - 1] == "text")]
        return kinds

    def of(self, cls: type[Frame]) -> list[Pushed]:
        """The pushes of frames of type ``cls``."""
        return [p for p in self.pushed if isinstance(p.frame, cls)]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds (checked after every recorded push).

        Raises:
            TimeoutError: If it does not hold within ``timeout`` seconds.
        """
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)


class DownstreamRecorder(FrameProcessor):
    """Sits after the processor under test and records every frame that goes downstream past it."""

    def __init__(self, **kwargs: object) -> None:
        """Create a recorder."""
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Record downstream frames, then pass everything on."""
        await super().process_frame(frame, direction)
        if direction is FrameDirection.DOWNSTREAM:
            self.frames.append(frame)
        await self.push_frame(frame, direction)


@dataclass
class LLMScenario(PipelineRun):
    """A pipeline around one LLM processor, with a real context and its aggregators.

    Args:
        llm: The processor under test (a stock service or a resilient one).
        context: The context to use; a new, empty one when None.
        enable_metrics: Run with metrics and usage metrics enabled.
        observers: More pipeline observers to run with.
    """

    llm: FrameProcessor
    context: LLMContext = field(default_factory=LLMContext)
    enable_metrics: bool = False
    observers: Sequence[BaseObserver] = ()
    timeline: LLMTimeline = field(init=False)
    recorder: DownstreamRecorder = field(init=False)

    def __post_init__(self) -> None:
        self.timeline = LLMTimeline(self.llm)
        self.recorder = DownstreamRecorder(name="DownstreamRecorder")

    async def start(self, timeout: float = 10.0) -> None:
        """Build and start the pipeline; return once the StartFrame got through."""
        aggregators = LLMContextAggregatorPair(self.context)
        pipeline = Pipeline([aggregators.user(), self.llm, self.recorder, aggregators.assistant()])
        params = PipelineParams(enable_metrics=self.enable_metrics, enable_usage_metrics=self.enable_metrics)
        self._worker, self._task = await start_worker(
            pipeline, params=params, observers=[self.timeline, *self.observers], timeout=timeout
        )

    async def ask(self, text: str) -> None:
        """Add a user message to the context and run the LLM, as a finished user turn would."""
        await self.send(LLMMessagesAppendFrame([{"role": "user", "content": text}], run_llm=True))

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; checked whenever the LLM pushes a frame."""
        await self.timeline.wait_until(predicate, timeout)

    def kinds(self, *, collapse: bool = False) -> list[str]:
        """The short names of the frames the LLM pushed, in order (see :meth:`LLMTimeline.kinds`)."""
        return self.timeline.kinds(collapse=collapse)

    @property
    def texts(self) -> list[str]:
        """The text of every ``LLMTextFrame`` the LLM pushed."""
        return [p.frame.text for p in self.timeline.of(LLMTextFrame)]  # type: ignore[attr-defined]

    @property
    def responses(self) -> list[str]:
        """The text of each response, from its start frame to its end frame (or so far)."""
        responses: list[str] = []
        for pushed in self.timeline.pushed:
            if isinstance(pushed.frame, LLMFullResponseStartFrame):
                responses.append("")
            elif isinstance(pushed.frame, LLMTextFrame) and responses:
                responses[-1] += pushed.frame.text
        return responses

    @property
    def downstream(self) -> list[Frame]:
        """Every frame that went downstream past the processor under test (whoever pushed it)."""
        return self.recorder.frames

    @property
    def metrics(self) -> list[MetricsFrame]:
        """The metrics frames that went downstream past the processor under test."""
        return [f for f in self.recorder.frames if isinstance(f, MetricsFrame)]

    @property
    def responses_ended(self) -> int:
        """How many ``LLMFullResponseEndFrame`` the LLM pushed."""
        return len(self.timeline.of(LLMFullResponseEndFrame))

    @property
    def errors(self) -> list[ErrorFrame]:
        """The ``ErrorFrame`` the LLM pushed."""
        return [p.frame for p in self.timeline.of(ErrorFrame)]  # type: ignore[misc]

    @property
    def context_messages(self) -> list[dict[str, object]]:
        """The context's messages, as dictionaries."""
        return [dict(m) for m in self.context.get_messages() if isinstance(m, dict)]

    @property
    def assistant_texts(self) -> list[str]:
        """The text of the assistant messages in the context, in order."""
        texts: list[str] = []
        for message in self.context_messages:
            if message.get("role") != "assistant":
                continue
            content = message.get("content")
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts.append(" ".join(str(p.get("text", "")) for p in content if isinstance(p, dict)))
        return texts
