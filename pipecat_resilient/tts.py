"""ResilientTTS: a drop-in TTS processor that loses no word when the provider's socket drops.

It hosts one stock Pipecat TTS service at a time, made by a factory, and
takes recovery over from it. When the connection drops - a close frame, an
abort, a handshake refused, or a socket that goes quiet while it owes audio -
it retires that instance, connects a fresh one, and replays what was not yet
heard, from the first word without audio. Decisions are made by the
sans-I/O :class:`~pipecat_resilient.ledger.Ledger`; this module only turns
frames into ledger calls and ledger actions into frames.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
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
from pipecat.services.tts_service import TTSService
from pipecat.utils.text.base_text_aggregator import TextType

from pipecat_resilient._hosting import Episode, Hosted, HostedState, now, socket_open
from pipecat_resilient._resilient import Abandoned, RecoveryReport, ResilientProcessor
from pipecat_resilient.failures import Failure, Verdict
from pipecat_resilient.ledger import Action, ActionKind, Ledger, State, Utterance
from pipecat_resilient.policy import RetryPolicy, check_seconds

__all__ = ["RecoveryReport", "ResilientTTS"]

# How long a failed instance may take to push out the audio it had already
# received. It is in memory, so this is a safety bound, not a wait.
DRAIN_TIMEOUT_S = 0.5


@dataclass
class _DrainMarker(ControlFrame):
    """Appended behind a failed instance's received audio; marks where to cut it off."""


