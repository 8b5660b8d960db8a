"""ResilientSTT: a drop-in STT processor that loses no word the caller says when the provider's socket fails.

It hosts one stock Pipecat STT service at a time, made by a factory, and takes
recovery over from it. Every chunk of caller audio is journaled (the sans-I/O
:class:`~pipecat_resilient.audio_journal.AudioJournal`) until the provider has
finalized it. When the connection drops - a close, an abort, a refused
handshake, a provider error message with the socket open, a stream that stays
silent while the caller speaks, a send that never completes - it retires that
instance, connects a fresh one, and sends it the caller's audio from a little
before the end of the last finalized result, then the live audio, as fast as
the provider takes it. Words of the fresh connection that repeat what was
already final are dropped by their *time* on the caller's timeline (each
connection's clock starts at 0; the journal maps it back), so no transcript is
lost and none arrives twice, and the user turn the aggregator builds is whole
and in order. What differs between providers (where their messages and word
timings are, which errors are permanent) is in :mod:`pipecat_resilient._stt_adapters`.

It stands in for the service it hosts: it *is* an ``STTService`` (Pipecat's
``TranscriptionLogObserver`` looks for one), and each public member of
``STTService`` is either delegated to the hosted instance below, or refused
with a ``TypeError`` saying why (the machinery a service runs on itself).
``tests/test_dropin_stt.py`` holds the list against the installed Pipecat.

The caller's audio and VAD frames are passed on by this processor itself, not
by the hosted instance, so they keep flowing while a fresh instance connects,
and replayed audio never goes downstream twice. A VAD stop is held back until
the speech before it is final (a final result or the provider's answer to the
finalize request covers it), so the turn it ends is not committed without its
last words when the connection dies before finalizing them: it waits through
the recovery and the replay, until the fresh connection finalized them. It
passes sooner when the live connection took it ``finalize_timeout`` ago and
owes nothing (it showed no word it has not finalized and answered all the
speech: it had nothing to say about the end of it, a cough), at once before
the caller's next VAD start, and ``stop_hold_timeout`` after it arrived at the
latest. With no drop, it waits only for the provider's final on the last
words, which usually arrives about when the VAD stops.

A settings update (``STTUpdateSettingsFrame``) is applied to the live instance
in order with the audio; a service that reconnects for it does so as a planned
change, and the audio not yet final is replayed into its new connection. Every
fresh instance after a drop gets the latest settings before it connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InputAudioRawFrame,
    LLMContextAssistantTurnFrame,
    STTMuteFrame,
    STTUpdateSettingsFrame,
    SystemFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import ServiceSettings
from pipecat.services.stt_service import STTService
from pipecat.transcriptions.language import Language
from pipecat.utils.errors import ErrorCategory

from pipecat_resilient._hosting import Episode, Hosted, HostedState, now
from pipecat_resilient._resilient import Abandoned, RecoveryReport, ResilientProcessor
from pipecat_resilient._stt_adapters import STTAdapter, adapter_for
from pipecat_resilient.audio_journal import AudioJournal, Entry, EntryKind
from pipecat_resilient.failures import Failure
from pipecat_resilient.ledger import State
from pipecat_resilient.policy import RetryPolicy, check_seconds

__all__ = ["ResilientSTT", "STTRecoveryReport"]

# Frames this processor passes on itself; the hosted instance's copies are dropped.
_PASSED_BY_SHELL = (InputAudioRawFrame, VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame)

# After the first warning about audio dropped over the bound, warn again once
# this much more was dropped.
_DROP_WARNING_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class STTRecoveryReport(RecoveryReport):
    """What one recovery of a speech-to-text connection did, passed to ``on_connection_recovered``.

    Besides :class:`~pipecat_resilient._resilient.RecoveryReport`'s fields
    (``replayed_utterances`` is 1 when audio was replayed, else 0;
    ``replayed_chars`` is 0: audio is not text):

    Parameters:
        replayed_audio_s: Seconds of caller audio sent to the fresh connection
            before it caught up with the live audio (from a little before the
            end of the last final result).
        replay_from_s: Where that replay started on the caller's timeline
            (seconds of caller audio since the call started).
    """

    replayed_audio_s: float = 0.0
    replay_from_s: float = 0.0


class ResilientSTT(ResilientProcessor[STTService], STTService):
    """An STT processor that survives provider connection failures without losing a word the caller says.

    Put it where the stock STT service would go::

        stt = ResilientSTT(lambda: DeepgramSTTService(api_key=KEY))
        stt = ResilientSTT(
            lambda: AssemblyAISTTService(api_key=KEY),
            retry=RetryPolicy(attempts=4, timeout=10.0),
        )

    Event handlers:
        on_connection_lost: ``(processor, failure: Failure)`` - a failure was detected.
        on_connection_recovered: ``(processor, report: STTRecoveryReport)`` - a
            fresh instance is connected and the audio not yet final was replayed.
        on_connection_given_up: ``(processor, error: ReplayFailed)`` - recovery
            is exhausted; ``error.lost`` says how much caller audio went
            untranscribed. Audio keeps flowing downstream.
        on_connected, on_disconnected, on_connection_error, and any other event
            of the stock service (AssemblyAI's ``on_end_of_turn``): forwarded
            from the live instance (``on_disconnected`` also when a failure is
            detected).

    Args:
        factory: Zero-argument callable returning a *new* stock STT service
            each time it is called. It is called twice at construction to check
            that; the second instance is kept for the first recovery, and a
            spare is built again (in a worker thread) after each recovery.
        retry: How hard to try for a fresh connection after a failure.
        stall_timeout: Seconds the provider may stay silent after the caller
            spoke (VAD said so) into it, or after a fresh connection that has
            said nothing yet was sent speech not final (a replay), before the
            connection counts as dead.
        finalize_timeout: Seconds the provider may take to finalize words it
            showed in an interim result, once asked to (at a VAD stop); and
            how long a VAD stop is held back for the speech before it when the
            connection owes nothing it gave evidence of.
        send_timeout: Seconds one send of audio may take.
        max_buffered_audio_s: Seconds of caller audio held at most while the
            provider has not finalized it; the oldest goes first, with a warning.
        replay_margin: Seconds before the end of the last finalized result a
            replay starts (so that no word is cut in half); the provider
            adapter's choice when None (Deepgram 0.2, AssemblyAI and Flux 0).
        stop_hold_timeout: Seconds a VAD stop is held back at most, waiting
            for the speech before it to be final (through a recovery too)
            before it passes on and the turn it ends may be committed without
            it. Default 5.0, the user aggregator's ``user_turn_stop_timeout``.
        **kwargs: Passed to ``FrameProcessor`` (``name=`` and so on).

    Raises:
        TypeError: ``factory`` is not callable or does not return an ``STTService``.
        ValueError: ``factory`` raised or returned the same object twice, or a
            timeout is not a positive number of seconds.
    """

    def __init__(
        self,
        factory: Callable[[], STTService],
        *,
        retry: RetryPolicy | None = None,
        stall_timeout: float = 2.0,
        finalize_timeout: float = 0.5,
        send_timeout: float = 2.0,
        max_buffered_audio_s: float = 30.0,
        replay_margin: float | None = None,
        stop_hold_timeout: float = 5.0,
        **kwargs: Any,
    ) -> None:
        """Create the processor and validate its configuration."""
        check_seconds(
            stall_timeout=stall_timeout,
            finalize_timeout=finalize_timeout,
            send_timeout=send_timeout,
            max_buffered_audio_s=max_buffered_audio_s,
            stop_hold_timeout=stop_hold_timeout,
        )
        if replay_margin is not None:
            if isinstance(replay_margin, bool) or not isinstance(replay_margin, int | float):
                raise ValueError(f"replay_margin must be a number of seconds or None, got {replay_margin!r}")
            if not 0 <= replay_margin < max_buffered_audio_s:
                raise ValueError(
                    f"replay_margin must be between 0 and max_buffered_audio_s, got {replay_margin}"
                )
        self._audio = AudioJournal(
            stall_timeout=stall_timeout,
            finalize_timeout=finalize_timeout,
            send_timeout=send_timeout,
            max_buffered_audio_s=max_buffered_audio_s,
            stop_hold_timeout=stop_hold_timeout,
        )
        self._replay_margin = replay_margin
        self._adapter: STTAdapter | None = None
        self._passthrough = True
        self._direct_audio = False
        self._sending: Entry | None = None
        self._muted = False
        self._assistant_turn: LLMContextAssistantTurnFrame | None = None
        self._condemned: Hosted[STTService] | None = None
        self._drop_warned_s: float | None = None
        # Instances the provider spoke to before they went live (AssemblyAI's Begin).
        self._heard_from: weakref.WeakSet[Hosted[STTService]] = weakref.WeakSet()
        # VAD stops held back: passed on in order, by one task at a time.
        self._stops_lock = asyncio.Lock()
        self._stops_changed = asyncio.Event()
        self._stops_task: asyncio.Task[None] | None = None
        super().__init__(
            factory,
            STTService,  # type: ignore[type-abstract]
            journal=self._audio,
            retry=retry,
            watchdog_tick=max(0.01, min(stall_timeout, finalize_timeout, send_timeout) / 10),
            **kwargs,
        )

    _settings_frame = STTUpdateSettingsFrame
    # The shell keeps its input queue: the hosted instance runs in direct mode
    # instead (see _prepare_instance), so a frame still crosses one queue.
    _direct_mode = False
    # A stock STT service can take tens of ms to build (the Deepgram SDK loads
    # the CA bundle): one is built ahead of time for the next recovery.
    _spare_instance = True

    async def cleanup(self) -> None:
        """Tear down every service instance (and stop watching held VAD stops)."""
        await super().cleanup()
        task, self._stops_task = self._stops_task, None
        if task is not None:
            await self.cancel_task(task)

    # ------------------------------------------------------------------
    # Public state
    # ------------------------------------------------------------------

    @property
    def journal(self) -> AudioJournal:
        """The journal of caller audio not yet final (read-only use)."""
        return self._audio

    @property
    def adapter(self) -> str:
        """The provider adapter in use (``"deepgram"``, ``"assemblyai"``, ``"deepgram-flux"``, ...)."""
        assert self._adapter is not None
        return self._adapter.name

    # ------------------------------------------------------------------
    # Standing in for the stock service (see the module docstring)
    # ------------------------------------------------------------------

    @property
    def settings(self) -> ServiceSettings:
        """The live instance's settings (the newest instance's while recovering)."""
        return self._reference.settings

    @property
    def sample_rate(self) -> int:
        """The input sample rate of the hosted service (0 before the pipeline starts, as the stock)."""
        return self._reference.sample_rate

    @property
    def is_muted(self) -> bool:
        """Whether an ``STTMuteFrame`` muted transcription (kept across instances)."""
        return self._muted

    @property
    def supports_ttfs(self) -> bool:
        """Whether the hosted service has a speech-end to final-transcript latency."""
        return self._reference.supports_ttfs

    def language_to_service_language(self, language: Language) -> str | None:
        """Convert a language to the hosted service's format."""
        return self._reference.language_to_service_language(language)

    def service_metadata_frame(self) -> Any:
        """The hosted service's metadata frame (named after this processor)."""
        return self._reference.service_metadata_frame()

    async def set_model(self, model: str) -> None:
        """Change the model, as a settings update (deprecated in Pipecat: use ``STTUpdateSettingsFrame``)."""
        settings: Any = type(self._reference.settings)
        await self.queue_frame(STTUpdateSettingsFrame(delta=settings(model=model)))

    async def set_language(self, language: Language) -> None:
        """Change the language, as a settings update (deprecated in Pipecat: ``STTUpdateSettingsFrame``)."""
        settings: Any = type(self._reference.settings)
        await self.queue_frame(STTUpdateSettingsFrame(delta=settings(language=language)))

    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame | None, None]:
        """Not on the wrapper: send ``InputAudioRawFrame`` frames so the audio is journaled."""
        raise TypeError(_internal("run_stt"))
        yield  # pragma: no cover

    # ------------------------------------------------------------------
    # Frames in
    # ------------------------------------------------------------------

    async def _route(self, frame: Frame, direction: FrameDirection) -> None:
        """Journal each frame for the live instance, in order, and pass the caller's frames on."""
        journal = self._audio
        if journal.state is State.FAILED:
            await self._while_failed(frame, direction)
        elif isinstance(frame, InputAudioRawFrame) and direction is FrameDirection.DOWNSTREAM:
            journal.audio_accepted(frame, self._seconds(frame))
            await self._feed_pending(wait=False)
            if self._passthrough:
                await self.push_frame(frame, direction)
            if journal.dropped:
                self._report_dropped()
        elif isinstance(frame, (VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame)):
            await self._vad(frame, direction)
        elif isinstance(frame, STTMuteFrame):
            # Consumed here, as the stock service does; kept for fresh instances.
            self._muted = frame.mute
            journal.mute_accepted(frame, mute=frame.mute, direction=direction)
            await self._feed_pending(wait=False)
        elif self._live is None and (isinstance(frame, SystemFrame) or direction is FrameDirection.UPSTREAM):
            # Nothing can take it while recovering, and it cannot wait.
            self._remember(frame)
            await self.push_frame(frame, direction)
        else:
            self._remember(frame)
            journal.frame_accepted(frame, direction=direction)
            await self._feed_pending(wait=False)

    async def _vad(self, frame: Frame, direction: FrameDirection) -> None:
        """A VAD start goes on at once; a stop once the speech before it is final (see the module)."""
        journal = self._audio
        speaking = isinstance(frame, VADUserStartedSpeakingFrame)
        if speaking:
            # Stops held back go first, so nothing ends the new speech: the
            # caller went on speaking, and the turn goes on.
            async with self._stops_lock:
                for stop in journal.pending_stops():
                    stop.passed = True
                    await self._push_stop(stop)
                journal.vad_accepted(frame, speaking=True, direction=direction)
                await self.push_frame(frame, direction)
        else:
            journal.vad_accepted(
                frame,
                speaking=False,
                direction=direction,
                stop_secs=float(getattr(frame, "stop_secs", 0.0) or 0.0),
                now=now(),
            )
            self._watch_stops()
        await self._feed_pending(wait=False)

    async def _while_failed(self, frame: Frame, direction: FrameDirection) -> None:
        """Recovery gave up: the caller's audio and everything else still flow, untranscribed."""
        if isinstance(frame, InputAudioRawFrame):
            if self._passthrough:
                await self.push_frame(frame, direction)
        elif isinstance(frame, STTMuteFrame):
            self._muted = frame.mute
        elif self._is_own_settings(frame):
            assert isinstance(frame, STTUpdateSettingsFrame)
            self._applied_settings.append(frame)  # for the instance a revival connects
        else:
            self._remember(frame)
            await self.push_frame(frame, direction)

    def _remember(self, frame: Frame) -> None:
        if isinstance(frame, LLMContextAssistantTurnFrame):
            # A fresh instance gets the agent's last reply as the stock one
            # had it (AssemblyAI's context carryover).
            self._assistant_turn = frame

    def _seconds(self, frame: InputAudioRawFrame) -> float:
        rate = frame.sample_rate or self._reference.sample_rate
        width = 2 * max(1, frame.num_channels or 1)
        return len(frame.audio) / (rate * width) if rate else 0.0

    def _report_dropped(self) -> None:
        dropped, speech = self._audio.take_dropped()
        total = (self._drop_warned_s or 0.0) + dropped
        if self._drop_warned_s is None or total >= _DROP_WARNING_EVERY_S:
            logger.warning(
                f"{self}: the provider has not finalized over {self._audio.max_buffered_audio_s:g}s of "
                f"caller audio; dropped the oldest {dropped:.1f}s ({speech:.1f}s of it possibly speech), "
                "which a recovery could no longer replay"
            )
            total = 0.0
        self._drop_warned_s = total

    # ------------------------------------------------------------------
    # Feeding the live instance
    # ------------------------------------------------------------------

    async def _feed_pending(self, wait: bool = True) -> tuple[int, int]:
        """Feed the live instance whatever the journal says is next, in order.

        Args:
            wait: Wait for a feed in progress to finish; otherwise return at
                once (the feed in progress takes what was just journaled).

        Returns:
            ``(1, 0)`` if a replay was fed, else ``(0, 0)`` (units, characters).
        """
        lock = self._feed_lock
        if not wait and lock.locked():
            return 0, 0
        journal = self._audio
        async with lock:
            while True:
                live = self._live
                if live is None or live is self._condemned or journal.state is not State.LIVE:
                    break
                entries = journal.to_feed()
                if not entries:
                    break
                for entry in entries:
                    if self._live is not live:
                        break  # lost meanwhile: the rest is replayed into the next one
                    await self._feed(live, entry)
        return (1 if journal.replayed_s else 0), 0

    async def _feed(self, hosted: Hosted[STTService], entry: Entry) -> None:
        service = hosted.service
        if entry.kind is EntryKind.AUDIO:
            frame = entry.frame
            assert isinstance(frame, InputAudioRawFrame)
            self._sending = entry
            try:
                # Processed inline (direct mode): when this returns, the send
                # is over (or failed).
                if self._direct_audio:
                    await self._process_audio(service, frame)
                else:
                    await service.queue_frame(frame)
            finally:
                self._sending = None
                self._audio.send_finished()
        elif entry.kind is EntryKind.CUE:
            frame = entry.frame
            assert isinstance(frame, Frame)
            await service.queue_frame(frame, _direction(entry))
            if not entry.passed:
                self._audio.stop_taken(entry, now=now())
                await self._pass_stops()
        else:
            frame = entry.frame
            assert isinstance(frame, Frame)
            if isinstance(frame, EndFrame):
                # Not marked fed: an instance lost before it passed the EndFrame
                # on did not finalize the audio before it, so the fresh one gets
                # both in the replay (and it is passed on if recovery gives up).
                # The stock service closes its connection at once: first the
                # speech before the held VAD stops is finalized (or given up on).
                journal = self._audio
                while journal.pending_stops() and self._live is hosted and journal.state is State.LIVE:
                    await self._pass_stops_now()
                    await asyncio.sleep(self._watchdog_tick)
                if self._live is not hosted:
                    return  # lost meanwhile: the fresh instance gets it in the replay
                await self._pass_stops(every=True)
                hosted.stopping = True
                await service.queue_frame(frame, _direction(entry))
                return
            entry.fed = True
            if self._is_own_settings(frame):
                assert isinstance(frame, STTUpdateSettingsFrame)
                # Applied in order with the audio; a service that reconnects
                # for it opens a new stream, into which the journal replays.
                await self._apply_settings(hosted, frame)
                return
            await service.queue_frame(frame, _direction(entry))
        entry.fed = True

    # ------------------------------------------------------------------
    # VAD stops held back for the speech before them
    # ------------------------------------------------------------------

    async def _pass_stops(self, *, every: bool = False) -> None:
        """Pass on the VAD stops the journal lets go now (``every``: all of them); watch the rest."""
        await self._pass_stops_now(every=every)
        if self._audio.pending_stops():
            self._watch_stops()

    async def _pass_stops_now(self, *, every: bool = False) -> None:
        """Pass on the VAD stops the journal lets go now (``every``: all of them), in order."""
        journal = self._audio
        async with self._stops_lock:
            if every:
                stops = journal.pending_stops()
                for stop in stops:
                    stop.passed = True
            else:
                stops = journal.stops_to_pass(now=now())
            for stop in stops:
                await self._push_stop(stop)

    async def _push_stop(self, stop: Entry) -> None:
        frame = stop.frame
        assert isinstance(frame, Frame)
        await self.push_frame(frame, _direction(stop))

    def _watch_stops(self) -> None:
        """Look at the held stops again now (a final, an acknowledgement, a message may free them)."""
        self._stops_changed.set()
        if self._stops_task is None and not self._ended:
            self._stops_task = self.create_task(self._stops_watcher(), name="stops")

    async def _stops_watcher(self) -> None:
        """Pass on held stops as the evidence or their time frees them; ends when none is held."""
        journal = self._audio
        try:
            while journal.pending_stops():
                self._stops_changed.clear()
                await self._pass_stops_now()
                if not journal.pending_stops():
                    break
                deadline = journal.stop_deadline()
                timeout = None if deadline is None else max(0.0, deadline - now()) + self._watchdog_tick / 10
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stops_changed.wait(), timeout)
        finally:
            self._stops_task = None

    @staticmethod
    async def _process_audio(service: STTService, frame: InputAudioRawFrame) -> None:
        """What the instance's ``process_frame`` does with caller audio, minus the layers around it.

        For services whose ``process_frame`` does nothing else with audio (the
        adapter says so), this saves four nested calls and two event
        dispatches per 20 ms frame.
        """
        try:
            await service.process_audio_frame(frame, FrameDirection.DOWNSTREAM)
        except Exception as exc:
            # As FrameProcessor does for any frame it processes.
            await service.push_error(
                error_msg=f"Error processing frame: {exc}", exception=exc, category=ErrorCategory.UNKNOWN
            )

    async def _preconfigure(self, hosted: Hosted[STTService]) -> list[Any]:
        """Apply the settings to a fresh instance before it connects, without any reconnect of its own."""
        service: Any = hosted.service

        async def nothing() -> None:
            """No connection to make again yet."""

        # The stock STT services reconnect on a settings change through this
        # (deferred while the user speaks); a fresh instance connects once.
        service._request_reconnect = nothing
        try:
            return await super()._preconfigure(hosted)
        finally:
            del service._request_reconnect

    async def _connected(self, hosted: Hosted[STTService]) -> Failure | None:
        """Give a fresh instance the agent's last reply, as the stock one had it."""
        turn = self._assistant_turn
        if turn is not None:
            copy = LLMContextAssistantTurnFrame(text=turn.text, timestamp=turn.timestamp)
            await hosted.service.queue_frame(copy, FrameDirection.UPSTREAM)
        return None

    # ------------------------------------------------------------------
    # Hooks into each instance
    # ------------------------------------------------------------------

    def _prepare_instance(self, hosted: Hosted[STTService]) -> None:
        """Hook into a new instance before it is set up."""
        service: Any = hosted.service
        if self._adapter is None:
            self._adapter = adapter_for(service)
            self._passthrough = bool(getattr(service, "_audio_passthrough", True))
            margin = self._replay_margin
            self._audio.replay_margin_s = self._adapter.replay_margin_s if margin is None else margin
            self._audio.observes_messages = self._adapter.observes_messages
            self._audio.covers_audio = self._adapter.covers_audio
            self._direct_audio = self._adapter.takes_audio_directly(service)
        # Frames are fed in order by this processor's own tasks, each processed
        # inline: no second queue and task hop per audio frame, and nothing fed
        # while the instance reconnects on its own for new settings.
        service._enable_direct_mode = True
        # This processor passes the caller's audio on itself (see the module
        # docstring).
        service._audio_passthrough = False
        self._adapter.install(hosted, self)
        self._hook_sends(hosted)
        self._hook_finalize(hosted)
        self._hook_errors(hosted)

    def _hook_sends(self, hosted: Hosted[STTService]) -> None:
        """Record each chunk of audio the instance sends (and any silence of its own)."""
        service: Any = hosted.service
        journal = self._audio
        run_stt = service.run_stt

        def run_stt_observed(audio: bytes) -> AsyncGenerator[Frame | None, None]:
            # A plain function returning the stock generator: no second
            # generator per audio frame. The send is over when the instance
            # has processed the frame (see _feed).
            if hosted is self._live:
                entry = self._sending
                if entry is not None and getattr(entry.frame, "audio", None) is audio:
                    journal.audio_sent(entry, now=now())
                else:
                    rate = service.sample_rate
                    journal.silence_sent(len(audio) / (2 * rate) if rate else 0.0)
            generator: AsyncGenerator[Frame | None, None] = run_stt(audio)
            return generator

        service.run_stt = run_stt_observed
        send_keepalive = getattr(service, "_send_keepalive", None)
        if send_keepalive is not None:

            async def send_keepalive_observed(silence: bytes) -> None:
                await send_keepalive(silence)
                rate = service.sample_rate
                if hosted is self._live and rate:
                    journal.silence_sent(len(silence) / (2 * rate))

            service._send_keepalive = send_keepalive_observed

    def _hook_finalize(self, hosted: Hosted[STTService]) -> None:
        """Record finalize requests and their acknowledgements (Pipecat's own bookkeeping calls)."""
        service: Any = hosted.service
        journal = self._audio
        request, confirm = service.request_finalize, service.confirm_finalize
        adapter = self._adapter
        assert adapter is not None

        def request_observed() -> None:
            request()
            if self._speaks(hosted):
                journal.finalize_requested(now=now(), held_back_s=adapter.held_back_s(service))

        def confirm_observed() -> None:
            pending = bool(getattr(service, "_finalize_requested", False))
            confirm()
            # Not from a connection already given up on (a provider error
            # message, say): its transcripts are dropped, so its
            # acknowledgement finalizes nothing.
            if pending and self._speaks(hosted):
                journal.finalize_confirmed()
                self._evidence()

        service.request_finalize = request_observed
        service.confirm_finalize = confirm_observed

    # What the adapter reports (pipecat_resilient._stt_adapters.Shell).

    def _speaks(self, hosted: Hosted[STTService]) -> bool:
        return hosted is self._live and hosted is not self._condemned

    def provider_message(self, hosted: Hosted[Any]) -> None:
        """A message arrived from the provider on ``hosted``'s connection."""
        if self._speaks(hosted):
            self._audio.message_received(now=now())
            self._evidence()
            if not hosted.produced:
                self._progress(hosted)
        elif hosted.state is HostedState.CONNECTING:
            self._heard_from.add(hosted)  # it is alive: counted once it goes live

    def _evidence(self) -> None:
        """The provider said something that may free a held VAD stop."""
        if self._stops_task is not None:
            self._stops_changed.set()

    def transcript(
        self, hosted: Hosted[Any], words: Sequence[tuple[float, float]], *, end: float | None, final: bool
    ) -> int:
        """A transcript result: how many leading words repeat what an earlier connection finalized."""
        if not self._speaks(hosted):
            return 0
        repeats = self._audio.result_received(words, end=end, final=final)
        self._evidence()
        return repeats

    def speech_started(self, hosted: Hosted[Any], at: float) -> bool:
        """The provider detected speech: whether it is news (not in replayed, final audio)."""
        if hosted.state is HostedState.CONNECTING:
            return True
        return self._speaks(hosted) and self._audio.speech_reported(at)

    def stream_opened(self, hosted: Hosted[Any]) -> None:
        """The live instance opened a connection itself (new settings): replay into it."""
        if self._speaks(hosted) and self._audio.state is State.LIVE:
            self._audio.stream_started()

    def failed(self, hosted: Hosted[Any], failure: Failure) -> None:
        """``hosted``'s connection failed: stop listening to it now, recover in a moment."""
        if hosted.state is HostedState.CONNECTING:
            hosted.failures.append(failure)
        elif self._speaks(hosted) and not hosted.stopping and not self._ended:
            # Nothing more from it counts, from now on; the recovery itself
            # starts in its own task (this may be the instance's receive loop,
            # which its teardown cancels).
            self._condemned = hosted
            self.create_task(self._lost(hosted, failure), name="lost")

    # ------------------------------------------------------------------
    # Frames out of the hosted instance
    # ------------------------------------------------------------------

    async def _deliver(self, hosted: Hosted[STTService], frame: Frame) -> None:
        """Pass a frame of the live instance on (not the caller's frames: this processor passed them)."""
        if isinstance(frame, _PASSED_BY_SHELL) or hosted is self._condemned:
            return
        await self.push_frame(frame)

    async def _on_instance_upstream(self, hosted: Hosted[STTService], frame: Frame) -> None:
        if isinstance(frame, _PASSED_BY_SHELL):
            return
        await super()._on_instance_upstream(hosted, frame)

    # ------------------------------------------------------------------
    # Recovery
    # ------------------------------------------------------------------

    async def _before_retire(self, hosted: Hosted[STTService]) -> None:
        assert self._adapter is not None
        self._adapter.abort(hosted.service)

    def _restore_journal(self, hosted: Hosted[STTService]) -> None:
        self._audio.connection_restored(now=now())
        if hosted in self._heard_from:
            # The provider spoke on it while it connected: not a half-open socket.
            self._audio.message_received(now=now())

    async def _after_restore(self, hosted: Hosted[STTService]) -> None:
        # The spare went into this recovery: build the next one, off the
        # recovery's path (in a worker thread).
        self.create_task(self._host.replenish(), name="spare")

    def _recovery_report(
        self, failure: Failure | None, attempts: int, downtime: float, units: int, chars: int
    ) -> RecoveryReport:
        journal = self._audio
        return STTRecoveryReport(
            failure, attempts, downtime, units, chars, journal.replayed_s, journal.replay_from
        )

    def _replay_summary(self, report: RecoveryReport) -> str:
        return f"{self._audio.replayed_s:.2f}s of caller audio"

    async def _abandon(self, reason: str, episode: Episode) -> Abandoned:
        lost = self._audio.gave_up()
        passing: list[Frame] = []
        for frame, direction in lost.frames:
            assert isinstance(frame, Frame)
            if direction is FrameDirection.UPSTREAM:
                await self.push_frame(frame, FrameDirection.UPSTREAM)
            else:
                passing.append(frame)
        return Abandoned(
            passing=tuple(passing),
            lost=f"{lost.audio_s:.1f}s of caller audio not transcribed ({lost.speech_s:.1f}s of it speech)",
        )


def _direction(entry: Entry) -> FrameDirection:
    direction = entry.direction
    return direction if isinstance(direction, FrameDirection) else FrameDirection.DOWNSTREAM


def _internal(name: str) -> str:
    return (
        f"ResilientSTT.{name} is part of the machinery a stock STT service runs on itself; the wrapper "
        "hosts its instance's and does not stand in for it (send frames instead)"
    )


def _refuse(name: str) -> Any:
    """A member of ``STTService`` that only makes sense inside the hosted instance."""

    def refused(self: ResilientSTT, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(_internal(name))

    refused.__name__ = name
    refused.__doc__ = "Not on the wrapper: internal to the hosted instance (raises TypeError)."
    return refused


# The machinery an STT service runs on itself: audio it processes, finalize
# bookkeeping around its provider's acknowledgements, usage it reports. On the
# wrapper it would act on nothing, so it says so instead.
for _name in ("confirm_finalize", "emit_stt_usage_metrics", "process_audio_frame", "request_finalize"):
    setattr(ResilientSTT, _name, _refuse(_name))
del _name
