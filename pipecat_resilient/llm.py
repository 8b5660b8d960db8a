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

It stands in for the service it hosts: it *is* an ``LLMService`` (Pipecat's
``LLMLogObserver``, ``LLMSwitcher``, ``LLMWithBackend`` and the MCP client
type-check or call into one), and each public member of ``LLMService`` is
delegated explicitly below: functions registered on the wrapper reach every
instance it ever hosts, ``run_inference`` is recovered like any answer, and
``settings``, the adapter and the service metadata are the live instance's.
Why a subclass *and* an explicit list: a subclass alone would let an inherited
method act silently on the wrapper's own unused state (a function registered
there would never run); a plain delegate would fail the ``isinstance`` checks.
``tests/test_dropin.py`` holds the list against the installed Pipecat. Every
hosted instance shares the first instance's adapter object, so what Pipecat
code writes into ``get_llm_adapter()`` (built-in tools) holds for all of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
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
    LLMUpdateSettingsFrame,
    SystemFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.llm_service import LLMService
from pipecat.services.settings import ServiceSettings

from pipecat_resilient._hosting import Episode, Hosted, now
from pipecat_resilient._resilient import Abandoned, Journal, RecoveryReport, ResilientProcessor
from pipecat_resilient.failures import Failure, Verdict, classify_exception
from pipecat_resilient.health import HealthStore
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
    """Whether ``service`` (or, given a class, its instances) is a speech-to-speech session.

    Told by class name, not by importing the providers' modules: that import
    logs an ERROR in an install without the provider's extra.
    """
    return any(
        (cls.__name__ == "GeminiLiveLLMService" and cls.__module__.startswith("pipecat.services.google"))
        or (
            cls.__name__ == "OpenAIRealtimeLLMService"
            and cls.__module__.startswith("pipecat.services.openai")
        )
        for cls in (service if isinstance(service, type) else type(service)).__mro__
    )


