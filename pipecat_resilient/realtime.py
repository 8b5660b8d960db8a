"""ResilientLLM for speech-to-speech (Gemini Live, OpenAI Realtime): a session that survives its socket.

Built by :class:`~pipecat_resilient.llm.ResilientLLM` when its factory makes a
``GeminiLiveLLMService`` or an ``OpenAIRealtimeLLMService``. One shell serves
both; what differs between the providers (how a session fails, resumes, is
seeded, is asked to answer) lives in a provider adapter:
:mod:`pipecat_resilient._gemini` and :mod:`pipecat_resilient._openai_realtime`.
It takes recovery over from the stock service and, when the session drops
(1007, 1011, 1006, an abort, an ``error`` event, a stall) or ends (GoAway, the
session's age):

* closes a reply the drop cut short, downstream (``TTSStoppedFrame``,
  ``LLMFullResponseEndFrame``), so aggregators and the transport see a
  finished turn and an ``EndFrame`` never waits on it;
* buffers user input (audio - bounded -, text, context updates) that arrives
  while no session can take it, and delivers it to the fresh session; the
  user's spoken turn that a lost session never answered (nor transcribed) is
  given to the fresh session again;
* passes a reply's transcription to the context only once the audio it
  transcribes went downstream (a transcription that runs ahead of its audio
  waits for it), so the context never holds a word nobody heard;
* resumes the session with the latest resumable handle (Gemini Live), giving
  it again the turns that handle does not cover; or seeds a fresh one with the
  conversation as heard (what the user said and what the user heard of the
  assistant);
* has the model go on with a cut reply: it is given what the user heard of
  that reply as the model's *own* partial turn - never as a user message - and
  the continuation is checked before it is heard
  (:class:`~pipecat_resilient.splice.Splice`): its audio is held until its
  transcription shows whether it repeats what the user heard, the repeated
  words' audio is dropped, and the rest plays. Whether the model continues,
  restarts or repeats a phrase, no word is heard twice or lost;
* treats silence as a failure: a reply whose transcription comes with no
  audio is asked again on the same session (then on a fresh one), a user turn
  with no reply within ``first_token_timeout`` and a reply that goes quiet for
  ``stall_timeout`` move to a fresh session;
* delivers each tool result exactly once, with its call id (and, for Gemini
  Live, under its function's name), even when the function finished after its
  session died, and never runs a function twice because the model repeated a
  call after a reconnect;
* moves to a fresh (resumed) session at a turn boundary, with no audible gap,
  on GoAway and once a session is ``ReplayPolicy.max_session_s`` old (OpenAI
  Realtime ends sessions at 60 minutes);
* with fallbacks (other sessions of the same provider: another key, region or
  model), goes on with a cut reply on the next one when the one in use is
  down, seeded with the conversation as heard (a resumption handle is only
  offered to the provider that issued it); and with
  ``switch_back="boundary"`` moves back to a preferred one that is healthy
  again at a turn boundary: the probe is the handshake and the session's
  setup, nothing billed, and the conversation goes to the probed session as
  it takes over, as in a handover;
* gives up with one ``ErrorFrame`` when the same failure (a 1007 on the same
  input, say) comes back before any progress: that is poison input.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import numpy as np
from loguru import logger
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    FunctionCallResultFrame,
    InputAudioRawFrame,
    InputImageRawFrame,
    InputTextRawFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMMessagesAppendFrame,
    LLMTextFrame,
    LLMUpdateSettingsFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.llm_service import LLMService
from pipecat.utils.text.base_text_aggregator import TextType

from pipecat_resilient._gemini import GeminiLive
from pipecat_resilient._hosting import Episode, Hosted, HostedState, now
from pipecat_resilient._openai_realtime import OpenAIRealtime
from pipecat_resilient._resilient import Abandoned, Journal
from pipecat_resilient.failures import Failure, Verdict
from pipecat_resilient.ledger import State
from pipecat_resilient.llm import ResilientLLM
from pipecat_resilient.session import Cut, SessionAction, SessionActionKind, SessionJournal
from pipecat_resilient.splice import Held, Splice

__all__ = ["ResilientRealtimeLLM"]

# User input: what a dead session would silently drop.
_INPUT = (
    InputAudioRawFrame,
    InputTextRawFrame,
    InputImageRawFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    LLMMessagesAppendFrame,
    LLMContextFrame,
)
# What a spoken reply is made of downstream (the rest of an instance's output
# passes as it comes: function call frames, metrics...).
_REPLY = (
    TTSStartedFrame,
    LLMFullResponseStartFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
    LLMTextFrame,
    TTSStoppedFrame,
    LLMFullResponseEndFrame,
)
# Longest a failed session is kept alive so that a function it was running can
# finish and hand its result over.
TOOL_WAIT_S = 60.0
# How often a handover checks for a turn boundary.
BOUNDARY_POLL_S = 0.02
# How often readiness is checked while a fresh session connects.
READY_POLL_S = 0.005
# Speech into the session this recently (with no reply begun since) means the
# user may be speaking: the conversation does not move to another provider.
SPEECH_PAUSE_S = 1.0
# Longest a probed provider's session waits for a turn boundary to take over at.
SWITCH_WAIT_S = 30.0


class SessionAdapter(Protocol):
    """What the shell needs of a provider (see :mod:`pipecat_resilient._gemini`)."""

    name: str
    resumes: bool

    def check(self, service: object) -> None: ...
    def hook(self, service: Any, *, failed: Any, ready: Any, message: Any) -> None: ...
    def is_ready(self, service: Any) -> bool: ...
    def speaks(self, service: Any) -> bool: ...
    def resumable_handle(self, service: Any) -> str | None: ...
    def issued_handle(self, message: Any) -> bool: ...
    def goes_away(self, message: Any) -> bool: ...
    def resume_with(self, service: Any, handle: str) -> None: ...
    def add_instruction(self, service: Any, text: str) -> None: ...
    async def seed(self, service: Any, context: Any, *, answer: bool) -> None: ...
    async def adopt(self, service: Any, context: Any) -> None: ...
    async def send_turns(self, service: Any, messages: list[dict[str, Any]], *, answer: bool) -> None: ...
    async def ask_again(self, service: Any, heard: str) -> bool: ...
    def name_tool_calls(self, service: Any, names: dict[str, str]) -> None: ...
    def function_calls_running(self, service: Any) -> bool: ...


def adapter_for(service: object) -> SessionAdapter | None:
    """The provider adapter for a stock speech-to-speech service, told by class name (no import)."""
    for cls in type(service).__mro__:
        if cls.__name__ == "GeminiLiveLLMService" and cls.__module__.startswith("pipecat.services.google"):
            return GeminiLive()
        if cls.__name__ == "OpenAIRealtimeLLMService" and cls.__module__.startswith(
            "pipecat.services.openai"
        ):
            return OpenAIRealtime()
    return None


class ResilientRealtimeLLM(ResilientLLM):
    """ResilientLLM for speech-to-speech sessions. Built by ResilientLLM; do not instantiate directly.

    Its arguments are ResilientLLM's: ``first_token_timeout`` is how long the
    model may take to start answering a finished user turn (and a spoken reply
    to bring its first audio), ``stall_timeout`` how long a reply in progress
    may go without output, and ``replay``'s ``answer_again``,
    ``max_buffered_input_s``, ``continuation_hold_s``, ``max_session_s`` and
    ``session_instruction`` apply.
    """

    def __init__(self, factory: Any, **kwargs: Any) -> None:
        """Create the processor (see :class:`~pipecat_resilient.llm.ResilientLLM`)."""
        self._provider: SessionAdapter = GeminiLive()  # replaced by the factory's provider's
        self._handle: str | None = None
        # The provider of the chain that issued the handle: a handle is good
        # for its own provider only (another key, region or model refuses it).
        self._handle_from: int | None = None
        self._resume_refused = False
        # When the user last spoke into the live session (speech in the
        # audio), and when a reply last began: a switch waits for a pause.
        self._speech_at: float | None = None
        self._reply_at: float | None = None
        self._context: LLMContext | None = None
        self._tool_names: dict[str, str] = {}
        self._cut_closed = False
        self._user_speaking = False
        self._owed_on_feed = False
        self._rotating = False
        # The reply in progress, downstream: its frames held until its first
        # audio (a reply with transcription and no audio is not heard), and
        # what of it was shown.
        self._held: list[Frame] = []
        self._speaks = True
        self._sounded = False
        self._transcribed = False
        self._shown_tts = False
        self._shown_response = False
        self._silent_in_a_row = 0
        # A continuation being checked against what was heard.
        self._continuing: Cut | None = None
        self._splice: Splice | None = None
        self._splice_timer: asyncio.Task[None] | None = None
        self._known: set[int] = set()  # text frames already counted as heard
        # Frames of a fresh session that came before it went live.
        self._early: dict[int, list[Frame]] = {}
        # What a fresh session was seeded with, until it goes live.
        self._seeds: dict[int, list[dict[str, Any]]] = {}
        self._age_task: asyncio.Task[None] | None = None
        super().__init__(factory, **kwargs)

    def _new_journal(self, first_token_timeout: float, stall_timeout: float) -> Journal:
        self._session = SessionJournal(
            first_response_timeout=first_token_timeout,
            stall_timeout=stall_timeout,
            max_buffered_audio_s=self._replay.max_buffered_input_s,
        )
        return self._session

    @property
    def journal(self) -> SessionJournal:  # type: ignore[override]
        """The session journal (read-only use)."""
        return self._session

    async def cleanup(self) -> None:
        """Tear down every service instance (and stop watching the session's age)."""
        for task in (self._age_task, self._splice_timer):
            if task is not None:
                await self.cancel_task(task)
        self._age_task = self._splice_timer = None
        await super().cleanup()

    # ------------------------------------------------------------------
    # Frames in
    # ------------------------------------------------------------------

    async def _route(self, frame: Frame, direction: FrameDirection) -> None:
        """Feed input to the live session, or buffer it while recovering."""
        if isinstance(frame, UserStartedSpeakingFrame):
            self._user_speaking = True
            self._session.user_started_speaking()
        elif isinstance(frame, UserStoppedSpeakingFrame):
            self._user_speaking = False
        if isinstance(frame, LLMContextFrame):
            if self._context is None:
                # The stock service seeds its session with the first context.
                self._session.said(*_messages(frame.context))
            self._context = frame.context
            if _last_role(frame.context) == "user":
                self._owed_on_feed = True
        if isinstance(frame, InterruptionFrame) and direction is FrameDirection.DOWNSTREAM:
            self._session.interrupted()
            self._continuing = None
        if self._is_own_settings(frame):
            assert isinstance(frame, LLMUpdateSettingsFrame)
            live = self._live
            if live is not None and live.state is HostedState.LIVE:
                await self._apply_settings(live, frame)
            else:
                # The fresh session is configured with it before it goes live.
                self._applied_settings.append(frame)
            return
        failed = self.state is State.FAILED
        if isinstance(frame, (*_INPUT, EndFrame)) and not failed:
            seconds = _seconds(frame)
            owed = isinstance(frame, InputTextRawFrame) or self._owed_on_feed
            self._owed_on_feed = False
            if self._session.input_accepted((frame, direction), seconds=seconds, speech=_speech(frame)):
                if owed or isinstance(frame, UserStoppedSpeakingFrame):
                    self._session.reply_owed(now=now(), spoken=not owed)
                await self._feed_input(frame, direction)
            return
        if failed and isinstance(frame, _INPUT):
            logger.warning(f"{self}: recovery gave up; dropping {type(frame).__name__}")
            return
        await self._pass(frame, direction)

    async def _feed_input(self, frame: Frame, direction: FrameDirection) -> None:
        live = self._live
        if live is None or live.state is not HostedState.LIVE:
            # Lost between the check and now: keep it for the fresh session.
            self._session.input_accepted((frame, direction), seconds=_seconds(frame), speech=_speech(frame))
            return
        self._taken_in(frame)
        if isinstance(frame, EndFrame):
            live.stopping = True
        await live.service.queue_frame(frame, direction)

    def _taken_in(self, frame: Frame) -> None:
        """A frame goes to the live session: what it says, the session now holds."""
        if isinstance(frame, (InputAudioRawFrame, UserStartedSpeakingFrame, UserStoppedSpeakingFrame)):
            speech = _speech(frame)
            if speech:
                self._speech_at = now()
            self._session.input_fed(
                (frame, FrameDirection.DOWNSTREAM), seconds=_seconds(frame), speech=speech
            )
        elif isinstance(frame, InputTextRawFrame) and frame.text.strip():
            self._session.said({"role": "user", "content": frame.text})
        elif isinstance(frame, LLMMessagesAppendFrame):
            self._session.said(*[dict(m) for m in frame.messages if isinstance(m, dict)])

    # ------------------------------------------------------------------
    # The hosted instances
    # ------------------------------------------------------------------

    def _prepare_instance(self, hosted: Hosted[LLMService]) -> None:
        service = hosted.service
        adapter = adapter_for(service)
        if adapter is None:
            raise TypeError(f"{type(service).__name__} is not a speech-to-speech service this shell supports")
        adapter.check(service)
        self._provider = adapter
        self._hook_errors(hosted)
        adapter.hook(
            service,
            failed=partial(self._session_failed, hosted),
            ready=partial(self._session_ready, hosted),
            message=partial(self._server_message, hosted),
        )
        run_function_calls = service.run_function_calls

        async def run_once(function_calls: Any) -> None:
            # The model may call again, after a reconnect, what already ran.
            fresh = [call for call in function_calls if call.tool_call_id not in self._tool_names]
            repeated = len(function_calls) - len(fresh)
            if repeated:
                logger.debug(f"{self}: not running {repeated} function call(s) again")
            for call in fresh:
                self._tool_names[call.tool_call_id] = call.function_name
                if hosted is self._live:
                    self._session.tool_started(call.tool_call_id)
            if fresh:
                await run_function_calls(fresh)

        service.run_function_calls = run_once  # type: ignore[method-assign]

    def _instance_live(self, hosted: Hosted[LLMService]) -> None:
        if self._replay.max_session_s is not None and self._age_task is None:
            self._age_task = self.create_task(self._watch_age(self._replay.max_session_s), name="session-age")

    async def _session_failed(self, hosted: Hosted[LLMService], failure: Failure) -> None:
        if hosted.state is HostedState.CONNECTING:
            hosted.failures.append(failure)
            hosted.ready.set()
        elif hosted is self._live and not self._ended:
            await self._lost(hosted, failure)

    async def _session_ready(self, hosted: Hosted[LLMService]) -> None:
        hosted.ready.set()

    async def _server_message(self, hosted: Hosted[LLMService], message: Any) -> None:
        if hosted is not self._live:
            return
        if self._provider.issued_handle(message):
            handle = self._provider.resumable_handle(hosted.service)
            if handle is not None:
                self._handle = handle
                self._handle_from = hosted.provider
                self._resume_refused = False
                self._session.handle_issued()
        if self._provider.goes_away(message) and not self._rotating:
            self._rotating = True
            self.create_task(
                self._hand_over(hosted, "the server announced the end of the session"), name="go-away"
            )

    async def _on_instance_upstream(self, hosted: Hosted[LLMService], frame: Frame) -> None:
        if hosted is self._live and isinstance(frame, TranscriptionFrame) and frame.text.strip():
            # What the user said, as the session heard it.
            self._session.user_transcribed(frame.text)
        await super()._on_instance_upstream(hosted, frame)

    def _before_connect(self, hosted: Hosted[LLMService]) -> None:
        super()._before_connect(hosted)  # the next instance of its provider is built (once this one is up)
        if self._probing():
            return  # a probe: the handshake and the setup, nothing else
        adapter = self._provider
        hosted.resumes = (
            adapter.resumes
            and self._handle is not None
            and self._handle_from == hosted.provider
            and not self._resume_refused
        )
        if hosted.resumes:
            assert self._handle is not None
            adapter.resume_with(hosted.service, self._handle)
        else:
            cut = self._session.cut
            instruction = self._replay.session_instruction
            if instruction and cut is not None and cut.heard.strip() and self._answer_again():
                # The partial turn is the model's own; what to do with it is
                # said where instructions belong.
                adapter.add_instruction(hosted.service, instruction)

    async def _build_spare(self, hosted: Hosted[LLMService]) -> None:
        """Build the next instance of ``hosted``'s provider once ``hosted`` connected (or failed to).

        In its worker thread, a stock service's constructor still holds the
        GIL for tens of milliseconds (google-genai loading a CA bundle): built
        while ``hosted`` connects, it slowed the handshake and the seed, on
        the event loop, by as much (a recovery's dead air). It is built while
        the fresh session thinks about its first audio instead.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._retry.attempt_timeout):
                # Live (and seeded), retired, or failing. (A probe stays
                # connecting until it takes over: no other instance of its
                # provider is made meanwhile.)
                while hosted.state is HostedState.CONNECTING and not hosted.failures:
                    await asyncio.sleep(READY_POLL_S)
        await super()._build_spare(hosted)

    def _probing(self) -> bool:
        """Whether the instance being connected is a probe (a planned switch's): set up, never seeded."""
        switching = self._switching
        return switching is not None and asyncio.current_task() is switching

    async def _connected(self, hosted: Hosted[LLMService]) -> Failure | None:
        service = hosted.service
        adapter = self._provider
        adapter.name_tool_calls(service, self._tool_names)
        failure = await self._until(
            hosted, hosted.ready.is_set, "the session did not open", wake=hosted.ready
        )
        if failure is None and self._probing():
            # Nothing but the setup: no conversation, no request the
            # provider bills. It is seeded at the turn boundary it takes over at.
            return await self._until(
                hosted, lambda: adapter.is_ready(service), "the session did not become ready"
            )
        if failure is None:
            answer = self._answer_again()
            cut = self._session.cut
            heard = cut.heard.strip() if cut is not None else ""
            if hosted.resumes:
                if self._context is not None:
                    await adapter.adopt(service, self._context)
                # A handle covers the session up to the turn it was issued
                # after: the turns since, and what was heard of a cut reply
                # (the model's own turn), are given again.
                turns = self._session.uncovered
                if heard:
                    turns.append({"role": "assistant", "content": heard})
                await adapter.send_turns(service, turns, answer=answer)
                hosted.asked_to_answer = answer
            elif self._context is not None or answer:
                messages = _as_heard(self._context, heard)
                context = LLMContext(
                    messages,  # type: ignore[arg-type]
                    tools=self._context.tools if self._context is not None else None,  # type: ignore[arg-type]
                    tool_choice=self._context.tool_choice if self._context is not None else None,  # type: ignore[arg-type]
                )
                await adapter.seed(service, context, answer=answer)
                # What it holds once it goes live (a cut reply's partial turn
                # aside: the reply that goes on with it brings all of it).
                self._seeds[id(hosted)] = messages[:-1] if heard else messages
                hosted.asked_to_answer = answer
            failure = await self._until(
                hosted, lambda: adapter.is_ready(service), "the session did not become ready"
            )
        if failure is not None and hosted.resumes and failure.verdict is not Verdict.TRANSIENT:
            # The server refused the handle (it closes with 1007 "invalid
            # argument"): it must not be offered again; seed next time.
            self._resume_refused = True
        return failure

    async def _until(
        self,
        hosted: Hosted[LLMService],
        condition: Callable[[], bool],
        what: str,
        *,
        wake: asyncio.Event | None = None,
    ) -> Failure | None:
        """Wait until ``condition()`` or a failure, within the attempt's timeout.

        ``wake``, when given, is set as the condition comes true (or on a
        failure): it is seen at once, not at the next poll (a fresh session
        that opened is seeded a poll interval sooner). Failures that set
        nothing are still polled for.
        """
        try:
            async with asyncio.timeout(self._retry.attempt_timeout):
                while not hosted.failures and not condition():
                    if wake is None or wake.is_set():
                        await asyncio.sleep(READY_POLL_S)
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(wake.wait(), READY_POLL_S)
        except TimeoutError:
            return Failure(Verdict.TRANSIENT, "connectivity", what)
        return hosted.failures[-1] if hosted.failures else None

    async def _from_connecting(self, hosted: Hosted[LLMService], frame: Frame) -> None:
        # A seeded session may start answering before it goes live.
        self._early.setdefault(id(hosted), []).append(frame)

    def _restore_journal(self, hosted: Hosted[LLMService]) -> None:
        session = self._session
        session.connection_restored()
        self._went_live(hosted)
        if session.dropped_audio_s:
            logger.warning(
                f"{self}: dropped the oldest {session.dropped_audio_s:.1f}s of user audio buffered "
                f"while reconnecting (ReplayPolicy.max_buffered_input_s={self._replay.max_buffered_input_s})"
            )
        cut = session.cut
        asked = hosted.asked_to_answer
        session.answered(asked=asked, now=now())
        self._continuing = cut if asked and cut is not None and (cut.heard or cut.heard_audio) else None
        self._cut_closed = False

    def _went_live(self, hosted: Hosted[LLMService]) -> None:
        seed = self._seeds.pop(id(hosted), None)
        if seed is not None:
            self._session.seeded(seed)
        for other in list(self._seeds):
            if other != id(hosted):
                del self._seeds[other]  # instances that never went live

    async def _after_restore(self, hosted: Hosted[LLMService]) -> None:
        await self._flush_early(hosted)

    async def _flush_early(self, hosted: Hosted[LLMService]) -> None:
        early = self._early.get(id(hosted))
        while early:
            await self._deliver(hosted, early.pop(0), early=True)
        self._early.pop(id(hosted), None)

    def _answer_again(self) -> bool:
        """Whether to have the fresh session answer what the drop cut short.

        Not when the user said something while it was down: that input is
        delivered instead, and it is what the user wants answered now.
        """
        cut = self._session.cut
        return bool(
            cut is not None
            and cut.needs_answer
            and self._replay.answer_again
            and not self._session.has_user_input
        )

    # The session journal's actions replace the inference journal's.
    async def _feed(self, hosted: Hosted[LLMService], action: SessionAction) -> None:  # type: ignore[override]
        frame, direction = action.frame if isinstance(action.frame, tuple) else (action.frame, None)
        assert isinstance(frame, Frame)
        if action.kind is SessionActionKind.INPUT:
            if isinstance(frame, InputTextRawFrame):
                self._session.reply_owed(now=now())
            elif isinstance(frame, UserStartedSpeakingFrame):
                self._session.user_started_speaking()
            elif isinstance(frame, UserStoppedSpeakingFrame):
                self._session.reply_owed(now=now(), spoken=True)
        self._taken_in(frame)
        if isinstance(frame, EndFrame):
            hosted.stopping = True
        await hosted.service.queue_frame(frame, direction or FrameDirection.DOWNSTREAM)

    def _action_size(self, action: SessionAction) -> tuple[object | None, int]:  # type: ignore[override]
        frame = action.frame[0] if isinstance(action.frame, tuple) else action.frame
        if isinstance(frame, InputTextRawFrame):
            return frame, len(frame.text)
        return None, 0

    # ------------------------------------------------------------------
    # Frames out: the reply, checked and held where it must be
    # ------------------------------------------------------------------

    async def _deliver(self, hosted: Hosted[LLMService], frame: Frame, *, early: bool = False) -> None:
        if not early and self._early.get(id(hosted)):
            self._early[id(hosted)].append(frame)  # behind what came before it went live
            return
        t = now()
        session = self._session
        if isinstance(frame, (TTSStartedFrame, LLMFullResponseStartFrame)) and not session.reply_open:
            self._open_reply(hosted, t)
        if isinstance(frame, TTSAudioRawFrame):
            self._sounded = True
            self._silent_in_a_row = 0
            session.output(now=t)
        elif isinstance(frame, TTSTextFrame) and frame.append_to_context:
            self._transcribed = True
            session.output(now=t)
        splice = self._splice
        if splice is not None and isinstance(frame, (*_REPLY, InterruptionFrame)):
            await self._through_splice(hosted, splice, frame, t)
            return
        await self._out(hosted, frame, t)

    def _open_reply(self, hosted: Hosted[LLMService], t: float) -> None:
        self._reply_at = t
        self._speaks = self._provider.speaks(hosted.service)
        self._session.reply_started(now=t, speaks=self._speaks)
        self._sounded = self._transcribed = False
        cut, self._continuing = self._continuing, None
        if cut is not None and self._speaks:
            self._end_splice()  # a hold timer left from an earlier continuation
            self._splice = Splice(
                heard=cut.heard,
                tail=cut.tail,
                heard_audio=cut.heard_audio,
                audio_from=cut.audio_from,
                bytes_per_char=self._session.bytes_per_char,
                hold=self._replay.continuation_hold_s,
            )

    async def _splice_deadline(self, hosted: Hosted[LLMService], splice: Splice) -> None:
        deadline = splice.deadline
        assert deadline is not None
        await asyncio.sleep(max(0.0, deadline - now()))
        if splice is self._splice and hosted is self._live:
            splice.expired(now=now())
            await self._release(hosted, splice, now())

    async def _through_splice(
        self, hosted: Hosted[LLMService], splice: Splice, frame: Frame, t: float
    ) -> None:
        if isinstance(frame, InterruptionFrame):
            # The user cut in before the continuation was heard: none of it was.
            self._end_splice()
            await self._out(hosted, frame, t)
            return
        kind, size, text = _held_kind(frame)
        if splice.decided:
            if not await self._trim(splice, frame, kind, size):
                return
            if splice.done:
                self._end_splice()
            await self._out(hosted, frame, t)
            return
        splice.held(frame, kind, size=size, text=text, now=t)
        if self._splice_timer is None and splice.deadline is not None:
            # The hold counts from the continuation's first audio.
            self._splice_timer = self.create_task(self._splice_deadline(hosted, splice), name="splice")
        if isinstance(frame, LLMFullResponseEndFrame):
            splice.ended(now=t)
        await self._release(hosted, splice, t)

    async def _release(self, hosted: Hosted[LLMService], splice: Splice, t: float) -> None:
        releases = splice.releases()
        if not releases:
            return
        self._session.spliced(splice.heard_late)
        if splice.drop_chars or splice.heard_late:
            logger.info(
                f"{self}: the continuation repeated {splice.drop_chars} characters the user had heard; "
                f"dropped {splice.drop_bytes} bytes of its audio"
            )
        late = splice.heard_late
        for release in releases:
            frame = release.item
            assert isinstance(frame, Frame)
            if late and release.kind is not Held.OTHER:
                await self._out(hosted, self._known_text(late), t)
                late = ""
            if release.skip:
                if not _skip(frame, release.skip):
                    continue
            await self._out(hosted, frame, t)
        if late:
            await self._out(hosted, self._known_text(late), t)
        if splice.done or self._splice is not splice:
            self._end_splice()

    def _known_text(self, text: str) -> TTSTextFrame:
        """Words already counted as heard, for the context."""
        frame = TTSTextFrame(text, text_type=TextType.SENTENCE)
        frame.includes_inter_frame_spaces = True
        self._known.add(id(frame))
        return frame

    async def _trim(self, splice: Splice, frame: Frame, kind: Held, size: int) -> bool:
        skip = splice.passing(kind, size)
        return not skip or _skip(frame, skip)

    def _end_splice(self) -> None:
        self._splice = None
        timer, self._splice_timer = self._splice_timer, None
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()

    async def _out(self, hosted: Hosted[LLMService], frame: Frame, t: float) -> None:
        """A reply's frames wait for its first audio: a reply nobody hears is not passed on."""
        session = self._session
        waiting = session.reply_open and self._speaks and not self._sounded
        if waiting and isinstance(
            frame, (TTSStartedFrame, LLMFullResponseStartFrame, TTSTextFrame, LLMTextFrame, TTSStoppedFrame)
        ):
            self._held.append(frame)
            return
        if waiting and isinstance(frame, LLMFullResponseEndFrame):
            held, self._held = self._held, []
            if self._transcribed:
                await self._unheard_reply(hosted)
                return
            for item in held:  # a reply with nothing to say (a function call)
                await self._emit(hosted, item, t)
            await self._emit(hosted, frame, t)
            return
        if isinstance(frame, InterruptionFrame):
            self._held = []  # none of it was heard
        elif self._held and not waiting:
            held, self._held = self._held, []
            for item in held:
                await self._emit(hosted, item, t)
        # Anything else (input passing through, metrics, function calls) goes on.
        await self._emit(hosted, frame, t)

    async def _emit(self, hosted: Hosted[LLMService], frame: Frame, t: float) -> None:
        """Record what a frame going downstream says, then pass it on."""
        session = self._session
        if isinstance(frame, TTSAudioRawFrame):
            self._progress(hosted)
            await self.push_frame(frame)
            # Transcription that ran ahead of the audio is heard now.
            words = session.audio_delivered(len(frame.audio), now=t)
            if words:
                await self.push_frame(self._text_frame(words))
            return
        if isinstance(frame, TTSTextFrame) and frame.append_to_context:
            if id(frame) in self._known:
                self._known.discard(id(frame))
            else:
                # Only words whose audio went downstream reach the context.
                words = session.transcribed(frame.text)
                if not words:
                    return
                frame.text = words
        elif isinstance(frame, TTSStartedFrame):
            self._shown_tts = True
        elif isinstance(frame, LLMFullResponseStartFrame):
            self._shown_response = True
        elif isinstance(frame, (TTSStoppedFrame, LLMFullResponseEndFrame)):
            word = session.word_completed()
            if word:
                # The reply ended whole: its last word is complete.
                await self.push_frame(self._text_frame(word))
            if isinstance(frame, TTSStoppedFrame):
                self._shown_tts = False
            else:
                self._shown_response = False
                session.reply_ended(completed=True)
        elif isinstance(frame, InterruptionFrame):
            session.interrupted()
            self._shown_tts = self._shown_response = False
        elif isinstance(frame, FunctionCallResultFrame):
            if frame.properties is None or frame.properties.is_final:
                session.tool_finished(frame.tool_call_id)
        await self.push_frame(frame)

    @staticmethod
    def _text_frame(text: str) -> TTSTextFrame:
        frame = TTSTextFrame(text, text_type=TextType.SENTENCE)
        frame.includes_inter_frame_spaces = True
        return frame

    async def _unheard_reply(self, hosted: Hosted[LLMService]) -> None:
        """A reply came with transcription and no audio: nobody heard it. Ask again."""
        self._end_splice()
        heard = self._session.unheard_reply(now=now())
        self._silent_in_a_row += 1
        asked = False
        if self._silent_in_a_row == 1 and hosted is self._live:
            logger.warning(f"{self}: a reply came with transcription and no audio; asking again")
            try:
                asked = await self._provider.ask_again(hosted.service, heard)
            except Exception as exc:
                logger.debug(f"{self}: could not ask again ({type(exc).__name__}: {exc})")
        if asked:
            self._continuing = self._session.asked_cut
            return
        failure = Failure(Verdict.TRANSIENT, "server", "a reply came with transcription and no audio")
        if hosted is self._live and not self._ended:
            await self._lost(hosted, failure)

    async def _after_lost(self, hosted: Hosted[LLMService]) -> None:
        self._held = []
        self._end_splice()
        self._early.pop(id(hosted), None)
        cut = self._session.cut
        if cut is not None and cut.reply_open and not self._cut_closed:
            # The stock service would leave the cut reply open forever (and an
            # EndFrame waiting 30 s on it): close it as the transport and the
            # aggregators expect.
            self._cut_closed = True
            if self._shown_tts:
                await self.push_frame(TTSStoppedFrame())
            if self._shown_response:
                await self.push_frame(LLMFullResponseEndFrame())
        self._shown_tts = self._shown_response = False

    async def _from_failed(self, hosted: Hosted[LLMService], frame: Frame) -> None:
        if isinstance(frame, FunctionCallResultFrame):
            # A function finished after its session died: its result goes to
            # the fresh session (once), under its function's name.
            self._session.result_captured((frame, None))
            if self._live is not None and self.state is State.LIVE:
                await self._feed_pending()

    async def _before_retire(self, hosted: Hosted[LLMService]) -> None:
        deadline = now() + TOOL_WAIT_S
        while self._provider.function_calls_running(hosted.service) and now() < deadline:
            await asyncio.sleep(0.01)

    async def _abandon(self, reason: str, episode: Episode) -> Abandoned:
        frames = self._session.gave_up()
        passing = []
        dropped = 0
        for item in frames:
            frame = item[0] if isinstance(item, tuple) else item
            if isinstance(frame, _INPUT):
                dropped += 1
            elif isinstance(frame, Frame):
                passing.append(frame)
        closing: list[Frame] = []
        if not self._cut_closed:
            if self._shown_tts:
                closing.append(TTSStoppedFrame())
            if self._shown_response:
                closing.append(LLMFullResponseEndFrame())
        self._shown_tts = self._shown_response = False
        lost = "the session" + (f" and {dropped} buffered input frame(s)" if dropped else "")
        return Abandoned(closing=tuple(closing), passing=tuple(passing), lost=lost)

    # ------------------------------------------------------------------
    # Handovers: GoAway, sessions near their limit, and the fallback chain
    # ------------------------------------------------------------------

    async def _watch_age(self, limit: float) -> None:
        """Move to a fresh session once the live one is ``limit`` seconds old."""
        while True:
            live = self._live
            if live is None or live.live_since is None or self._rotating:
                await asyncio.sleep(min(1.0, limit / 10))
                continue
            left = live.live_since + limit - now()
            if left > 0:
                await asyncio.sleep(min(left, 1.0))
                continue
            self._rotating = True
            await self._hand_over(live, f"the session is {limit:g}s old")
            if self._live is live:
                await asyncio.sleep(min(1.0, limit / 10))  # the handover failed: not in a loop

    def _at_boundary(self, hosted: Hosted[LLMService]) -> bool:
        """Whether nothing is under way: no reply, none owed, no one speaking, no function running."""
        session = self._session
        return not (
            session.reply_open
            or session.owes_reply
            or self._user_speaking
            or self._splice is not None
            or self._provider.function_calls_running(hosted.service)
        )

    def _idle(self) -> bool:
        """Whether the conversation may move to another provider of the chain now.

        At a turn boundary (:meth:`_at_boundary`), live, with nothing buffered,
        no cut reply being continued, no handover under way, and the user
        quiet: no speech went into the session since the model last began a
        reply, or none for :data:`SPEECH_PAUSE_S` (a provider's own voice
        detection may not tell the pipeline that the user is speaking).
        """
        live = self._live
        if live is None or live.state is not HostedState.LIVE or self.state is not State.LIVE:
            return False
        if self._rotating or self._continuing is not None or self._session.buffered:
            return False
        spoke, replied = self._speech_at, self._reply_at
        quiet = spoke is None or (replied is not None and replied >= spoke) or now() - spoke >= SPEECH_PAUSE_S
        return quiet and self._at_boundary(live)

    async def _hand_over(self, old: Hosted[LLMService], why: str) -> None:
        """Move to a fresh (resumed, or seeded) session at the next turn boundary."""
        try:
            while True:
                while self._live is old and not self._at_boundary(old):
                    await asyncio.sleep(BOUNDARY_POLL_S)
                if self._live is not old or self._ended:
                    return
                logger.info(f"{self}: {why}; handing over to a fresh session")
                version = self._session.version
                fresh, failure = await self._connect_once()
                if fresh is None:
                    logger.warning(f"{self}: handover failed ({failure.description if failure else '?'})")
                    return
                taken = self._take_over(old, fresh, version, at_boundary=self._at_boundary)
                if taken is None:
                    return
                if not taken:
                    # The conversation went on while the fresh session
                    # connected: it was given an old state. Again.
                    continue
                await self._flush_early(fresh)
                return
        finally:
            self._rotating = False

    def _take_over(
        self,
        old: Hosted[LLMService],
        fresh: Hosted[LLMService],
        version: int,
        *,
        at_boundary: Callable[[Hosted[LLMService]], bool],
    ) -> bool | None:
        """Make ``fresh`` (connected and given the conversation) live in place of ``old``, between two frames.

        Args:
            old: The live session when ``fresh`` was given the conversation.
            fresh: The session to take over.
            version: The session journal's version when ``fresh`` was given the conversation.
            at_boundary: Whether the conversation is at a boundary ``fresh`` may take over at.

        Returns:
            True once ``fresh`` is live; False when the conversation went on
            while ``fresh`` was being given it (it holds an old state: try
            again); None when ``old`` is no longer live, the processor ended,
            or ``fresh`` failed meanwhile. Unless True, ``fresh`` is retired.
        """
        if (
            self._live is not old
            or self._ended
            or fresh.failures
            or fresh.state is not HostedState.CONNECTING
        ):
            self._host.retire(fresh)
            return None
        if self._session.version != version or not at_boundary(old):
            self._host.retire(fresh)
            return False
        # Nothing is in flight at a turn boundary.
        fresh.state = HostedState.LIVE
        fresh.live_since = now()
        self._chain_at = fresh.provider
        self._live = fresh
        self._went_live(fresh)
        self._host.retire(old, abort=False)
        return True

    async def _planned_switch(self, target: int, reason: str, probe: bool) -> None:
        """Move the conversation to provider ``target`` of the chain at a turn boundary.

        Back to a preferred provider that is healthy again (``switch_back="boundary"``),
        or away from one the fleet found down. The probe is the handshake and
        the session's setup, nothing billed: no conversation, no request for
        an answer. At the next boundary (within :data:`SWITCH_WAIT_S`) the
        probed session is given the conversation as heard, as a handover's
        fresh session is, and takes over between two frames; if the
        conversation went on meanwhile, it is let go and tried again later.
        """
        try:
            hosted, failure = await self._connect_once(None, target)
            if hosted is None:
                assert failure is not None
                logger.info(f"{self}: {self._host.names[target]} not taken ({failure.description})")
                self._note_health(target, failure)
                return
            if probe:
                self._note_health(target, None)
            deadline = now() + SWITCH_WAIT_S
            while not self._ended and not self._idle() and not hosted.failures and now() < deadline:
                await asyncio.sleep(BOUNDARY_POLL_S)
            old = self._live
            if hosted.failures:
                self._note_health(target, hosted.failures[-1])
            if (
                old is None
                or old.provider == target  # a recovery got there first
                or not self._idle()
                or hosted.failures
                or hosted.state is not HostedState.CONNECTING
            ):
                logger.debug(
                    f"{self}: no turn boundary to switch at; not taking {self._host.names[target]} now"
                )
                self._host.retire(hosted)
                return
            version = self._session.version
            failure = await self._seed(hosted)
            if failure is not None:
                logger.info(f"{self}: {self._host.names[target]} not taken ({failure.description})")
                self._note_health(target, failure)
                self._host.retire(hosted)
                return
            if not self._take_over(old, hosted, version, at_boundary=lambda _: self._idle()):
                logger.debug(f"{self}: the conversation went on; not taking {self._host.names[target]} now")
                return
            await self._switched(old.provider, target, reason)
            await self._flush_early(hosted)
        except Exception:
            logger.exception(f"{self}: switching providers failed")
        finally:
            self._switching = None

    async def _seed(self, hosted: Hosted[LLMService]) -> Failure | None:
        """Give a connected session that has none the conversation as heard (no answer asked), and wait."""
        service = hosted.service
        adapter = self._provider
        adapter.name_tool_calls(service, self._tool_names)
        if self._context is not None:
            messages = _as_heard(self._context, "")
            context = LLMContext(
                messages,  # type: ignore[arg-type]
                tools=self._context.tools,
                tool_choice=self._context.tool_choice,
            )
            await adapter.seed(service, context, answer=False)
            self._seeds[id(hosted)] = messages
        return await self._until(
            hosted, lambda: adapter.is_ready(service), "the session did not become ready"
        )


def _held_kind(frame: Frame) -> tuple[Held, int, str]:
    if isinstance(frame, TTSAudioRawFrame):
        return Held.AUDIO, len(frame.audio), ""
    if isinstance(frame, TTSTextFrame) and frame.append_to_context:
        return Held.TRANSCRIPT, len(frame.text), frame.text
    if isinstance(frame, LLMTextFrame):
        return Held.MIRROR, len(frame.text), frame.text
    return Held.OTHER, 0, ""


def _skip(frame: Frame, skip: int) -> bool:
    """Drop the first ``skip`` bytes or characters of ``frame``; False when nothing is left."""
    if isinstance(frame, TTSAudioRawFrame):
        frame.audio = frame.audio[skip:]
        return bool(frame.audio)
    if isinstance(frame, (TTSTextFrame, LLMTextFrame)):
        frame.text = frame.text[skip:]
        return bool(frame.text)
    return True


# Peak level above which buffered audio counts as the user speaking (about -30 dBFS).
SPEECH_PEAK = 1000


def _speech(frame: Frame) -> bool:
    """Whether a frame is audio with speech in it (its peak above :data:`SPEECH_PEAK`)."""
    if not isinstance(frame, InputAudioRawFrame) or len(frame.audio) < 2:
        return False
    samples = np.frombuffer(frame.audio, dtype="<i2", count=len(frame.audio) // 2)
    return bool(np.abs(samples.astype(np.int32)).max() > SPEECH_PEAK)


def _seconds(frame: Frame) -> float:
    if isinstance(frame, InputAudioRawFrame) and frame.sample_rate:
        return len(frame.audio) / (2 * frame.sample_rate * max(1, frame.num_channels))
    return 0.0


def _messages(context: LLMContext) -> list[dict[str, Any]]:
    return [dict(m) for m in context.get_messages() if isinstance(m, dict)]


def _last_role(context: LLMContext) -> str | None:
    messages = _messages(context)
    return messages[-1].get("role") if messages else None


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _as_heard(context: LLMContext | None, heard: str) -> list[dict[str, Any]]:
    """The conversation as heard: the context, ending with what was heard of a cut reply (if any).

    The context may already hold what was heard of the cut reply (the
    aggregator writes it when the cut reply is closed), in one message or in
    several (a continuation cut again): those trailing assistant messages are
    replaced by the one that holds all of it.
    """
    messages = _messages(context) if context is not None else []
    if not heard:
        return messages
    target = " ".join(heard.split())
    popped: list[str] = []
    while messages and messages[-1].get("role") == "assistant" and not messages[-1].get("tool_calls"):
        candidate = " ".join([_text_of(messages[-1]), *popped]).split()
        if not target.startswith(" ".join(candidate)) or not candidate:
            break
        popped.insert(0, _text_of(messages.pop()))
    messages.append({"role": "assistant", "content": target})
    return messages
