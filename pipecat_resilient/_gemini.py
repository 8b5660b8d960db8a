"""Gemini Live for the speech-to-speech shell: every reach into GeminiLiveLLMService's internals.

The stock service keeps its session, its reconnect loop and its tool-call
bookkeeping private, and offers no hook to take recovery over. Rather than
scatter private names through the shell, :class:`GeminiLive` (the provider
adapter :class:`~pipecat_resilient.realtime.ResilientRealtimeLLM` uses) is
the only code that touches them; :meth:`GeminiLive.check` verifies at
construction that they are all there, so a Pipecat release that renames one
fails loudly, at once, with the name.

What is used, and why:

* ``_handle_connection_error(error) -> bool`` - returning False stops the
  stock reconnect; the failure is reported to the shell instead.
* ``_connection_task_handler(config)`` - a connection refused before
  ``setupComplete`` raises out of it unreported; the shell hears of it.
* ``_handle_session_ready(session)`` - when the session takes input; its
  websocket (google-genai's ``_ws``) is watched for a close frame from the
  server (:mod:`pipecat_resilient._close_watch`).
* ``_handle_server_message(message)`` - resumption handles and ``goAway``
  (which the stock ignores).
* ``_connect(session_resumption_handle)`` and ``_session_resumption_handle``
  - a fresh instance resumes the lost session.
* ``_system_instruction_from_init`` - what a fresh session is set up with.
* ``_session``, ``_ready_for_realtime_input``, ``_context``,
  ``_process_completed_function_calls``, ``_tool_call_id_to_name``,
  ``_function_call_tasks``, ``_inference_on_context_initialization``,
  ``_is_gemini_3``, ``_settings`` - adopting a context without re-seeding,
  sending turns, naming a tool result, waiting for a running tool.

How a cut reply is continued without a word said twice, and without a user
message the user never said: the session (fresh, or resumed) is given the
conversation it lacks as ``client_content`` turns that end with what the user
heard of the reply as the model's *own* turn, with ``turnComplete``; on Gemini
2.5 a blank user turn follows it, as the stock service pads its seeds (2.5
wants the last turn of a seed to be a user's), and on Gemini 3 the realtime
``text: " "`` nudge follows, as the stock sends it. A resumed session lacks
the turns after the one its handle was issued after (the service issues
handles at turn boundaries), so those are sent again first; the shell keeps
them (:attr:`~pipecat_resilient.session.SessionJournal.uncovered`).

A failure is told apart by where it came from: google-genai raises
``APIError`` with the close code, and its ``__context__`` is websockets'
``ConnectionClosed``: a close frame *received* (``rcvd``) is the server's
(1011 "internal error", 1007...), while none received and a 1011 *sent* with
"keepalive ping timeout" is our own keepalive giving up - the server, or our
event loop, did not answer a ping in time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from pipecat_resilient._close_watch import watch_close
from pipecat_resilient.failures import Failure, Verdict, classify_close, classify_exception

__all__ = ["GeminiLive"]

_REQUIRED = (
    "_handle_connection_error",
    "_connection_task_handler",
    "_handle_session_ready",
    "_handle_server_message",
    "_connect",
    "_session_resumption_handle",
    "_session",
    "_ready_for_realtime_input",
    "_context",
    "_process_completed_function_calls",
    "_tool_call_id_to_name",
    "_function_call_tasks",
    "_inference_on_context_initialization",
    "_system_instruction_from_init",
    "_settings",
)

KEEPALIVE_TIMEOUT = "keepalive ping timeout"
"""websockets' reason for the 1011 close it sends when a ping went unanswered."""


