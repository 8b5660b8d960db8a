"""ResilientLLM for speech-to-speech sessions (Gemini Live): a session that survives its socket.

Built by :class:`~pipecat_resilient.llm.ResilientLLM` when its factory makes a
``GeminiLiveLLMService``. It takes recovery over from the stock service and,
when the session drops (1007, 1011, an abort, a stall) or the server announces
its end (GoAway):

* closes a reply the drop cut short, downstream (``TTSStoppedFrame``,
  ``LLMFullResponseEndFrame``), so aggregators and the transport see a
  finished turn and an ``EndFrame`` never waits on it;
* buffers user input (audio - bounded -, text, context updates) that arrives
  while no session can take it, and delivers it to the fresh session;
* resumes the session with the latest resumable handle, or, when there is
  none or the server refuses it, seeds a fresh one with the conversation as
  heard: the context the aggregators kept, which holds what the user said
  and what the user heard of the assistant;
* has the model answer again after a cut reply (by default), so the user is
  not left in silence;
* delivers each tool result exactly once, under its function's name, even
  when the function finished after its session died, and never runs a
  function twice because the model repeated a call after a reconnect;
* on GoAway, moves to a fresh (resumed) session at the next turn boundary,
  before the server closes the old one, with no audible gap;
* gives up with one ``ErrorFrame`` when the same failure (a 1007 on the same
  input, say) comes back before any progress: that is poison input.

Everything that touches the stock service's internals lives in
:mod:`pipecat_resilient._gemini`.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

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

from pipecat_resilient import _gemini
from pipecat_resilient._hosting import Episode, Hosted, HostedState, now
from pipecat_resilient._resilient import Abandoned, Journal
from pipecat_resilient.failures import Failure, Verdict, classify_exception
from pipecat_resilient.ledger import State
from pipecat_resilient.llm import ResilientLLM
from pipecat_resilient.session import SessionAction, SessionActionKind, SessionJournal

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
# Longest a failed session is kept alive so that a function it was running can
# finish and hand its result over.
TOOL_WAIT_S = 60.0
# How often the GoAway handover checks for a turn boundary.
BOUNDARY_POLL_S = 0.02


class ResilientRealtimeLLM(ResilientLLM):
    """ResilientLLM for speech-to-speech sessions. Built by ResilientLLM; do not instantiate directly.

    Its arguments are ResilientLLM's: ``first_token_timeout`` is how long the
    model may take to start answering a finished user turn, ``stall_timeout``
    how long a reply in progress may go without output, and ``replay``'s
    ``answer_again`` and ``max_buffered_input_s`` apply.
    """

    def __init__(self, factory: Any, **kwargs: Any) -> None:
        """Create the processor (see :class:`~pipecat_resilient.llm.ResilientLLM`)."""
        self._handle: str | None = None
        self._resume_refused = False
        self._context: LLMContext | None = None
        self._tool_names: dict[str, str] = {}
        self._cut_closed = False
        self._user_speaking = False
        # The end of the transcription, held until the word it ends in is
        # complete: a drop must not put half a word into the context.
        self._partial = ""
        self._rotating = False
        super().__init__(factory, **kwargs)
        _gemini.check(self._host.first.service)

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

    # ------------------------------------------------------------------
    # Frames in
    # ------------------------------------------------------------------

    async def _route(self, frame: Frame, direction: FrameDirection) -> None:
        """Feed input to the live session, or buffer it while recovering."""
        if isinstance(frame, UserStartedSpeakingFrame):
            self._user_speaking = True
        elif isinstance(frame, UserStoppedSpeakingFrame):
            self._user_speaking = False
        if isinstance(frame, LLMContextFrame):
            self._context = frame.context
            if _last_role(frame.context) == "user":
                self._owed_on_feed = True
        if isinstance(frame, InterruptionFrame) and direction is FrameDirection.DOWNSTREAM:
            self._session.interrupted()
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
            owed = isinstance(frame, (UserStoppedSpeakingFrame, InputTextRawFrame)) or self._owed_on_feed
            self._owed_on_feed = False
            if self._session.input_accepted((frame, direction), seconds=seconds):
                if owed:
                    self._session.reply_owed(now=now())
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
            self._session.input_accepted((frame, direction), seconds=_seconds(frame))
            return
        if isinstance(frame, EndFrame):
            live.stopping = True
        await live.service.queue_frame(frame, direction)

    # ------------------------------------------------------------------
    # The hosted instances
    # ------------------------------------------------------------------

    def _prepare_instance(self, hosted: Hosted[LLMService]) -> None:
        service = hosted.service
        self._hook_errors(hosted)
        _gemini.hook(
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

    async def _session_failed(self, hosted: Hosted[LLMService], error: BaseException) -> None:
        failure = classify_exception(error) or Failure(
            Verdict.TRANSIENT, "connectivity", f"session failed: {type(error).__name__}"
        )
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
        handle = _gemini.resumable_handle(hosted.service)
        if handle is not None:
            self._handle = handle
            self._resume_refused = False
        if getattr(message, "go_away", None) is not None and not self._rotating:
            self._rotating = True
            self.create_task(self._hand_over(hosted), name="go-away")

    def _before_connect(self, hosted: Hosted[LLMService]) -> None:
        hosted.resumes = self._handle is not None and not self._resume_refused
        if hosted.resumes:
            assert self._handle is not None
            _gemini.resume_with(hosted.service, self._handle)

    async def _connected(self, hosted: Hosted[LLMService]) -> Failure | None:
        service = hosted.service
        _gemini.name_tool_calls(service, self._tool_names)
        cut = self._session.cut
        answer = self._answer_again()
        if not hosted.resumes and self._context is not None:
            # No session to resume: seed a fresh one with the conversation as
            # heard, and have it answer when an answer is owed.
            _gemini.set_answer_on_seed(service, answer)
            context = self._context
            if answer and cut is not None:
                context = LLMContext(
                    [*context.get_messages(), {"role": "user", "content": self._continue_instruction()}],
                    tools=context.tools,
                    tool_choice=context.tool_choice,
                )
            hosted.asked_to_answer = answer
            await service.queue_frame(LLMContextFrame(context))
        try:
            # Bounded by the attempt's own deadline as well (the caller's).
            async with asyncio.timeout(self._retry.attempt_timeout):
                await hosted.ready.wait()
                while not hosted.failures and not _gemini.is_ready(service):
                    await asyncio.sleep(0.005)
        except TimeoutError:
            return Failure(Verdict.TRANSIENT, "connectivity", "the session did not become ready")
        if hosted.failures:
            failure = hosted.failures[-1]
            if hosted.resumes and failure.verdict is not Verdict.TRANSIENT:
                # The server refused the handle (it closes with 1007 "invalid
                # argument"): it must not be offered again; seed next time.
                self._resume_refused = True
            return failure
        if hosted.resumes and self._context is not None:
            await _gemini.adopt_context(service, self._context)
        return None

    def _restore_journal(self, hosted: Hosted[LLMService]) -> None:
        self._session.connection_restored()
        if self._session.dropped_audio_s:
            logger.warning(
                f"{self}: dropped the oldest {self._session.dropped_audio_s:.1f}s of user audio buffered "
                f"while reconnecting (ReplayPolicy.max_buffered_input_s={self._replay.max_buffered_input_s})"
            )

    async def _after_restore(self, hosted: Hosted[LLMService]) -> None:
        asked = hosted.asked_to_answer
        if hosted.resumes and self._answer_again():
            # The resumed session has no idea a reply was cut: ask for it.
            try:
                await _gemini.send_turn(hosted.service, self._continue_instruction())
                asked = True
            except Exception as exc:
                logger.debug(f"{self}: could not ask the resumed session to answer ({exc})")
        self._session.answered(asked=asked, now=now())
        self._cut_closed = False

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

    def _continue_instruction(self) -> str:
        cut = self._session.cut
        heard = " ".join(cut.heard.split()) if cut is not None else ""
        last_user = _last_user_text(self._context)
        parts = ["(The connection dropped while you were answering."]
        if last_user:
            parts.append(f'The user\'s last message was: "{last_user}".')
        if heard:
            parts.append(f'Of your answer the user heard only: "{heard}".')
            parts.append("Continue your answer from exactly there, without repeating it.)")
        else:
            parts.append("The user heard none of your answer. Answer it now.)")
        return " ".join(parts)

    # The session journal's actions replace the inference journal's.
    async def _feed(self, hosted: Hosted[LLMService], action: SessionAction) -> None:  # type: ignore[override]
        frame, direction = action.frame if isinstance(action.frame, tuple) else (action.frame, None)
        assert isinstance(frame, Frame)
        if action.kind is SessionActionKind.INPUT and isinstance(
            frame, (UserStoppedSpeakingFrame, InputTextRawFrame)
        ):
            self._session.reply_owed(now=now())
        if isinstance(frame, EndFrame):
            hosted.stopping = True
        await hosted.service.queue_frame(frame, direction or FrameDirection.DOWNSTREAM)

    def _action_size(self, action: SessionAction) -> tuple[object | None, int]:  # type: ignore[override]
        frame = action.frame[0] if isinstance(action.frame, tuple) else action.frame
        if isinstance(frame, InputTextRawFrame):
            return frame, len(frame.text)
        return None, 0

    async def _deliver(self, hosted: Hosted[LLMService], frame: Frame) -> None:
        session = self._session
        t = now()
        if isinstance(frame, (TTSStartedFrame, LLMFullResponseStartFrame)):
            if not session.reply_open:
                session.reply_started(now=t)
        elif isinstance(frame, TTSAudioRawFrame):
            session.output(now=t)
            self._progress(hosted)
        elif isinstance(frame, TTSTextFrame) and frame.append_to_context:
            text, self._partial = _complete_words(self._partial + frame.text)
            if not text:
                return
            frame.text = text
            session.heard(text)
        elif isinstance(frame, LLMTextFrame):
            session.output(now=t)
        elif isinstance(frame, (TTSStoppedFrame, LLMFullResponseEndFrame, InterruptionFrame)):
            if self._partial and not isinstance(frame, InterruptionFrame):
                # The reply ended whole: its last word is complete.
                held = TTSTextFrame(self._partial, text_type=TextType.SENTENCE)
                held.includes_inter_frame_spaces = True
                session.heard(self._partial)
                await self.push_frame(held)
            self._partial = ""
            if not isinstance(frame, TTSStoppedFrame):
                session.reply_ended()
        elif isinstance(frame, FunctionCallResultFrame):
            if frame.properties is None or frame.properties.is_final:
                session.tool_finished(frame.tool_call_id)
        await self.push_frame(frame)

    async def _after_lost(self, hosted: Hosted[LLMService]) -> None:
        # Half a word was heard at most; it stays out of the context.
        self._partial = ""
        cut = self._session.cut
        if cut is not None and cut.reply_open and not self._cut_closed:
            # The stock service would leave the cut reply open forever (and an
            # EndFrame waiting 30 s on it): close it as the transport and the
            # aggregators expect.
            self._cut_closed = True
            await self.push_frame(TTSStoppedFrame())
            await self.push_frame(LLMFullResponseEndFrame())

    async def _from_failed(self, hosted: Hosted[LLMService], frame: Frame) -> None:
        if isinstance(frame, FunctionCallResultFrame):
            # A function finished after its session died: its result goes to
            # the fresh session (once), under its function's name.
            self._session.result_captured((frame, None))
            if self._live is not None and self.state is State.LIVE:
                await self._feed_pending()

    async def _before_retire(self, hosted: Hosted[LLMService]) -> None:
        deadline = now() + TOOL_WAIT_S
        while _gemini.function_calls_running(hosted.service) and now() < deadline:
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
        closing: tuple[Frame, ...] = ()
        cut = self._session.cut
        if cut is not None and cut.reply_open and not self._cut_closed:
            closing = (TTSStoppedFrame(), LLMFullResponseEndFrame())
        lost = "the session" + (f" and {dropped} buffered input frame(s)" if dropped else "")
        return Abandoned(closing=closing, passing=tuple(passing), lost=lost)

    # ------------------------------------------------------------------
    # GoAway: a planned handover
    # ------------------------------------------------------------------

    async def _hand_over(self, old: Hosted[LLMService]) -> None:
        """Move to a fresh, resumed session at the next turn boundary."""
        try:
            while self._live is old and (
                self._session.reply_open or self._user_speaking or _gemini.function_calls_running(old.service)
            ):
                await asyncio.sleep(BOUNDARY_POLL_S)
            if self._live is not old or self._ended:
                return
            logger.info(f"{self}: the server announced the end of the session; handing over")
            fresh, failure = await self._connect_once()
            if fresh is None:
                logger.warning(f"{self}: handover failed ({failure.description if failure else '?'})")
                return
            if self._live is not old or self._ended:
                self._host.retire(fresh)
                return
            # Swap between two frames: nothing is in flight at a turn boundary.
            fresh.state = HostedState.LIVE
            fresh.live_since = now()
            self._live = fresh
            self._host.retire(old, abort=False)
        finally:
            self._rotating = False


def _complete_words(text: str) -> tuple[str, str]:
    """Split ``text`` after its last whitespace: the complete words, and the word still arriving."""
    cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
    return text[: cut + 1], text[cut + 1 :]


def _seconds(frame: Frame) -> float:
    if isinstance(frame, InputAudioRawFrame) and frame.sample_rate:
        return len(frame.audio) / (2 * frame.sample_rate * max(1, frame.num_channels))
    return 0.0


def _last_role(context: LLMContext) -> str | None:
    messages = [m for m in context.get_messages() if isinstance(m, dict)]
    return messages[-1].get("role") if messages else None


def _last_user_text(context: LLMContext | None) -> str:
    if context is None:
        return ""
    for message in reversed(context.get_messages()):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content.strip()
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict)).strip()
    return ""
