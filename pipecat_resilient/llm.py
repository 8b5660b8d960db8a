"""ResilientLLM: a drop-in LLM processor whose answers survive dropped streams and sessions.

For request/response streaming services (``OpenAILLMService`` and the
OpenAI-compatible ones) it watches each answer's stream with a
time-to-first-token and an inter-chunk stall timeout, and when a stream
breaks it asks a fresh instance again: invisibly when nothing had gone
downstream yet, as a continuation of the text already emitted otherwise (or
from scratch, with ``ReplayPolicy(partial_answer="restart")``). An answer
whose function calls were dispatched is never asked again, so no function
runs twice. Decisions are made by the sans-I/O
:class:`~pipecat_resilient.inference.InferenceJournal`.

Speech-to-speech services (``GeminiLiveLLMService``) are handled by
:mod:`pipecat_resilient.realtime`; ``ResilientLLM`` picks that mode itself
from what the factory builds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    FunctionCallInProgressFrame,
    FunctionCallsStartedFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    SystemFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.llm_service import LLMService

from pipecat_resilient._hosting import Episode, Hosted, now
from pipecat_resilient._resilient import Abandoned, Journal, RecoveryReport, ResilientProcessor
from pipecat_resilient.failures import Failure, Verdict
from pipecat_resilient.inference import (
    Inference,
    InferenceAction,
    InferenceActionKind,
    InferenceJournal,
    OverlapTrimmer,
)
from pipecat_resilient.ledger import State
from pipecat_resilient.policy import DEFAULT_REPLAY, ReplayPolicy, RetryPolicy, check_seconds

__all__ = ["RecoveryReport", "ResilientLLM"]


def _is_realtime(service: object) -> bool:
    """Whether ``service`` is a speech-to-speech session (Gemini Live)."""
    try:
        from pipecat.services.google.gemini_live.llm import GeminiLiveLLMService
    except ImportError:  # the google extra is not installed
        return False
    return isinstance(service, GeminiLiveLLMService)


class ResilientLLM(ResilientProcessor[LLMService]):
    """An LLM processor whose answers survive dropped streams and sessions.

    Put it where the stock LLM service would go, built from a factory::

        llm = ResilientLLM(lambda: OpenAILLMService(api_key=KEY, settings=...))
        llm = ResilientLLM(lambda: GeminiLiveLLMService(api_key=KEY, settings=...))

    Functions are registered on the stock service inside the factory (or
    through ``ToolsSchema`` handlers), so every fresh instance has them.

    Event handlers:
        on_connection_lost: ``(processor, failure: Failure)``.
        on_connection_recovered: ``(processor, report: RecoveryReport)``.
        on_connection_given_up: ``(processor, error: ReplayFailed)``.

    Args:
        factory: Zero-argument callable returning a *new* stock LLM service
            each time (called at construction to check it).
        retry: How hard to try for a fresh instance after a failure.
        replay: What to do with an answer cut short.
        first_token_timeout: Seconds an answer may take to start streaming
            (request/response services).
        stall_timeout: Seconds a started answer may go without a chunk.
        **kwargs: Passed to ``FrameProcessor``.

    Raises:
        TypeError: ``factory`` is not callable or does not build an ``LLMService``.
        ValueError: ``factory`` raised or returned the same object twice, or a
            timeout is not a positive number.
    """

    def __new__(cls, factory: Callable[[], LLMService[Any]], *args: Any, **kwargs: Any) -> ResilientLLM:
        """Pick the speech-to-speech shell when the factory builds a realtime session."""
        if cls is ResilientLLM and callable(factory):
            try:
                sample = factory()
            except Exception:
                sample = None  # reported with a clear message by __init__
            if _is_realtime(sample):
                from pipecat_resilient.realtime import ResilientRealtimeLLM

                instance: ResilientLLM = super().__new__(ResilientRealtimeLLM)
                return instance
        created: ResilientLLM = super().__new__(cls)
        return created

    def __init__(
        self,
        factory: Callable[[], LLMService[Any]],
        *,
        retry: RetryPolicy | None = None,
        replay: ReplayPolicy | None = None,
        first_token_timeout: float = 5.0,
        stall_timeout: float = 3.0,
        **kwargs: Any,
    ) -> None:
        """Create the processor and validate its configuration."""
        check_seconds(first_token_timeout=first_token_timeout, stall_timeout=stall_timeout)
        self._replay = _replay_policy(replay)
        super().__init__(
            factory,
            LLMService,
            journal=self._new_journal(first_token_timeout, stall_timeout),
            retry=retry,
            watchdog_tick=max(0.01, min(first_token_timeout, stall_timeout) / 5),
            **kwargs,
        )

    def _new_journal(self, first_token_timeout: float, stall_timeout: float) -> Journal:
        """Make (and keep) the journal of what is in flight; ``self._replay`` is set."""
        self._inferences = InferenceJournal(
            first_token_timeout=first_token_timeout,
            stall_timeout=stall_timeout,
            restart=self._replay.partial_answer == "restart",
        )
        return self._inferences

    @property
    def journal(self) -> InferenceJournal:
        """The journal of inferences in flight (read-only use)."""
        return self._inferences

    # ------------------------------------------------------------------
    # Frames in
    # ------------------------------------------------------------------

    async def _route(self, frame: Frame, direction: FrameDirection) -> None:
        """Journal each context frame (and what must follow it) and feed the live instance."""
        if isinstance(frame, InterruptionFrame):
            if self.state is not State.FAILED:
                self._inferences.interrupted()
            await self._pass(frame, direction)
        elif isinstance(frame, LLMContextFrame):
            if self.state is State.FAILED:
                logger.warning(f"{self}: recovery gave up; not answering")
                return
            self._inferences.context_accepted(frame, direction, interruptible=frame.interruptible)
            await self._feed_pending()
        elif isinstance(frame, SystemFrame) or direction is FrameDirection.UPSTREAM:
            await self._pass(frame, direction)
        elif self.state is State.FAILED:
            await self.push_frame(frame, direction)
        else:
            self._inferences.frame_accepted(frame, interruptible=frame.interruptible)
            await self._feed_pending()

    # ------------------------------------------------------------------
    # Feeding
    # ------------------------------------------------------------------

    def _action_size(self, action: InferenceAction) -> tuple[object | None, int]:
        if action.kind in (InferenceActionKind.CONTEXT, InferenceActionKind.CONTINUE):
            return action.inference, max(1, len(action.text))
        return None, 0

    async def _feed(self, hosted: Hosted[LLMService], action: InferenceAction) -> None:
        inference = action.inference
        service = hosted.service
        if action.kind is InferenceActionKind.FRAME:
            assert isinstance(action.frame, Frame)
            if isinstance(action.frame, EndFrame):
                hosted.stopping = True
            await service.queue_frame(action.frame)
            return
        assert inference is not None
        if action.kind is InferenceActionKind.CLOSE:
            # Through the instance, so it stays in order with what precedes it.
            await service.queue_frame(LLMFullResponseEndFrame())
            return
        frame = inference.frame
        assert isinstance(frame, LLMContextFrame)
        direction = inference.direction if isinstance(inference.direction, FrameDirection) else None
        if action.kind is InferenceActionKind.CONTINUE:
            frame = _continuation(frame, action.text, self._replay.continue_instruction)
            inference.trimmer = OverlapTrimmer(action.text, min_overlap=self._replay.min_repeat_chars)
        hosted.fed[id(frame)] = inference
        await service.queue_frame(frame, direction or FrameDirection.DOWNSTREAM)

    # ------------------------------------------------------------------
    # Frames out of the hosted instance
    # ------------------------------------------------------------------

    def _prepare_instance(self, hosted: Hosted[LLMService]) -> None:
        """Hook into a new instance before it is set up."""
        service = hosted.service
        journal = self._inferences

        def before_process(processor: FrameProcessor, frame: Frame) -> None:
            if isinstance(frame, SystemFrame):
                return
            fed = hosted.fed.pop(id(frame), None)
            hosted.current = fed
            if isinstance(fed, Inference) and hosted is self._live:
                journal.processing_started(fed, now=now())

        service.add_event_handler("on_before_process_frame", before_process)
        self._hook_errors(hosted)
        # The provider's SDK must not retry on its own: recovery is ours, and
        # a retry inside the SDK hides minutes of waiting from the watchdog.
        client = getattr(service, "_client", None)
        if client is not None and isinstance(getattr(client, "max_retries", None), int):
            client.max_retries = 0
        get_chat_completions = getattr(service, "get_chat_completions", None)
        if get_chat_completions is not None:
            # OpenAI-compatible services: watch the raw stream, tool-call
            # chunks included (they produce no frame until the stream ends).
            async def observed(*args: Any, **kwargs: Any) -> Any:
                stream = await get_chat_completions(*args, **kwargs)
                inference = hosted.current if isinstance(hosted.current, Inference) else None
                if inference is None:
                    return stream
                return _ObservedStream(stream, self, hosted, inference)

            service.get_chat_completions = observed  # type: ignore[attr-defined]

    def _restore_journal(self, hosted: Hosted[LLMService]) -> None:
        self._inferences.connection_restored()

    async def _deliver(self, hosted: Hosted[LLMService], frame: Frame) -> None:
        journal = self._inferences
        inference = hosted.current if isinstance(hosted.current, Inference) else None
        if inference is not None and not inference.settled:
            if isinstance(frame, LLMFullResponseStartFrame):
                if not journal.response_started(inference):
                    return
            elif isinstance(frame, LLMTextFrame):
                text = frame.text
                if inference.trimmer is not None:
                    text = inference.trimmer.feed(text)
                    if not text:
                        return
                    frame.text = text
                journal.text_emitted(inference, text, now=now())
                self._progress(hosted)
            elif isinstance(frame, (FunctionCallsStartedFrame, FunctionCallInProgressFrame)):
                journal.functions_started(inference)
                self._progress(hosted)
            elif isinstance(frame, LLMFullResponseEndFrame):
                if inference.trimmer is not None:
                    held = inference.trimmer.finish()
                    if held:
                        journal.text_emitted(inference, held, now=now())
                        await self.push_frame(LLMTextFrame(held))
                journal.response_ended(inference)
                self._progress(hosted)
        else:
            journal.frame_emerged(frame)
        await self.push_frame(frame)

    async def _abandon(self, reason: str, episode: Episode) -> Abandoned:
        lost, frames = self._inferences.gave_up()
        return Abandoned(
            closing=tuple(LLMFullResponseEndFrame() for inference in lost if inference.started_downstream),
            passing=tuple(f for f in frames if isinstance(f, Frame)),
            lost=f"{len(lost)} unfinished answer{'' if len(lost) == 1 else 's'}",
        )


class _ObservedStream:
    """A chat-completions stream that reports every chunk and its end to the journal."""

    def __init__(
        self, stream: Any, owner: ResilientLLM, hosted: Hosted[LLMService], inference: Inference
    ) -> None:
        self._stream = stream
        self._owner = owner
        self._hosted = hosted
        self._inference = inference

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Any]:
        journal = self._owner.journal
        finished = False
        async for chunk in self._stream:
            if self._hosted is self._owner._live:
                journal.chunk_received(self._inference, now=now())
            choices = getattr(chunk, "choices", None) or []
            if any(getattr(choice, "finish_reason", None) for choice in choices):
                finished = True
            yield chunk
        if self._hosted is not self._owner._live:
            return
        if not finished:
            # A stream cut short by a proxy or a dropped connection can end
            # cleanly: without a finish reason the answer is not complete.
            failure = Failure(
                Verdict.TRANSIENT, "connectivity", "the answer stream ended without a finish reason"
            )
            await self._owner._lost(self._hosted, failure)
            return
        journal.stream_ended(self._inference)

    async def close(self) -> None:
        closer = getattr(self._stream, "close", None) or getattr(self._stream, "aclose", None)
        if closer is not None:
            await closer()


def _continuation(frame: LLMContextFrame, emitted: str, instruction: str) -> LLMContextFrame:
    """A context asking to continue ``emitted``: the conversation, the cut answer, the instruction."""
    context = frame.context
    messages = [*context.get_messages(), {"role": "assistant", "content": emitted}]
    messages.append({"role": "user", "content": instruction})
    continued = LLMContext(messages, tools=context.tools, tool_choice=context.tool_choice)  # type: ignore[arg-type]
    copy = LLMContextFrame(context=continued)
    copy.speculation = frame.speculation
    return copy


def _replay_policy(replay: ReplayPolicy | None) -> ReplayPolicy:
    """``replay``, or the default; anything but a ReplayPolicy is refused."""
    if replay is None:
        return DEFAULT_REPLAY
    if not isinstance(replay, ReplayPolicy):
        raise TypeError(f"replay must be a ReplayPolicy, got {type(replay).__name__}")
    return replay