class GeminiLive:
    """The shell's adapter for ``GeminiLiveLLMService`` (stateless; the service is passed in)."""

    name = "Gemini Live"
    resumes = True
    """Sessions can be resumed with a handle."""

    @staticmethod
    def check(service: object) -> None:
        """Raise if ``service`` lacks an internal this adapter relies on.

        Raises:
            TypeError: Naming the missing attribute and the Pipecat version it was checked against.
        """
        missing = [name for name in _REQUIRED if not hasattr(service, name)]
        if missing:
            raise TypeError(
                f"{type(service).__name__} lacks {', '.join(missing)}; pipecat_resilient supports "
                "GeminiLiveLLMService as shipped in pipecat-ai 1.14 (please report this)"
            )

    @staticmethod
    def hook(
        service: Any,
        *,
        failed: Callable[[Failure], Awaitable[None]],
        ready: Callable[[], Awaitable[None]],
        message: Callable[[Any], Awaitable[None]],
    ) -> None:
        """Take the connection over from ``service``.

        Args:
            service: A GeminiLiveLLMService, before it is set up.
            failed: Called with the failure when the connection fails or is refused.
            ready: Called once a session is up (after the stock service set it up).
            message: Called with every server message, after the stock service
                handled it.
        """

        async def handle_connection_error(error: Exception) -> bool:
            await failed(GeminiLive.failure_of(error))
            return False  # never reconnect on its own

        task_handler = service._connection_task_handler

        async def connection_task_handler(config: Any) -> None:
            try:
                await task_handler(config)
            except Exception as error:  # refused before setupComplete, or broken setup
                await failed(GeminiLive.failure_of(error))

        session_ready = service._handle_session_ready

        async def handle_session_ready(session: Any) -> None:
            websocket = getattr(session, "_ws", None)
            if websocket is not None:
                # A close the server starts is told from its frame, once the
                # messages before it are handled (not a round trip later).
                watch_close(websocket, lambda close: failed(GeminiLive.closed_by_server(close)), service)
            await session_ready(session)
            await ready()

        server_message = service._handle_server_message

        async def handle_server_message(server_message_: Any) -> None:
            await server_message(server_message_)
            await message(server_message_)

        service._handle_connection_error = handle_connection_error
        service._connection_task_handler = connection_task_handler
        service._handle_session_ready = handle_session_ready
        service._handle_server_message = handle_server_message

    @staticmethod
    def failure_of(error: BaseException) -> Failure:
        """Classify what ended a session, saying whether the server closed it or our keepalive did."""
        closed = error if isinstance(error, ConnectionClosed) else error.__context__
        if isinstance(closed, ConnectionClosed):
            if closed.rcvd is not None:
                return GeminiLive.closed_by_server(closed.rcvd)
            if closed.sent is not None and closed.sent.reason == KEEPALIVE_TIMEOUT:
                return Failure(
                    Verdict.TRANSIENT,
                    "connectivity",
                    f"no pong to our keepalive ping: closed on our side with {closed.sent.code} "
                    "(the network, or our event loop, stalled)",
                    closed.sent.code,
                )
        return classify_exception(error) or Failure(
            Verdict.TRANSIENT, "connectivity", f"session failed: {type(error).__name__}"
        )

    @staticmethod
    def closed_by_server(close: Close) -> Failure:
        """Classify a close frame the server sent."""
        failure = classify_close(close.code, close.reason)
        return Failure(
            failure.verdict,
            failure.category,
            f"{failure.description}, sent by the server",
            failure.code,
            failure.retry_after,
            failure.trace_id,
        )

    @staticmethod
    def is_ready(service: Any) -> bool:
        """Whether the session is up and takes realtime input (or waits for its first context)."""
        if service._session is None:
            return False
        # Before its first context the stock service takes no input; it seeds
        # the session when the context comes, as on a first connection.
        return bool(service._ready_for_realtime_input) or service._context is None

    @staticmethod
    def speaks(service: Any) -> bool:
        """Whether replies are spoken (the AUDIO modality), not written."""
        modalities = getattr(service._settings, "modalities", None)
        return "TEXT" not in str(getattr(modalities, "value", modalities) or "AUDIO").upper()

    @staticmethod
    def resumable_handle(service: Any) -> str | None:
        """The latest handle the server said can resume this session."""
        handle = getattr(service, "_session_resumption_handle", None)
        return handle if isinstance(handle, str) and handle else None

    @staticmethod
    def issued_handle(message: Any) -> bool:
        """Whether a server message issued a resumable handle."""
        update = getattr(message, "session_resumption_update", None)
        return bool(update is not None and update.resumable and update.new_handle)

    @staticmethod
    def goes_away(message: Any) -> bool:
        """Whether a server message announces the end of the connection (GoAway)."""
        return getattr(message, "go_away", None) is not None

    @staticmethod
    def resume_with(service: Any, handle: str) -> None:
        """Make ``service`` (not yet set up) connect by resuming the session ``handle`` names."""
        service._session_resumption_handle = handle
        connect = service._connect

        async def connect_resuming(session_resumption_handle: str | None = None) -> None:
            await connect(
                session_resumption_handle=session_resumption_handle or service._session_resumption_handle
            )

        service._connect = connect_resuming

    @staticmethod
    def add_instruction(service: Any, text: str) -> None:
        """Append ``text`` to the system instruction ``service`` (not yet set up) will connect with."""
        base = service._system_instruction_from_init
        service._system_instruction_from_init = f"{base}\n\n{text}" if base else text

    @staticmethod
    async def seed(service: Any, context: Any, *, answer: bool) -> None:
        """Seed a fresh session with ``context`` (an ``LLMContext``), as the stock service seeds one.

        With ``answer`` the seed completes the turn, so the model answers the
        user's last turn, or goes on with its own when the context ends with it.
        """
        from pipecat.frames.frames import LLMContextFrame

        service._inference_on_context_initialization = answer
        await service.queue_frame(LLMContextFrame(context))

    @staticmethod
    async def adopt(service: Any, context: Any) -> None:
        """Give a resumed session its context without sending it (the server has it)."""
        service._context = context
        await service._process_completed_function_calls(send_new_results=False)

    @staticmethod
    async def send_turns(service: Any, messages: list[dict[str, Any]], *, answer: bool) -> None:
        """Send ``messages`` (context messages) into the live session as ``client_content`` turns.

        Args:
            service: The service whose session takes them.
            messages: The turns, oldest first; an assistant message is the
                model's own turn.
            answer: Complete the turn, so the model answers (or goes on with
                its own turn, when the last one is the model's).
        """
        from google.genai.types import Content, Part
        from pipecat.processors.aggregators.llm_context import LLMContext

        session = service._session
        if session is None:
            return
        context = LLMContext(messages)  # type: ignore[arg-type]
        params = await service.get_llm_adapter().get_llm_invocation_params(context)
        turns = list(params.get("messages", []))
        if not turns and not answer:
            return
        gemini_3 = bool(getattr(service, "_is_gemini_3", False))
        if turns and not gemini_3 and getattr(turns[-1], "role", None) != "user":
            # Gemini 2.5 wants client content to end with a user turn; a blank
            # one, as the stock service pads its seeds with.
            turns.append(Content(role="user", parts=[Part(text=" ")]))
        await session.send_client_content(turns=turns, turn_complete=answer)
        if answer and gemini_3:
            # Gemini 3 runs no inference without a realtime input (as the stock does).
            await session.send_realtime_input(text=" ")

    @staticmethod
    async def ask_again(service: Any, heard: str) -> bool:
        """Have the live session answer again after a reply the user did not hear (all) of.

        The model is given what the user heard of its reply (a blank when
        nothing) as its own turn, and the turn is completed: it goes on from
        there.

        Returns:
            Whether it was asked.
        """
        if service._session is None:
            return False
        await GeminiLive.send_turns(service, [{"role": "assistant", "content": heard or " "}], answer=True)
        return True

    @staticmethod
    def name_tool_calls(service: Any, names: dict[str, str]) -> None:
        """Tell ``service`` which function each tool call id belongs to (so its result carries the name)."""
        service._tool_call_id_to_name.update(names)

    @staticmethod
    def open_tool_calls(service: Any, call_ids: list[str]) -> None:
        """Nothing to do: a Gemini session takes a result for any call id."""

    @staticmethod
    def function_calls_running(service: Any) -> bool:
        """Whether a function call is still running on ``service``."""
        return bool(service._function_call_tasks)