class ResilientTTS(ResilientProcessor[TTSService]):
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
        on_connected, on_disconnected, on_tts_request: forwarded from the live
            stock instance, as the stock service raises them.

    Args:
        factory: Zero-argument callable returning a *new* stock TTS service
            each time it is called. It is called twice at construction to
            check that (the second instance is discarded).
        retry: How hard to try for a fresh connection after a drop.
        first_audio_timeout: Seconds the provider may take to start sending
            audio after text was handed to it before the connection is
            considered dead (catches half-open sockets).
        stall_timeout: Seconds audio may pause while the provider still owes
            some before the connection is considered dead.
        **kwargs: Passed to ``FrameProcessor`` (``name=`` and so on).

    Raises:
        TypeError: ``factory`` is not callable or does not return a ``TTSService``.
        ValueError: ``factory`` raised or returned the same object twice, or a
            timeout is not a positive number, or it is not shorter than the
            service's own ``stop_frame_timeout_s`` (after which Pipecat marks
            unheard text as spoken).
    """

    def __init__(
        self,
        factory: Callable[[], TTSService],
        *,
        retry: RetryPolicy | None = None,
        first_audio_timeout: float = 2.0,
        stall_timeout: float = 2.0,
        **kwargs: Any,
    ) -> None:
        """Create the processor and validate its configuration."""
        check_seconds(first_audio_timeout=first_audio_timeout, stall_timeout=stall_timeout)
        self._ledger = Ledger(first_audio_timeout=first_audio_timeout, stall_timeout=stall_timeout)
        self._settings: list[TTSUpdateSettingsFrame] = []
        super().__init__(
            factory,
            TTSService,  # type: ignore[type-abstract]
            journal=self._ledger,
            retry=retry,
            watchdog_tick=max(0.01, min(first_audio_timeout, stall_timeout) / 5),
            **kwargs,
        )
        stop_timeout = getattr(self._host.first.service, "_stop_frame_timeout_s", None)
        longest = max(first_audio_timeout, stall_timeout)
        if isinstance(stop_timeout, int | float) and longest >= stop_timeout:
            raise ValueError(
                f"first_audio_timeout and stall_timeout ({longest:g}s) must be shorter than the service's "
                f"stop_frame_timeout_s ({stop_timeout:g}s): after that Pipecat reports unheard text as spoken"
            )
        for event in ("on_connected", "on_disconnected", "on_tts_request"):
            self._register_event_handler(event)

    # ------------------------------------------------------------------
    # Public state
    # ------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        """The ledger of text in flight (read-only use)."""
        return self._ledger

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
            await self._pass(frame, direction)
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
        elif isinstance(frame, TTSUpdateSettingsFrame) and frame.service in (None, self):
            self._settings.append(frame)
            # Applied to the live instance now (below) and to every fresh one.
            ledger.frame_accepted(frame, interruptible=False)
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
        if isinstance(frame, TTSUpdateSettingsFrame) and frame.service in (None, self):
            self._settings.append(frame)
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
        service = hosted.service
        kind = action.kind
        if kind is ActionKind.START:
            frame = action.frame
            if not isinstance(frame, Frame):
                # Already went downstream: this one only drives the instance.
                frame = LLMFullResponseStartFrame()
                hosted.swallow.add(id(frame))
            await service.queue_frame(frame)
        elif kind is ActionKind.TEXT:
            frame = action.frame if isinstance(action.frame, Frame) else LLMTextFrame(action.text)
            hosted.fed[id(frame)] = utterance
            await service.queue_frame(frame)
        elif kind is ActionKind.SPEAK:
            assert utterance is not None
            frame = (
                action.frame
                if isinstance(action.frame, Frame)
                else _speak_like(utterance.source, action.text)
            )
            hosted.fed[id(frame)] = utterance
            await service.queue_frame(frame, callback=self._closing_processed(utterance))
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
            # Addressed to this processor; the instance must apply it itself,
            # and it never comes back out.
            self._ledger.frame_emerged(frame)
            await service.queue_frame(_settings_for_instance(frame))
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
                self._ledger.closing_processed(utterance)

        return done

    # ------------------------------------------------------------------
    # Frames out of the hosted instance
    # ------------------------------------------------------------------

    def _prepare_instance(self, hosted: Hosted[TTSService]) -> None:
        """Hook into a new instance before it is set up."""
        service = hosted.service
        hosted.word_timestamps = not getattr(service, "_push_text_frames", True)

        def before_process(processor: FrameProcessor, frame: Frame) -> None:
            if not isinstance(frame, SystemFrame):
                hosted.current = hosted.fed.pop(id(frame), None)

        service.add_event_handler("on_before_process_frame", before_process)

        # Text handed to the provider: the stock services all synthesize
        # through run_tts(text, context_id), so that is where to listen.
        run_tts = service.run_tts

        async def run_tts_observed(text: str, context_id: str) -> Any:
            if hosted is self._live and self._ledger.state is State.LIVE:
                self._ledger.text_handed(hosted.current, context_id, text, now=now())
            async for frame in run_tts(text, context_id):
                yield frame

        service.run_tts = run_tts_observed  # type: ignore[method-assign]
        self._hook_errors(hosted)

        async def connected(processor: FrameProcessor) -> None:
            if hosted.state is not HostedState.RETIRED:
                await self._call_event_handler("on_connected")

        async def disconnected(processor: FrameProcessor) -> None:
            if hosted is not self._live:
                return
            await self._call_event_handler("on_disconnected")
            # The stock service reports its own intentional disconnects too
            # (settings changes, shutdown); only an unexpected one is a drop.
            if hosted.stopping or getattr(processor, "_disconnecting", False):
                return
            if socket_open(processor) is False:
                await self._lost(
                    hosted, Failure(Verdict.TRANSIENT, "connectivity", "the service disconnected")
                )

        async def tts_request(processor: FrameProcessor, context_id: str, text: str) -> None:
            if hosted is self._live:
                await self._call_event_handler("on_tts_request", context_id, text)

        service.add_event_handler("on_connected", connected)
        service.add_event_handler("on_disconnected", disconnected)
        service.add_event_handler("on_tts_request", tts_request)

    def _instance_live(self, hosted: Hosted[TTSService]) -> None:
        self._ledger.set_word_timestamps(hosted.word_timestamps)

    async def _connected(self, hosted: Hosted[TTSService]) -> Failure | None:
        for frame in self._settings:
            await hosted.service.queue_frame(_settings_for_instance(frame))
        return None

    def _restore_journal(self, hosted: Hosted[TTSService]) -> None:
        self._ledger.connection_restored(word_timestamps=hosted.word_timestamps)

    async def _deliver(self, hosted: Hosted[TTSService], frame: Frame) -> None:
        """Record the evidence a frame carries, then pass it downstream."""
        ledger = self._ledger
        ledger.frame_emerged(frame)
        context_id = getattr(frame, "context_id", None)
        if isinstance(frame, TTSAudioRawFrame):
            ledger.audio_received(context_id, now=now())
            hosted.last_audio_context = context_id
            self._progress(hosted)
        elif isinstance(frame, TTSTextFrame):
            if hosted.word_timestamps:
                ledger.words_voiced(context_id, frame.text)
        elif isinstance(frame, TTSStartedFrame):
            utterance = ledger.utterance_for(context_id)
            if utterance is not None and context_id is not None:
                if utterance.started_before_loss and utterance.downstream_context is not None:
                    # The utterance is already open downstream: its replay
                    # continues it under the same context id.
                    hosted.rewrite[context_id] = utterance.downstream_context
                    return
                ledger.started_downstream(utterance, context_id)
        elif isinstance(frame, TTSStoppedFrame):
            utterance = ledger.context_stopped(context_id)
            if utterance is not None:
                ledger.stopped_downstream(utterance)
        if context_id is not None and context_id in hosted.rewrite:
            frame.context_id = hosted.rewrite[context_id]  # type: ignore[attr-defined]
        await self.push_frame(frame)

    async def _drain(self, hosted: Hosted[TTSService]) -> None:
        """Let a failed instance push out the audio it had received, then account for its last word."""
        service = hosted.service
        try:
            context_id = service.get_active_audio_context_id()
            if context_id and service.audio_context_available(context_id):
                marker = _DrainMarker()
                hosted.drain_marker = id(marker)
                await service.append_to_audio_context(context_id, marker)
                await asyncio.wait_for(hosted.drained.wait(), DRAIN_TIMEOUT_S)
            await self._complete_last_word(hosted)
        finally:
            if self._ledger.state is State.RECOVERING:
                self._ledger.drained()

    async def _complete_last_word(self, hosted: Hosted[TTSService]) -> None:
        """Account for a word whose audio all went out but whose timing never came.

        ElevenLabs-style services time a word only when the character after it
        arrives, so the last word before a drop - often a sentence's last - is
        held as a *partial word*. If the failed instance holds exactly the next
        unheard word, all of its audio was received and has just been drained:
        it was heard, so it goes into the context and is not replayed.
        """
        partial = getattr(hosted.service, "_partial_word", None)
        context_id = hosted.last_audio_context
        if not isinstance(partial, str) or not partial or context_id is None:
            return
        utterance = self._ledger.utterance_for(context_id)
        if utterance is None or not self._ledger.next_word_voiced(context_id, partial):
            return
        frame = TTSTextFrame(partial, text_type=TextType.WORD)
        frame.context_id = hosted.rewrite.get(context_id, context_id)
        frame.append_to_context = getattr(utterance.source, "append_to_context", True) is not False
        await self.push_frame(frame)

    async def _abandon(self, reason: str, episode: Episode) -> Abandoned:
        open_contexts = [u.downstream_context for u in self._ledger.open_downstream()]
        unspoken, frames = self._ledger.gave_up()
        return Abandoned(
            unspoken=tuple(unspoken),
            closing=tuple(TTSStoppedFrame(context_id=context_id) for context_id in open_contexts),
            passing=tuple(
                f for f in frames if isinstance(f, Frame) and not isinstance(f, TTSUpdateSettingsFrame)
            ),
        )


def _speak_like(source: object, text: str) -> TTSSpeakFrame:
    """A TTSSpeakFrame for ``text`` with the options of ``source``."""
    if isinstance(source, TTSSpeakFrame):
        frame = TTSSpeakFrame(text, append_to_context=source.append_to_context, text_type=source.text_type)
        frame.interruptible = source.interruptible
        return frame
    return TTSSpeakFrame(text)


def _settings_for_instance(frame: TTSUpdateSettingsFrame) -> TTSUpdateSettingsFrame:
    """A copy of a settings update (addressed to ``owner`` or to nobody) for the hosted instance."""
    return TTSUpdateSettingsFrame(settings=dict(frame.settings), delta=frame.delta)