class ResilientLLM(ResilientProcessor[LLMService], LLMService):
    """An LLM processor whose answers survive dropped streams and sessions.

    Put it where the stock LLM service would go, built from a factory::

        llm = ResilientLLM(lambda: OpenAILLMService(api_key=KEY, settings=...))
        llm = ResilientLLM(lambda: GeminiLiveLLMService(api_key=KEY, settings=...))

    Register functions on it as on the stock service
    (``llm.register_function("get_weather", handler)``, the MCP client's
    ``register_tools(llm)``, ``ToolsSchema`` handlers in the context): every
    instance it hosts gets them.

    Event handlers:
        on_connection_lost: ``(processor, failure: Failure)``.
        on_connection_recovered: ``(processor, report: RecoveryReport)``.
        on_connection_given_up: ``(processor, error: ReplayFailed)``.
        on_function_calls_started, on_function_calls_cancelled,
            on_completion_timeout, and any other event of the stock service:
            forwarded from the live instance.

    Args:
        factory: Zero-argument callable returning a *new* stock LLM service
            each time (called at construction to check it).
        retry: How hard to try for a fresh instance after a failure.
        replay: What to do with an answer cut short.
        first_token_timeout: Seconds an answer may take to start streaming
            (request/response services).
        stall_timeout: Seconds a started answer may go without a chunk.
        fallbacks: Factories of other LLM services to fall back on, in order
            of preference (each called twice at construction, like
            ``factory``): streaming services for a streaming primary (another
            OpenAI-compatible endpoint, another provider), sessions of the
            same provider for a speech-to-speech one. When the service in use
            fails ``switch_after`` connection attempts in a row, fails
            permanently (a bad key), or its health says it is down, the
            answer continues on the next one under the same rules as a
            reconnect (a cut answer is continued, function calls never run
            twice).
        health: Where provider health (a circuit breaker per provider) is
            kept: :func:`~pipecat_resilient.health.default_store` when None,
            or a :class:`~pipecat_resilient.redis_health.RedisHealthStore` to
            share it across a fleet.
        switch_back: With fallbacks: ``"boundary"`` (default) goes back to a
            preferred streaming service between answers once its breaker lets
            a probe through; an HTTP service has no connection to probe, so
            that next answer is the probe, and if it fails before its first
            token it is answered by the fallback with nothing shown.
            ``"never"`` keeps the fallback. A speech-to-speech session goes
            back at a turn boundary, probed by its handshake and setup alone
            and seeded with the conversation as heard as it takes over.
        switch_after: With fallbacks: failed connection attempts on one
            provider, within a recovery, before the next is tried.
        **kwargs: Passed to ``FrameProcessor``. (There is no ``standby``: see
            Raises.)

    Raises:
        TypeError: ``factory`` is not callable or does not build an ``LLMService``,
            or a fallback is of another kind than the primary.
        ValueError: ``factory`` raised or returned the same object twice, a
            timeout is not a positive number, or ``standby=True`` was given (a
            warm standby is for TTS: an HTTP LLM keeps no connection between
            requests, and a spare speech-to-speech session would hold an old
            conversation).
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
        fallbacks: Sequence[Callable[[], LLMService[Any]]] = (),
        health: HealthStore | None = None,
        switch_back: str = "boundary",
        switch_after: int = 1,
        **kwargs: Any,
    ) -> None:
        """Create the processor and validate its configuration."""
        if kwargs.pop("standby", False):
            # A warm standby is a TTS feature (ResilientTTS(standby=True)).
            raise ValueError(
                f"{type(self).__name__}: standby=True is not supported for LLMs: an HTTP LLM service "
                "keeps no connection open between requests, and a speech-to-speech session holds the "
                "conversation it was opened with (a spare one would hold an old one)"
            )
        check_seconds(first_token_timeout=first_token_timeout, stall_timeout=stall_timeout)
        self._replay = _replay_policy(replay)
        super().__init__(
            factory,
            LLMService,
            journal=self._new_journal(first_token_timeout, stall_timeout),
            retry=retry,
            watchdog_tick=max(0.01, min(first_token_timeout, stall_timeout) / 5),
            fallbacks=fallbacks,
            health=health,
            switch_back=switch_back,
            switch_after=switch_after,
            **kwargs,
        )
        self._check_chain()

    def _check_chain(self) -> None:
        """A fallback chain is of one kind: streaming LLMs, or sessions of one speech-to-speech provider."""
        primary, *others = self._host.classes
        for index, cls in enumerate(others):
            if _is_realtime(cls) != _is_realtime(primary):
                raise TypeError(
                    f"{type(self).__name__}: fallbacks[{index}] builds a {cls.__name__}, but the primary "
                    f"is a {primary.__name__}: streaming LLMs and speech-to-speech sessions cannot "
                    "fall back on each other"
                )
            if _is_realtime(cls) and cls is not primary:
                raise TypeError(
                    f"{type(self).__name__}: fallbacks[{index}] builds a {cls.__name__}, but the primary "
                    f"is a {primary.__name__}: a speech-to-speech session falls back on another "
                    "session of the same provider (another key, region or model)"
                )

    def _idle(self) -> bool:
        """No answer or frame in flight: a boundary where the provider may change."""
        return self._inferences.in_flight == 0

    def _connecting_proves_health(self, hosted: Hosted[LLMService]) -> bool:
        """A streaming (HTTP) service connects nothing before it is asked: its next answer is the probe."""
        return _is_realtime(hosted.service)

    # A stock LLM service can take tens of ms to build (its SDK loads a CA
    # bundle: about 30 ms for OpenAILLMService, 45 for GeminiLiveLLMService):
    # the next instance of each provider of the chain is built ahead of time.
    _spare_instance = True

    def _before_connect(self, hosted: Hosted[LLMService]) -> None:
        """Have the next instance of ``hosted``'s provider built, in a worker thread."""
        self.create_task(self._build_spare(hosted), name="spare")

    async def _build_spare(self, hosted: Hosted[LLMService]) -> None:
        """Build the next instance of ``hosted``'s provider (now: a subclass may wait)."""
        await self._host.replenish(hosted.provider)

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
    # Standing in for the stock service (see the module docstring)
    # ------------------------------------------------------------------

    @property
    def settings(self) -> ServiceSettings:
        """The live instance's settings (the newest instance's while recovering)."""
        return self._reference.settings

    def get_llm_adapter(self) -> Any:
        """The adapter every hosted instance shares."""
        return self._reference.get_llm_adapter()

    def create_llm_specific_message(self, message: Any) -> Any:
        """An LLM-specific message for the hosted service's adapter."""
        return self._reference.create_llm_specific_message(message)

    @property
    def supports_response_schema(self) -> bool:  # type: ignore[override]
        """Whether the hosted service can enforce a response schema in ``run_inference``."""
        return bool(self._reference.supports_response_schema)

    def model_supports_response_schema(self, model: str) -> bool:  # type: ignore[override]
        """Whether ``model`` can enforce a response schema on the hosted service."""
        return type(self._reference).model_supports_response_schema(model)

    @property
    def reports_ttfat(self) -> bool:
        """Whether the hosted service reports time-to-first-answer-token."""
        return self._reference.reports_ttfat

    @property
    def accepts_intermediate_function_call_results(self) -> bool:
        """Whether the hosted service delivers a tool's intermediate results to the model."""
        return self._reference.accepts_intermediate_function_call_results

    def llm_with_backend_role_objection(self, role: Any) -> str | None:
        """Why the hosted service cannot take ``role`` in an ``LLMWithBackend``, if it cannot."""
        return self._reference.llm_with_backend_role_objection(role)

    def service_metadata_frame(self) -> Any:
        """The hosted service's metadata frame (named after this processor)."""
        return self._reference.service_metadata_frame()

    def register_function(
        self,
        function_name: str | None,
        handler: Any,
        *,
        cancel_on_interruption: bool | None = None,
        timeout_secs: float | None = None,
        cancellable_by_llm: bool | None = None,
    ) -> None:
        """Register a function handler, on every instance this processor hosts (see ``LLMService``)."""
        self._configure(
            ("function", function_name),
            lambda s: s.register_function(
                function_name,
                handler,
                cancel_on_interruption=cancel_on_interruption,
                timeout_secs=timeout_secs,
                cancellable_by_llm=cancellable_by_llm,
            ),
        )

    def register_direct_function(self, handler: Any, **kwargs: Any) -> None:
        """Register a direct function, on every instance (deprecated in Pipecat, as on the stock)."""
        self._configure(("direct", handler), lambda s: s.register_direct_function(handler, **kwargs))

    def _register_direct_function(self, handler: Any, **kwargs: Any) -> None:
        """What ``LLMSwitcher.register_direct_function`` calls on its members."""
        self._configure(("direct", handler), lambda s: s._register_direct_function(handler, **kwargs))

    def unregister_function(self, function_name: str | None) -> None:
        """Unregister a function handler, from every instance."""
        self._configure(("function", function_name), lambda s: s.unregister_function(function_name))

    def unregister_direct_function(self, handler: Any) -> None:
        """Unregister a direct function, from every instance."""
        self._configure(("direct", handler), lambda s: s.unregister_direct_function(handler))

    def has_function(self, function_name: str) -> bool:
        """Whether a handler is registered for ``function_name`` (on the live instance)."""
        return bool(self._reference.has_function(function_name))

    def _sync_registered_tool_handlers(self, tools: Any) -> None:
        """What ``LLMSwitcher`` calls on each member for every context: sync advertised tools' handlers."""
        self._configure("synced-tools", lambda s: s._sync_registered_tool_handlers(tools))

    def append_system_instruction(self, instruction: str) -> None:
        """Append durable text to the system instruction, on every instance."""
        self._configure(("system-instruction", object()), lambda s: s.append_system_instruction(instruction))

    def set_user_turn_completion_config(self, config: Any) -> None:
        """Set the turn completion configuration, on every instance."""
        self._configure("turn-completion", lambda s: s.set_user_turn_completion_config(config))

    async def cancel_function_calls(self, *, reason: str = "cancelled") -> list[Any]:
        """Cancel every function call the live instance has in flight."""
        live = self._live
        return await live.service.cancel_function_calls(reason=reason) if live is not None else []

    async def run_function_calls(self, function_calls: Any) -> None:
        """Run function calls on the live instance (as the stock service runs its own)."""
        live = self._live
        if live is None:
            raise RuntimeError(f"{self}: no live instance to run function calls on (recovering)")
        await live.service.run_function_calls(function_calls)

    async def run_inference(
        self,
        context: LLMContext,
        max_tokens: int | None = None,
        system_instruction: str | None = None,
        response_schema: dict[str, Any] | None = None,
    ) -> str | None:
        """Run a one-shot, out-of-band inference, recovered like any answer.

        A connection failure (a dropped or refused request) is retried under
        this processor's ``RetryPolicy`` on whichever instance is live, the
        SDK's own retries being off; anything else (a bad request, an
        application error) is raised as the stock service raises it, and so is
        the last failure once the policy is spent.

        Args:
            context: The LLM context.
            max_tokens: As the stock service takes it.
            system_instruction: As the stock service takes it.
            response_schema: As the stock service takes it.

        Returns:
            The answer, or None when there is none (as the stock service).
        """
        episode = Episode(self._retry, started=now(), rng=self._rng)
        while True:
            episode.attempts += 1
            service = self._reference
            try:
                return await service.run_inference(
                    context,
                    max_tokens=max_tokens,
                    system_instruction=system_instruction,
                    response_schema=response_schema,
                )
            except Exception as exc:
                failure = classify_exception(exc)
                if failure is None:
                    raise
                reason = episode.record(failure)
                wait = episode.next_wait(now()) if reason is None else None
                if wait is None:
                    logger.warning(
                        f"{self}: one-shot inference failed after {episode.attempts} attempt(s) "
                        f"({failure.description})"
                    )
                    raise
                logger.info(f"{self}: one-shot inference failed ({failure.description}); retrying")
                if wait > 0:
                    await asyncio.sleep(wait)

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
            if self._is_own_settings(frame):
                assert isinstance(frame, LLMUpdateSettingsFrame)
                self._applied_settings.append(frame)  # for the instance a revival connects
                return
            await self.push_frame(frame, direction)
        else:
            self._inferences.frame_accepted(frame, interruptible=frame.interruptible)
            await self._feed_pending()

    _settings_frame = LLMUpdateSettingsFrame

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
            if self._is_own_settings(action.frame):
                # Applied by the instance, never to come back out.
                assert isinstance(action.frame, LLMUpdateSettingsFrame)
                self._inferences.frame_emerged(action.frame)
                await self._apply_settings(hosted, action.frame)
                return
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
        first = self._host.first if hasattr(self, "_host") else None
        if (
            first is not None
            and first.service is not service
            and type(first.service._adapter) is type(service._adapter)
        ):
            # One adapter for every instance (of one kind: a fallback of
            # another provider keeps its own): what Pipecat code writes into
            # get_llm_adapter() (built-in tools...) holds for all of them.
            service._adapter = first.service._adapter

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
