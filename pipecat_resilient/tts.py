"""ResilientTTS: a drop-in TTS processor that loses no word when the provider's socket drops.

It hosts one stock Pipecat TTS service at a time, made by a factory, and
takes recovery over from it. When the connection drops - a close frame, an
abort, a handshake refused, or a socket that goes quiet while it owes audio -
it retires that instance, connects a fresh one, and replays what was not yet
heard, from the first word without audio. Decisions are made by the
sans-I/O :class:`~pipecat_resilient.ledger.Ledger`; this module only turns
frames into ledger calls and ledger actions into frames.

It stands in for the service it hosts: it *is* a ``TTSService`` (for
``isinstance`` checks and typed code), and each public member of
``TTSService`` is either delegated to the hosted instance below, or refused
with a ``TypeError`` saying why (the internal audio-context machinery a
service calls on itself). Why a subclass *and* an explicit list, rather than
either alone: a subclass alone would let an inherited method act silently on
the wrapper's own unused state (``add_text_transformer`` would transform
nothing); a plain delegate would fail Pipecat's and users' ``isinstance``
checks. ``tests/test_dropin.py`` holds the list against the installed Pipecat.

A settings update (``TTSUpdateSettingsFrame``) is applied at the next
utterance boundary: the utterance being spoken finishes in the old voice, then
the live instance applies the change (reconnecting, for providers that do, as
a planned change, never counted as a drop), and every fresh instance after a
later drop gets the latest settings before it goes live.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    ControlFrame,
    EagerTranscriptionFrame,
    EndFrame,
    Frame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMAssistantPushAggregationFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    SystemFrame,
    TextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.settings import ServiceSettings, TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.services.websocket_service import WebsocketService
from pipecat.transcriptions.language import Language
from pipecat.utils.text.base_text_aggregator import TextType

from pipecat_resilient._hosting import Episode, Hosted, HostedState, now
from pipecat_resilient._resilient import Abandoned, RecoveryReport, ResilientProcessor
from pipecat_resilient._timeline import silent_seconds
from pipecat_resilient.failures import Failure
from pipecat_resilient.health import HealthStore
from pipecat_resilient.ledger import Action, ActionKind, Ledger, State, Utterance
from pipecat_resilient.policy import RetryPolicy, check_positive, check_seconds
from pipecat_resilient.providers import TTSAdapter, WordTiming, tts_adapter_for

__all__ = ["RecoveryReport", "ResilientTTS"]

# Enum members read on every frame or word, bound once (an Enum class
# attribute lookup costs ten times a global's).
_LIVE = HostedState.LIVE
_DRAINING = HostedState.DRAINING
_WORD = TextType.WORD

# How long a failed instance may take to push out the audio it had already
# received, when the retry policy sets no recovery deadline. It is in memory,
# so this is a safety bound, not a wait.
DRAIN_TIMEOUT_S = 5.0
# How often a drain looks whether the failed instance finished its context.
DRAIN_POLL_S = 0.005


@dataclass
class _DrainMarker(ControlFrame):
    """Appended behind a failed instance's received audio; marks where to cut it off."""


