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
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    ControlFrame,
    EagerTranscriptionFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMAssistantPushAggregationFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    StartFrame,
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
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup
from pipecat.services.tts_service import TTSService
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.text.base_text_aggregator import TextType

from pipecat_resilient._hosting import STABLE_AFTER_S, Episode, Host, Hosted, HostedState, now, socket_open
from pipecat_resilient.errors import ReplayFailed
from pipecat_resilient.failures import Failure, Verdict
from pipecat_resilient.ledger import Action, ActionKind, Ledger, State, Utterance
from pipecat_resilient.policy import DEFAULT_RETRY, RetryPolicy

__all__ = ["RecoveryReport", "ResilientTTS"]

# How long a failed instance may take to push out the audio it had already
# received. It is in memory, so this is a safety bound, not a wait.
DRAIN_TIMEOUT_S = 0.5


@dataclass
class _DrainMarker(ControlFrame):
    """Appended behind a failed instance's received audio; marks where to cut it off."""


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What one recovery did, passed to ``on_connection_recovered``.

    Parameters:
        failure: The failure that started it.
        attempts: Connection attempts it took.
        downtime: Seconds from the drop being detected to the fresh instance
            being fed the replay.
        replayed_utterances: Utterances replayed (in part or whole).
        replayed_chars: Characters of text replayed.
    """

    failure: Failure | None
    attempts: int
    downtime: float
    replayed_utterances: int
    replayed_chars: int


class ResilientTTS(FrameProcessor):
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
        super().__init__(**kwargs)
        if retry is None:
            retry = DEFAULT_RETRY
        if not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
        for name, value in (("first_audio_timeout", first_audio_timeout), ("stall_timeout", stall_timeout)):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        self._retry = retry
        self._ledger = Ledger(first_audio_timeout=first_audio_timeout, stall_timeout=stall_timeout)
        self._live: Hosted[TTSService] | None = None
        self._setup_data: FrameProcessorSetup | None = None
        self._start_frame: StartFrame | None = None
        self._first_failure: Failure | None = None
        self._settings: list[TTSUpdateSettingsFrame] = []
        self._episode: Episode | None = None
        self._lost_at: float | None = None
        self._ended = False
        self._rng = random.Random()
        self._feed_lock = asyncio.Lock()
        self._watchdog_task: asyncio.Task[None] | None = None
        self._recovery_task: asyncio.Task[None] | None = None
        self._draining: Hosted[TTSService] | None = None
        self._host: Host[TTSService] = Host(
            self,
            factory,
            TTSService,  # type: ignore[type-abstract]
            downstream=self._on_instance_downstream,
            upstream=self._on_instance_upstream,
            prepare=self._prepare,
        )
        stop_timeout = getattr(self._host.first.service, "_stop_frame_timeout_s", None)
        longest = max(first_audio_timeout, stall_timeout)
        if isinstance(stop_timeout, int | float) and longest >= stop_timeout:
            raise ValueError(
                f"first_audio_timeout and stall_timeout ({longest:g}s) must be shorter than the service's "
                f"stop_frame_timeout_s ({stop_timeout:g}s): after that Pipecat reports unheard text as spoken"
            )
        for event in (
            "on_connection_lost",
            "on_connection_recovered",
            "on_connection_given_up",
            "on_connected",
            "on_disconnected",
            "on_tts_request",
        ):
            self._register_event_handler(event)

    # ------------------------------------------------------------------
    # Public state
    # ------------------------------------------------------------------

    @property
    def service(self) -> TTSService | None:
        """The live stock service instance, or None while recovering."""
        return self._live.service if self._live is not None else None

    @property
    def state(self) -> State:
        """Whether it is live, recovering, or has given up."""
        return self._ledger.state

    @property
    def ledger(self) -> Ledger:
        """The ledger of text in flight (read-only use)."""
        return self._ledger

    # ------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        """Set up the processor and its first service instance (which connects here)."""
        await super().setup(setup)
        self._setup_data = setup
        self._first_failure = await self._host.set_up(self._host.first, setup, self._retry.attempt_timeout)

    async def cleanup(self) -> None:
        """Tear down every service instance."""
        await super().cleanup()
        self._ended = True
        await self._stop_tasks()
        self._live = None
        await self._host.close()

    async def set_usable(self, is_usable: bool) -> None:
        """Bring the processor back after it gave up (or write it off).

        Setting it usable again after recovery gave up connects a fresh
        instance for the text that comes next.
        """
        await super().set_usable(is_usable)
        if (
            is_usable
            and self._ledger.state is State.FAILED
            and self._start_frame is not None
            and not self._ended
        ):
            self._ledger.revived()
            self._lost_at = now()
            self._episode = None
            self._recovery_task = self.create_task(self._recover(None), name="recovery")

    # ------------------------------------------------------------------
    # Frames in
    # ------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Journal each frame and feed it to the live instance."""
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self._start(frame)
        elif isinstance(frame, CancelFrame):
            await self._cancel(frame)
        elif direction is FrameDirection.UPSTREAM:
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

    async def _start(self, frame: StartFrame) -> None:
        self._start_frame = frame
        await self.push_frame(frame)
        self._watchdog_task = self.create_task(self._watchdog(), name="watchdog")
        first = self._host.first
        first.state = HostedState.LIVE
        first.live_since = now()
        self._live = first
        self._ledger.set_word_timestamps(first.word_timestamps)
        if self._first_failure is not None:
            await self._lost(first, self._first_failure)
            return
        first.swallow.add(id(frame))
        await first.service.queue_frame(frame)

    async def _cancel(self, frame: CancelFrame) -> None:
        self._ended = True
        await self._stop_tasks()
        live = self._live
        await self.push_frame(frame)
        if live is not None:
            live.stopping = True
            live.swallow.add(id(frame))
            await live.service.queue_frame(frame)

    async def _pass(self, frame: Frame, direction: FrameDirection) -> None:
        """Hand a frame the ledger need not track to the live instance, or pass it on."""
        live = self._live
        if live is not None and live.state is HostedState.LIVE:
            await live.service.queue_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

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

    async def _feed_pending(self) -> tuple[int, int]:
        """Feed the live instance whatever the ledger says is due.

        Returns:
            How many utterances and characters of text were fed.
        """
        utterances: set[int] = set()
        chars = 0
        async with self._feed_lock:
            live = self._live
            while live is not None and live is self._live and self._ledger.state is State.LIVE:
                actions = self._ledger.to_feed()
                if not actions:
                    break
                for action in actions:
                    if live is not self._live:
                        break
                    if action.utterance is not None and action.text:
                        utterances.add(id(action.utterance))
                        chars += len(action.text)
                    await self._feed(live, action)
        return len(utterances), chars

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
            await service.queue_frame(_settings_for_instance(frame, self))
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

    def _prepare(self, hosted: Hosted[TTSService]) -> None:
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

        # Connection errors are ours to handle: the stock service would log
        # each at ERROR although it is about to be recovered (or, once given
        # up, reported by this processor, once).
        push_error_frame = service.push_error_frame

        async def push_error_frame_observed(
            error: ErrorFrame, force_treat_as_permanent: bool = False
        ) -> None:
            if hosted.state in (HostedState.DRAINING, HostedState.RETIRED):
                logger.debug(f"{self}: {service} (retired) reported: {error.error}")
                return
            if Host.failure_from(hosted, error) is not None:
                logger.debug(f"{self}: {service} reported: {error.error}")
                error.processor = error.processor or service
                await self._on_instance_upstream(hosted, error)
                return
            await push_error_frame(error, force_treat_as_permanent=force_treat_as_permanent)

        service.push_error_frame = push_error_frame_observed  # type: ignore[method-assign]

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

    async def _on_instance_downstream(self, hosted: Hosted[TTSService], frame: Frame) -> None:
        if hosted.state is HostedState.DRAINING:
            # A failed instance pushes out what it had received before it
            # failed, up to the marker; that audio is real and was heard.
            if id(frame) == hosted.drain_marker:
                hosted.drained.set()
            else:
                await self._deliver(hosted, frame)
            return
        if hosted is not self._live:
            return
        await self._deliver(hosted, frame)

    async def _deliver(self, hosted: Hosted[TTSService], frame: Frame) -> None:
        """Record the evidence a frame carries, then pass it downstream."""
        if id(frame) in hosted.swallow:
            hosted.swallow.discard(id(frame))
            return
        ledger = self._ledger
        ledger.frame_emerged(frame)
        context_id = getattr(frame, "context_id", None)
        if isinstance(frame, TTSAudioRawFrame):
            ledger.audio_received(context_id, now=now())
            hosted.last_audio_context = context_id
            if hosted is self._live:
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
        elif isinstance(frame, EndFrame):
            self._ended = True
        if context_id is not None and context_id in hosted.rewrite:
            frame.context_id = hosted.rewrite[context_id]  # type: ignore[attr-defined]
        await self.push_frame(frame)

    async def _on_instance_upstream(self, hosted: Hosted[TTSService], frame: Frame) -> None:
        if hosted.state is HostedState.CONNECTING:
            if isinstance(frame, ErrorFrame):
                failure = Host.failure_from(hosted, frame)
                if failure is not None:
                    hosted.failures.append(failure)
                else:
                    logger.debug(f"{self}: {hosted} reported while connecting: {frame.error}")
            return
        if hosted is not self._live:
            return
        if isinstance(frame, ErrorFrame) and frame.processor in (None, hosted.service):
            failure = Host.failure_from(hosted, frame)
            if failure is not None:
                if not self._ended:
                    await self._lost(hosted, failure)
                return
            # Not about the connection: pass it on as this processor's, so a
            # ServiceSwitcher judges it by this processor's usability.
            category = frame.category
            if category is not None and category.is_permanent:
                category = ErrorCategory.UNKNOWN
            error = ErrorFrame(
                error=frame.error, exception=frame.exception, processor=self, category=category
            )
            await self.push_frame(error, FrameDirection.UPSTREAM)
            return
        await self.push_frame(frame, FrameDirection.UPSTREAM)

    def _progress(self, hosted: Hosted[TTSService]) -> None:
        """The live instance produced audio: the recovery episode is over."""
        if not hosted.produced:
            hosted.produced = True
            self._episode = None

    # ------------------------------------------------------------------
    # Failure and recovery
    # ------------------------------------------------------------------

    async def _lost(self, hosted: Hosted[TTSService], failure: Failure) -> None:
        """The live instance failed: stop feeding it, drain it, and start recovering."""
        if hosted is not self._live:
            return
        # Decide synchronously, before any await lets the failed instance emit.
        self._live = None
        hosted.state = HostedState.DRAINING
        self._draining = hosted
        self._ledger.connection_lost(now=now())
        self._lost_at = now()
        logger.warning(f"{self}: lost {hosted.service} ({failure.description}); recovering")
        self.create_task(self._drain(hosted), name="drain")
        if self._ended:
            return
        self._recovery_task = self.create_task(self._recover(failure), name="recovery")
        await self._call_event_handler("on_connection_lost", failure)

    async def _drain(self, hosted: Hosted[TTSService]) -> None:
        """Let a failed instance push out the audio it had received, then cut it off."""
        service = hosted.service
        try:
            context_id = service.get_active_audio_context_id()
            if context_id and service.audio_context_available(context_id):
                marker = _DrainMarker()
                hosted.drain_marker = id(marker)
                await service.append_to_audio_context(context_id, marker)
                await asyncio.wait_for(hosted.drained.wait(), DRAIN_TIMEOUT_S)
            await self._complete_last_word(hosted)
        except Exception as exc:
            logger.debug(f"{self}: draining {service} ended early ({type(exc).__name__})")
        finally:
            hosted.drained.set()
            if self._ledger.state is State.RECOVERING:
                self._ledger.drained()
            self._host.retire(hosted)
            hosted.drain_done.set()

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

    async def _drained(self) -> None:
        """Wait until the last failed instance is drained (its evidence counts for the replay)."""
        draining = self._draining
        if draining is not None:
            await draining.drain_done.wait()

    async def _recover(self, failure: Failure | None) -> None:
        if self._episode is None:
            self._episode = Episode(self._retry, started=now(), rng=self._rng)
        episode = self._episode
        reason = episode.record(failure) if failure is not None else None
        while reason is None:
            wait = episode.next_wait(now())
            if wait is None:
                over = episode.attempts >= self._retry.attempts
                reason = "attempts exhausted" if over else "recovery deadline passed"
                break
            if wait > 0:
                await asyncio.sleep(wait)
            episode.attempts += 1
            hosted, attempt_failure = await self._connect_once()
            if hosted is not None:
                await self._go_live(hosted, episode, failure)
                return
            assert attempt_failure is not None
            logger.warning(
                f"{self}: connection attempt {episode.attempts} failed ({attempt_failure.description})"
            )
            reason = episode.record(attempt_failure)
        await self._give_up(reason, episode)

    async def _connect_once(self) -> tuple[Hosted[TTSService] | None, Failure | None]:
        assert self._setup_data is not None and self._start_frame is not None
        try:
            hosted = self._host.make()
        except TypeError as exc:
            return None, Failure(Verdict.PERMANENT, "application", f"factory: {exc}")
        except Exception as exc:
            return None, Failure(Verdict.TRANSIENT, "application", f"factory raised {type(exc).__name__}")
        timeout = self._retry.attempt_timeout
        failure = await self._host.set_up(hosted, self._setup_data, timeout)
        if failure is None:
            failure = await self._host.start(hosted, self._start_frame, timeout)
        if failure is not None:
            self._host.retire(hosted)
            return None, failure
        for frame in self._settings:
            await hosted.service.queue_frame(_settings_for_instance(frame, self))
        return hosted, None

    async def _go_live(self, hosted: Hosted[TTSService], episode: Episode, failure: Failure | None) -> None:
        if self._ended:
            self._host.retire(hosted)
            return
        await self._drained()
        hosted.state = HostedState.LIVE
        hosted.live_since = now()
        self._live = hosted
        self._ledger.connection_restored(word_timestamps=hosted.word_timestamps)
        utterances, chars = await self._feed_pending()
        downtime = now() - (self._lost_at or now())
        logger.info(
            f"{self}: recovered on attempt {episode.attempts} after {downtime:.3f}s; "
            f"replayed {chars} characters in {utterances} utterance(s)"
        )
        report = RecoveryReport(failure, episode.attempts, downtime, utterances, chars)
        await self._call_event_handler("on_connection_recovered", report)

    async def _give_up(self, reason: str, episode: Episode) -> None:
        await self._drained()
        open_contexts = [u.downstream_context for u in self._ledger.open_downstream()]
        unspoken, frames = self._ledger.gave_up()
        self._episode = None
        error = ReplayFailed(unspoken=tuple(unspoken), attempts=episode.attempts, reason=reason)
        last = episode.failures[-1] if episode.failures else None
        try:
            category = ErrorCategory(last.category) if last is not None else ErrorCategory.CONNECTIVITY
        except ValueError:
            category = ErrorCategory.UNKNOWN
        detail = f"; last failure: {last.description}" if last is not None else ""
        logger.debug(f"{self}: could not speak {unspoken}")
        for context_id in open_contexts:
            await self.push_frame(TTSStoppedFrame(context_id=context_id))
        await self.push_error_frame(
            ErrorFrame(error=f"{self} {error}{detail}", exception=error, category=category),
            force_treat_as_permanent=True,
        )
        for frame in frames:
            if isinstance(frame, Frame) and not isinstance(frame, TTSUpdateSettingsFrame):
                if isinstance(frame, EndFrame):
                    self._ended = True
                await self.push_frame(frame)
        await self._call_event_handler("on_connection_given_up", error)

    async def _watchdog(self) -> None:
        """Declare the live instance dead when it owes audio and has gone quiet."""
        ledger = self._ledger
        tick = max(0.01, min(ledger.first_audio_timeout, ledger.stall_timeout) / 5)
        while True:
            await asyncio.sleep(tick)
            hosted = self._live
            if hosted is None or hosted.state is not HostedState.LIVE:
                continue
            t = now()
            reason = ledger.overdue(now=t)
            if reason is not None:
                await self._lost(hosted, Failure(Verdict.TRANSIENT, "connectivity", reason))
            elif (
                self._episode is not None
                and hosted.live_since is not None
                and t - hosted.live_since > STABLE_AFTER_S
            ):
                # Up long enough without failing: the recovery is over.
                self._episode = None

    async def _stop_tasks(self) -> None:
        for task in (self._watchdog_task, self._recovery_task):
            if task is not None and task is not asyncio.current_task():
                await self.cancel_task(task)
        self._watchdog_task = self._recovery_task = None


def _speak_like(source: object, text: str) -> TTSSpeakFrame:
    """A TTSSpeakFrame for ``text`` with the options of ``source``."""
    if isinstance(source, TTSSpeakFrame):
        frame = TTSSpeakFrame(text, append_to_context=source.append_to_context, text_type=source.text_type)
        frame.interruptible = source.interruptible
        return frame
    return TTSSpeakFrame(text)


def _settings_for_instance(frame: TTSUpdateSettingsFrame, owner: FrameProcessor) -> TTSUpdateSettingsFrame:
    """A copy of a settings update (addressed to ``owner`` or to nobody) for the hosted instance."""
    return TTSUpdateSettingsFrame(settings=dict(frame.settings), delta=frame.delta)