class ResilientTTS(ResilientProcessor[TTSService], TTSService):
    """A TTS processor that survives provider connection failures without losing a word.

    Put it where the stock TTS service would go. It owns one live service
    instance at a time, built by ``factory``; on a drop it connects a fresh
    instance with capped exponential backoff and full jitter, and replays the
    text nobody heard. The LLM context only ever receives words whose audio
    went downstream.

    Example::

        tts = ResilientTTS(
            lambda: ElevenLabsTTSService(api_key=KEY, settings=ElevenLabsTTSService.Settings(voice=VOICE)),
            retry=RetryPolicy(attempts=4, timeout=10.0),
        )

    Event handlers:
        on_connection_lost: ``(processor, failure: Failure)`` - a drop was detected.
        on_connection_recovered: ``(processor, report: RecoveryReport)`` - a fresh
            instance is connected and the unheard text was replayed into it.
        on_connection_given_up: ``(processor, error: ReplayFailed)`` - recovery
            is exhausted; ``error.unspoken`` is the text nobody heard.
        on_provider_switched: ``(processor, from_name, to_name, reason)`` - the
            processor moved to another provider of its fallback chain.
        on_connected, on_disconnected, on_connection_error, on_tts_request, and
            any other event of the stock service: forwarded from the live
            instance, as the stock service raises them (``on_disconnected``
            also when a drop is detected).

    Args:
        factory: Zero-argument callable returning a *new* stock TTS service
            each time it is called. It is called twice at construction to
            check that (the second instance is discarded).
        retry: How hard to try for a fresh connection after a drop.
        first_audio_timeout: Seconds the provider may take to start sending
            audio after text was handed to it before the connection is
            considered dead (catches half-open sockets). With
            ``adaptive_timeouts``, the most it may take.
        stall_timeout: Seconds audio may pause while the provider still owes
            some before the connection is considered dead. With
            ``adaptive_timeouts``, the most it may pause.
        adaptive_timeouts: Learn how long this provider takes, as TCP learns
            its retransmission timer: the connection is considered dead once
            it is quiet for its smoothed time to first audio (or pause in
            audio) plus four mean deviations and a margin, between
            ``min_timeout`` and the two timeouts above. So a half-open socket
            on a provider that answers in 150 ms is caught in about a third
            of a second, and a slow provider is given the time it needs. The
            timeouts above apply until a few answers were measured, to each
            fresh connection's first audio, and to the next wait after a
            learned timeout ran out. False: always the timeouts above.
        min_timeout: With ``adaptive_timeouts``, the shortest a learned
            timeout may be, in seconds (None: 0.25 s, or the shorter of the
            timeouts above if that is less).
        speaking_rate: For providers without word timings (Deepgram): the
            characters per second the voice speaks at, at its slowest, so that
            what was heard of a sentence cut in the session's first utterance
            can be estimated (later ones use the rate measured in the session).
            Too fast a figure would make a replay skip words; None (the
            default) replays a first cut utterance from its start instead.
        fallbacks: Factories of other TTS providers to fall back on, in order
            of preference (each called twice at construction, like
            ``factory``). When the provider in use fails ``switch_after``
            connection attempts in a row, fails permanently (a bad key), or
            its health says it is down, the unheard text goes to the next
            provider from the first unheard word. Settings updates apply to
            the provider in use when they arrive; each provider keeps its own.
        health: Where provider health (a circuit breaker per provider) is
            kept: :func:`~pipecat_resilient.health.default_store` (shared in
            this process) when None, or a
            :class:`~pipecat_resilient.redis_health.RedisHealthStore` to share
            it across a fleet.
        switch_back: With fallbacks: ``"boundary"`` (default) goes back to a
            preferred provider at the next utterance boundary once it is
            healthy (tried with a connection, nothing billed); ``"never"``
            keeps the fallback for the rest of the session (one voice).
        switch_after: With fallbacks: failed connection attempts on one
            provider, within a recovery, before the next is tried (default 1:
            a dropped socket is reconnected once, then the chain moves on).
        standby: Keep a warm standby: one more instance of the provider in
            use, connected and kept open by the stock service's own
            keep-alive, so that a drop costs no handshake (the replay starts
            on it at once and another is connected in the background). One
            that dies, or missed a settings change, is replaced before it is
            needed. The cost: one more open connection per bot (most
            providers bill audio, not connections; check your plan's
            concurrency limit). Default False.
        **kwargs: Passed to ``FrameProcessor`` (``name=`` and so on).

    Raises:
        TypeError: ``factory`` is not callable or does not return a
            ``TTSService``, or ``adaptive_timeouts`` is not a bool.
        ValueError: ``factory`` raised or returned the same object twice, or a
            timeout is not a positive number, or it is not shorter than the
            service's own ``stop_frame_timeout_s`` (after which Pipecat marks
            unheard text as spoken), or ``min_timeout`` is longer than a
            timeout.
    """

    def __init__(
        self,
        factory: Callable[[], TTSService],
        *,
        retry: RetryPolicy | None = None,
        first_audio_timeout: float = 2.0,
        stall_timeout: float = 2.0,
        adaptive_timeouts: bool = True,
        min_timeout: float | None = None,
        speaking_rate: float | None = None,
        fallbacks: Sequence[Callable[[], TTSService]] = (),
        health: HealthStore | None = None,
        switch_back: str = "boundary",
        switch_after: int = 1,
        standby: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create the processor and validate its configuration."""
        check_seconds(first_audio_timeout=first_audio_timeout, stall_timeout=stall_timeout)
        if speaking_rate is not None:
            check_positive(speaking_rate=speaking_rate)
        self._ledger = Ledger(
            first_audio_timeout=first_audio_timeout,
            stall_timeout=stall_timeout,
            speaking_rate=speaking_rate,
            adaptive_timeouts=adaptive_timeouts,
            min_timeout=min_timeout,
        )
        super().__init__(
            factory,
            TTSService,  # type: ignore[type-abstract]
            journal=self._ledger,
            retry=retry,
            watchdog_tick=max(0.01, self._ledger.shortest_timeout / 5),
            fallbacks=fallbacks,
            health=health,
            switch_back=switch_back,
            switch_after=switch_after,
            standby=standby,
            **kwargs,
        )
        # Made when the first instance of each provider was prepared (one
        # adapter serves every instance of a provider: what it measured
        # outlives a recovery).
        self._ledger.word_timings = self._adapter_for(self._host.first).word_timings
        stop_timeout = getattr(self._host.first.service, "_stop_frame_timeout_s", None)
        longest = max(first_audio_timeout, stall_timeout)
        if isinstance(stop_timeout, int | float) and longest >= stop_timeout:
            raise ValueError(
                f"first_audio_timeout and stall_timeout ({longest:g}s) must be shorter than the service's "
                f"stop_frame_timeout_s ({stop_timeout:g}s): after that Pipecat reports unheard text as spoken"
            )

    _settings_frame = TTSUpdateSettingsFrame

    # ------------------------------------------------------------------
    # Public state
    # ------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        """The ledger of text in flight (read-only use)."""
        return self._ledger

    # ------------------------------------------------------------------
    # Standing in for the stock service (see the module docstring)
    # ------------------------------------------------------------------

    @property
    def settings(self) -> ServiceSettings:
        """The live instance's settings (the newest instance's while recovering)."""
        return self._reference.settings

    @property
    def sample_rate(self) -> int:
        """The output sample rate of the hosted service (0 before the pipeline starts, as the stock)."""
        return self._reference.sample_rate

    @property
    def chunk_size(self) -> int:
        """The hosted service's recommended audio chunk size in bytes."""
        return self._reference.chunk_size

    @property
    def text_aggregation_language(self) -> str:
        """The hosted service's sentence tokenizer language."""
        return self._reference.text_aggregation_language

    @property
    def supports_processing_metrics(self) -> bool:
        """Whether the hosted service has a meaningful processing-time metric."""
        return self._reference.supports_processing_metrics

    @property
    def supports_pronunciations(self) -> bool:
        """Whether the hosted service reads pronunciation markup with its current settings."""
        return self._reference.supports_pronunciations

    def format_pronunciation(self, word: str, ipa: str) -> str | None:  # type: ignore[override]
        """Render a pronunciation in the hosted service's markup."""
        return type(self._reference).format_pronunciation(word, ipa)

    def pronunciation_transform_ipa(self, pronunciations: Any) -> Any:  # type: ignore[override]
        """A text transform that makes the hosted service say words as IPA describes."""
        return type(self._reference).pronunciation_transform_ipa(pronunciations)

    def language_to_service_language(self, language: Language) -> str | None:
        """Convert a language to the hosted service's format."""
        return self._reference.language_to_service_language(language)

    def service_metadata_frame(self) -> Any:
        """The hosted service's metadata frame (named after this processor)."""
        return self._reference.service_metadata_frame()

    def add_text_transformer(self, transform_function: Any, text_type: Any = "*", **kwargs: Any) -> None:
        """Transform text of a type before synthesis, on every instance this processor hosts."""
        key = ("text_transformer", text_type, transform_function)
        self._configure(key, lambda s: s.add_text_transformer(transform_function, text_type, **kwargs))

    def remove_text_transformer(self, transform_function: Any, text_type: Any = "*", **kwargs: Any) -> None:
        """Remove a text transformer, from every instance this processor hosts."""
        key = ("text_transformer", text_type, transform_function)
        self._configure(key, lambda s: s.remove_text_transformer(transform_function, text_type, **kwargs))

    async def set_model(self, model: str) -> None:
        """Change the model, as a settings update (deprecated in Pipecat: use ``TTSUpdateSettingsFrame``)."""
        await self.queue_frame(TTSUpdateSettingsFrame(delta=TTSSettings(model=model)))

    async def set_voice(self, voice: str) -> None:
        """Change the voice, as a settings update (deprecated in Pipecat: use ``TTSUpdateSettingsFrame``)."""
        await self.queue_frame(TTSUpdateSettingsFrame(delta=TTSSettings(voice=voice)))

    async def flush_audio(self, context_id: str | None = None) -> None:
        """Ask the live instance to flush the audio of a context."""
        live = self._live
        if live is not None:
            await live.service.flush_audio(context_id)

    async def run_tts(self, text: str, context_id: str) -> Any:
        """Not on the wrapper: send text as frames (``TTSSpeakFrame``, LLM text) so it is journaled."""
        raise TypeError(_internal("run_tts"))
        yield  # pragma: no cover

    # ------------------------------------------------------------------
    # Frames in
    # ------------------------------------------------------------------

    async def _route(self, frame: Frame, direction: FrameDirection) -> None:
        """Journal each frame and feed it to the live instance."""
        if direction is FrameDirection.UPSTREAM:
            await self._pass(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            if self._ledger.state is not State.FAILED:
                self._ledger.interrupted()
            live = self._live
            await self._pass(frame, direction)
            if live is None or live.state is not HostedState.LIVE:
                # Passed on directly: no instance audio can follow it.
                self._ledger.interruption_passed()
            if self._ledger.blocked:
                # A settings update was waiting for what was just dropped.
                await self._feed_pending()
        elif isinstance(frame, SystemFrame):
            await self._pass(frame, direction)
        elif self._ledger.state is State.FAILED:
            await self._while_failed(frame)
        else:
            self._accept(frame)
            await self._feed_pending()

    def _accept(self, frame: Frame) -> None:
        """Record a downstream data or control frame in the ledger."""
        ledger = self._ledger
        interruptible = frame.interruptible
        if isinstance(frame, (TranscriptionFrame, InterimTranscriptionFrame, EagerTranscriptionFrame)):
            ledger.frame_accepted(frame, interruptible=interruptible)
        elif isinstance(frame, (TextFrame, LLMFullResponseStartFrame, LLMFullResponseEndFrame)) and getattr(
            frame, "skip_tts", False
        ):
            ledger.frame_accepted(frame, interruptible=interruptible)
        elif isinstance(frame, TextFrame):
            ledger.text_accepted(frame.text, source=frame, interruptible=interruptible)
        elif isinstance(frame, LLMFullResponseStartFrame):
            ledger.turn_started(frame, interruptible=interruptible)
        elif isinstance(frame, LLMFullResponseEndFrame):
            ledger.turn_ended(frame, interruptible=interruptible)
        elif isinstance(frame, TTSSpeakFrame):
            ledger.speak_accepted(
                frame,
                frame.text,
                interruptible=interruptible,
                push_aggregation=frame.append_to_context and ledger.open_turn is None,
            )
        elif isinstance(frame, EndFrame):
            ledger.frame_accepted(frame, interruptible=False, closes_turn=True)
        elif self._is_own_settings(frame):
            # Applied at the next utterance boundary, to the live instance and
            # to every fresh one after it.
            ledger.settings_accepted(frame)
        else:
            ledger.frame_accepted(frame, interruptible=interruptible)

    async def _while_failed(self, frame: Frame) -> None:
        if isinstance(frame, (TTSSpeakFrame, TextFrame)) and not isinstance(
            frame, (TranscriptionFrame, InterimTranscriptionFrame, EagerTranscriptionFrame)
        ):
            if not getattr(frame, "skip_tts", False):
                logger.warning(f"{self}: recovery gave up; not speaking {len(frame.text)} characters")
                logger.debug(f"{self}: not speaking [{frame.text}]")
                return
        if self._is_own_settings(frame):
            assert isinstance(frame, TTSUpdateSettingsFrame)
            self._applied_settings.append(frame)  # for the instance a revival connects
            return
        await self.push_frame(frame)

    # ------------------------------------------------------------------
    # Feeding the live instance
    # ------------------------------------------------------------------

    _drains = True

    def _action_size(self, action: Action) -> tuple[object | None, int]:
        return action.utterance, len(action.text)

    async def _feed(self, hosted: Hosted[TTSService], action: Action) -> None:
        utterance = action.utterance
        kind = action.kind
        if kind is ActionKind.START:
            frame = action.frame
            if not isinstance(frame, Frame):
                # Already went downstream: this one only drives the instance.
                frame = LLMFullResponseStartFrame()
                hosted.swallow.add(id(frame))
            await _hand(hosted, frame)
        elif kind is ActionKind.TEXT:
            frame = action.frame if isinstance(action.frame, Frame) else LLMTextFrame(action.text)
            hosted.fed[id(frame)] = utterance
            await _hand(hosted, frame)
        elif kind is ActionKind.SPEAK:
            assert utterance is not None
            frame = (
                action.frame
                if isinstance(action.frame, Frame)
                else _speak_like(utterance.source, action.text)
            )
            hosted.fed[id(frame)] = utterance
            await _hand(hosted, frame, self._closing_processed(utterance))
        elif kind is ActionKind.CLOSE:
            assert utterance is not None
            await self._close_downstream(hosted, utterance)
            if isinstance(action.frame, Frame):
                await self._feed_frame(hosted, action.frame, utterance)
        else:
            assert isinstance(action.frame, Frame)
            await self._feed_frame(hosted, action.frame, utterance)

    async def _feed_frame(
        self, hosted: Hosted[TTSService], frame: Frame, utterance: Utterance | None
    ) -> None:
        service = hosted.service
        if isinstance(frame, EndFrame):
            hosted.stopping = True
        if isinstance(frame, TTSUpdateSettingsFrame):
            # Addressed to this processor, at an utterance boundary; the
            # instance applies it itself, and it never comes back out.
            self._ledger.frame_emerged(frame)
            await self._apply_settings(hosted, frame)
            return
        if utterance is not None:
            hosted.fed[id(frame)] = utterance
            await service.queue_frame(frame, callback=self._closing_processed(utterance))
        else:
            await service.queue_frame(frame)

    async def _close_downstream(self, hosted: Hosted[TTSService], utterance: Utterance) -> None:
        """End an utterance downstream that has nothing left to say, in order, through the instance."""
        context_id = utterance.downstream_context
        self._ledger.stopped_downstream(utterance)
        await hosted.service.queue_frame(TTSStoppedFrame(context_id=context_id))
        if utterance.push_aggregation:
            await hosted.service.queue_frame(LLMAssistantPushAggregationFrame())

    def _closing_processed(self, utterance: Utterance) -> Callable[..., Any]:
        async def done(processor: FrameProcessor, frame: Frame, direction: FrameDirection) -> None:
            if self._live is not None and processor is self._live.service:
                self._ledger.closing_processed(utterance, now=now())

        return done

    # ------------------------------------------------------------------
    # Frames out of the hosted instance
    # ------------------------------------------------------------------

    def _prepare_instance(self, hosted: Hosted[TTSService]) -> None:
        """Hook into a new instance before it is set up."""
        service = hosted.service

        def before_process(processor: FrameProcessor, frame: Frame) -> None:
            if not isinstance(frame, SystemFrame):
                hosted.current = hosted.fed.pop(id(frame), None)

        service.add_event_handler("on_before_process_frame", before_process)

        # Text handed to the provider: the stock services all synthesize
        # through run_tts(text, context_id), so that is where to listen.
        run_tts = service.run_tts

        async def run_tts_observed(text: str, context_id: str) -> Any:
            if hosted is self._live and self._ledger.state is State.LIVE:
                hosted.tracked_contexts.add(context_id)
                audio_due = self._adapter_for(hosted).audio_before_flush
                self._ledger.text_handed(hosted.current, context_id, text, now=now(), audio_due=audio_due)
            async for frame in run_tts(text, context_id):
                yield frame

        service.run_tts = run_tts_observed  # type: ignore[method-assign]
        self._hook_errors(hosted)
        # Word timings, error messages and quiet reconnects, as the provider
        # reports them.
        self._adapter_for(hosted).hook(service, _Sink(self, hosted))

    def _adapter_for(self, hosted: Hosted[TTSService]) -> TTSAdapter:
        """The adapter of ``hosted``'s provider, made on first use (the primary's in ``__init__``)."""
        adapters: dict[int, TTSAdapter] = self.__dict__.setdefault("_adapters", {})
        adapter = adapters.get(hosted.provider)
        if adapter is None:
            adapter = adapters[hosted.provider] = tts_adapter_for(hosted.service)
        return adapter

    def _restore_journal(self, hosted: Hosted[TTSService]) -> None:
        adapter = self._adapter_for(hosted)
        self._ledger.use_provider(hosted.provider, word_timings=adapter.word_timings)
        self._ledger.connection_restored()

    def _connecting_proves_health(self, hosted: Hosted[TTSService]) -> bool:
        """A websocket handshake proves the provider answers; an HTTP service connects nothing."""
        return isinstance(hosted.service, WebsocketService)

    def _idle(self) -> bool:
        return self._ledger.in_flight == 0 and self._ledger.open_turn is None

    async def _deliver(self, hosted: Hosted[TTSService], frame: Frame) -> None:
        """Record the evidence a frame carries, then pass it downstream."""
        ledger = self._ledger
        if isinstance(frame, TTSAudioRawFrame):
            # The most frequent frame by far: its own short path.
            await self._deliver_audio(hosted, frame)
            return
        context_id = getattr(frame, "context_id", None)
        if isinstance(frame, TTSTextFrame) and context_id in hosted.tracked_contexts:
            # Pipecat's word (or sentence) frame for text this instance was
            # handed (never one fed in from upstream, so never journaled):
            # pushed when the provider's timing arrived, or forced at the
            # context's end, audio or not. The words the ledger says were
            # heard go instead (marked for the context or not, as the
            # utterance's source was).
            return
        ledger.frame_emerged(frame)
        if isinstance(frame, InterruptionFrame):
            # The audio of what it dropped that got out before it is heard;
            # nothing after it is.
            ledger.interruption_passed()
        elif isinstance(frame, TTSStartedFrame):
            utterance = ledger.utterance_for(context_id)
            if utterance is not None and context_id is not None:
                if utterance.started_before_loss and utterance.downstream_context is not None:
                    # The utterance is already open downstream: its replay
                    # continues it under the same context id.
                    hosted.rewrite[context_id] = utterance.downstream_context
                    return
                ledger.started_downstream(utterance, context_id)
        elif isinstance(frame, LLMAssistantPushAggregationFrame):
            if ledger.awaiting_commit():
                # The stock service commits a spoken TTSSpeakFrame to the
                # context when it queues it (before its audio, for services
                # that push a sentence's text up front). The commit waits for
                # the words this processor tells the context as they are heard.
                hosted.held_commits.append(frame)
                return
        elif isinstance(frame, TTSStoppedFrame):
            if context_id in hosted.failed_contexts or hosted.failed_all:
                # The stock service stops a context its provider reported an
                # error for; that is not the end of the utterance.
                return
            utterance = ledger.context_stopped(context_id)
            if utterance is not None:
                await self._emit_context_text(utterance)
                ledger.stopped_downstream(utterance)
            held, hosted.held_commits = hosted.held_commits, []
            for commit in held:
                await self.push_frame(commit)
        if context_id is not None and context_id in hosted.rewrite:
            frame.context_id = hosted.rewrite[context_id]  # type: ignore[attr-defined]
        await self.push_frame(frame)
        if ledger.blocked and hosted is self._live:
            # An utterance settled: a settings update waiting for it may go.
            await self._feed_pending()

    async def _deliver_audio(self, hosted: Hosted[TTSService], frame: TTSAudioRawFrame) -> None:
        """Count a piece of audio as heard, pass it on, then tell the context the words it completed."""
        # Audio fed in from upstream (a recording passed through) was journaled.
        journaled = self._ledger.frame_emerged(frame)
        context_id = frame.context_id
        channels = max(1, frame.num_channels)
        seconds = len(frame.audio) / (2 * frame.sample_rate * channels)
        # Measured only if an estimate needs it (with word timings, rarely).
        silence = partial(silent_seconds, frame.audio, frame.sample_rate, channels)
        voiced = self._ledger.audio_pushed(context_id, seconds, now=now(), silence=silence)
        if not hosted.produced:
            self._progress(hosted)
        if context_id is not None and context_id in hosted.rewrite:
            frame.context_id = hosted.rewrite[context_id]
        await self.push_frame(frame)
        if voiced is not None:
            await self._emit_context_text(voiced)
        if journaled and self._ledger.blocked and hosted is self._live:
            await self._feed_pending()

    async def _emit_context_text(self, utterance: Utterance) -> None:
        """Tell the context the words of ``utterance`` whose audio went downstream since the last time."""
        await self._push_context_words(utterance, self._ledger.context_text(utterance))

    async def _push_context_words(self, utterance: Utterance, text: str) -> None:
        if not text.strip():
            return
        append = getattr(utterance.source, "append_to_context", True) is not False
        # Where the stock service sends its frames (a multi-output transport).
        destination = getattr(self._reference, "_transport_destination", None)
        context_id = utterance.downstream_context
        for word in text.split():
            frame = TTSTextFrame(word, _WORD, context_id)
            frame.append_to_context = append
            frame.transport_destination = destination
            await self.push_frame(frame)

    async def _words_timed(
        self, hosted: Hosted[TTSService], context_id: str | None, words: list[WordTiming], last_partial: bool
    ) -> None:
        state = hosted.state
        if state is not _LIVE and state is not _DRAINING:
            return
        utterance = self._ledger.words_timed(context_id, words, last_partial=last_partial)
        if utterance is not None:
            await self._emit_context_text(utterance)

    async def _provider_failed(
        self, hosted: Hosted[TTSService], failure: Failure, context_id: str | None
    ) -> None:
        if hosted is not self._live:
            return
        if context_id is None:
            hosted.failed_all = True
        else:
            hosted.failed_contexts.add(context_id)
        await self._lost(hosted, failure)

    async def _drain(self, hosted: Hosted[TTSService]) -> None:
        """Let a failed instance push out the audio it had received (it counts as heard)."""
        service = hosted.service
        try:
            _hand_out_queued_items_at_once(service)
            context_id = service.get_active_audio_context_id()
            if context_id and service.audio_context_available(context_id):
                marker = _DrainMarker()
                hosted.drain_marker = id(marker)
                await service.append_to_audio_context(context_id, marker)
                # The marker comes out after the audio received before it; or
                # never, when the provider had already finished the context
                # (its end is queued before the marker): then the context
                # closing says the same.
                async with asyncio.timeout(self._retry.timeout or DRAIN_TIMEOUT_S):
                    while not hosted.drained.is_set() and service.audio_context_available(context_id):
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(hosted.drained.wait(), DRAIN_POLL_S)
        finally:
            await self._count_drained(hosted)

    async def _drain_marker_out(self, hosted: Hosted[TTSService]) -> None:
        # Counted here, in the marker's own delivery: the replay waits for
        # it, and a wake-up of the drain task would cost it turns of the loop.
        hosted.drained.set()
        await self._count_drained(hosted)

    async def _count_drained(self, hosted: Hosted[TTSService]) -> None:
        """The drain is over: its evidence counts; the replay may start (once per instance)."""
        if hosted.drain_counted:
            # Counted (or being counted) by the marker's delivery: the instance
            # is retired only once that is over.
            await hosted.drain_done.wait()
            return
        hosted.drain_counted = True
        try:
            # Voiced by the drained audio and not yet told (normally told as
            # the audio went out).
            for utterance, text in self._ledger.pending_context_text():
                await self._push_context_words(utterance, text)
            if self._ledger.state is State.RECOVERING:
                self._ledger.drained()
        finally:
            hosted.drain_done.set()

    async def _abandon(self, reason: str, episode: Episode) -> Abandoned:
        open_contexts = [u.downstream_context for u in self._ledger.open_downstream()]
        unspoken, frames = self._ledger.gave_up()
        # Settings updates never applied still hold for whatever comes next.
        self._applied_settings.extend(f for f in frames if isinstance(f, TTSUpdateSettingsFrame))
        return Abandoned(
            unspoken=tuple(unspoken),
            closing=tuple(TTSStoppedFrame(context_id=context_id) for context_id in open_contexts),
            passing=tuple(
                f for f in frames if isinstance(f, Frame) and not isinstance(f, TTSUpdateSettingsFrame)
            ),
        )


async def _hand(hosted: Hosted[TTSService], frame: Frame, callback: Any = None) -> None:
    """Queue ``frame`` for the instance; a replay fed as it goes live skips a hop.

    A frame queued to a Pipecat processor waits for its input task, which
    moves it to the process queue, whose task then processes it: two turns
    of the event loop, each behind whatever else is ready (on a recovery,
    the pipeline processing the drained audio). An instance going live has
    been handed nothing else, so while its input queue is empty (and not
    paused) the replay is put straight into its process queue, in the order
    it would have reached it. Any other time, or if Pipecat no longer looks
    like this, it is queued as usual.
    """
    service = hosted.service
    if hosted.going_live and not isinstance(frame, SystemFrame):
        inputs = getattr(service, "_FrameProcessor__input_queue", None)
        process = getattr(service, "_FrameProcessor__process_queue", None)
        if (
            isinstance(inputs, asyncio.Queue)
            and isinstance(process, asyncio.Queue)
            and inputs.empty()
            and getattr(service, "_FrameProcessor__process_frame_task", None) is not None
            and getattr(service, "_FrameProcessor__should_block_system_frames", True) is False
            and not service._cancelling
            and not service._enable_direct_mode
        ):
            process.put_nowait((frame, FrameDirection.DOWNSTREAM, callback))
            return
    await service.queue_frame(frame, callback=callback)


def _hand_out_queued_items_at_once(service: object) -> None:
    """Have a failed instance push out what it had queued in one go, not an item per turn of the loop.

    Pipecat's audio context playback waits for each queued item with
    ``asyncio.wait_for(queue.get())``, which takes a turn of the event loop per
    item: each drained frame waited for the pipeline downstream to process the
    one before it (about 0.6 ms a frame on the benchmarks' pipeline), and the
    replay waited for all of them. Items already queued are handed out at
    once instead; an empty queue is waited for as before. Done on a failed
    instance only (it receives nothing more); skipped if Pipecat's playback
    no longer looks like this.
    """
    manager = getattr(service, "_audio_context_manager", None)
    contexts = getattr(manager, "_contexts", None)
    keepalive = getattr(type(manager), "_KEEPALIVE", None)
    get = getattr(manager, "get", None)
    if not isinstance(contexts, dict) or keepalive is None or not callable(get):
        return

    async def get_queued(context_id: str, timeout: float) -> Any:
        queue = contexts.get(context_id)
        while queue is not None:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if item is not keepalive:
                return item
        return await get(context_id, timeout)

    with contextlib.suppress(AttributeError):
        manager.get = get_queued  # type: ignore[union-attr]


def _speak_like(source: object, text: str) -> TTSSpeakFrame:
    """A TTSSpeakFrame for ``text`` with the options of ``source``."""
    if isinstance(source, TTSSpeakFrame):
        frame = TTSSpeakFrame(text, append_to_context=source.append_to_context, text_type=source.text_type)
        frame.interruptible = source.interruptible
        return frame
    return TTSSpeakFrame(text)


def _internal(name: str) -> str:
    return (
        f"ResilientTTS.{name} is part of the machinery a stock TTS service runs on itself; the wrapper "
        "hosts its instance's and does not stand in for it (send frames instead)"
    )


def _refuse(name: str) -> Any:
    """A member of ``TTSService`` that only makes sense inside the hosted instance."""

    def refused(self: ResilientTTS, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(_internal(name))

    refused.__name__ = name
    refused.__doc__ = "Not on the wrapper: internal to the hosted instance (raises TypeError)."
    return refused


# The audio-context and word-timestamp machinery a TTS service calls on itself:
# on the wrapper it would act on nothing, so it says so instead.
for _name in (
    "add_word_timestamps",
    "append_to_audio_context",
    "audio_context_available",
    "create_audio_context",
    "create_context_id",
    "get_active_audio_context_id",
    "get_audio_contexts",
    "has_active_audio_context",
    "on_audio_context_completed",
    "on_audio_context_interrupted",
    "on_turn_context_completed",
    "on_turn_context_created",
    "remove_active_audio_context",
    "remove_audio_context",
    "reset_active_audio_context",
    "reset_word_timestamps",
    "start_word_timestamps",
    "tts_process_generator",
):
    setattr(ResilientTTS, _name, _refuse(_name))
del _name


class _Sink:
    """What an instance's provider adapter reports, for the shell (only while that instance counts)."""

    def __init__(self, owner: ResilientTTS, hosted: Hosted[TTSService]) -> None:
        self._owner = owner
        self._hosted = hosted

    @property
    def stall_timeout(self) -> float:
        """The processor's ``stall_timeout``."""
        return self._owner._ledger.stall_timeout

    async def words_timed(
        self, context_id: str | None, words: list[WordTiming], *, last_partial: bool
    ) -> None:
        await self._owner._words_timed(self._hosted, context_id, words, last_partial)

    async def provider_failed(self, failure: Failure, context_id: str | None) -> None:
        await self._owner._provider_failed(self._hosted, failure, context_id)
