"""OpenAI Realtime for the speech-to-speech shell: every reach into OpenAIRealtimeLLMService's internals.

Pipecat 1.14's ``OpenAIRealtimeLLMService`` has no recovery at all: a dropped
socket kills its receive task (logged, never reported), an ``error`` event
ends its reading for good with the socket left open, and the 60-minute session
limit ends the conversation (see ``tests/test_emulator_openai_realtime.py``).
:class:`OpenAIRealtime` is the adapter
:class:`~pipecat_resilient.realtime.ResilientRealtimeLLM` uses to take that
over; :meth:`OpenAIRealtime.check` verifies at construction that the
internals it needs are there.

What is used, and why:

* ``_receive_task_handler()`` - wrapped, so that a drop (an exception out of
  it) or a clean close (it returns) is reported to the shell.
* ``_handle_evt_error(evt)`` - an ``error`` event is a failure of the session
  (the stock stops reading after it); the shell recovers instead of the
  stock pushing an error.
* ``_handle_evt_session_updated(evt)``, ``_api_session_ready`` - when the
  session takes input.
* ``_context``, ``_llm_needs_conversation_setup``,
  ``_process_completed_function_calls``, ``_send_session_update``,
  ``send_client_event``, ``_messages_added_manually``,
  ``_open_function_calls``, ``_create_response`` - re-creating the
  conversation on a fresh session item by item, and asking for a response.
* ``_disconnecting``, ``_websocket``, ``_settings``,
  ``_function_call_tasks``, ``_is_modality_enabled`` - the rest.

A fresh session is given the conversation as the user heard it with one
``conversation.item.create`` per message (the stock service packs a history
into one user message, "This is a previously saved conversation ..." - a
message the user never said): user messages as ``input_text``, the
assistant's as ``output_text`` holding what was heard, function calls as
``function_call`` items and their results as ``function_call_output``. A cut
reply is the last assistant item, holding only what the user heard of it -
what ``conversation.item.truncate`` with ``audio_end_ms`` leaves of an item on
an interruption - and a ``response.create`` has the model go on from there.
A function call still running keeps its call id open on the fresh session,
so its result goes in as the ``function_call_output`` it answers.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from pipecat_resilient._close_watch import watch_close
from pipecat_resilient.failures import Failure, Verdict, classify_close, classify_exception

__all__ = ["OpenAIRealtime"]

_REQUIRED = (
    "_receive_task_handler",
    "_handle_evt_error",
    "_handle_evt_session_updated",
    "_api_session_ready",
    "_context",
    "_llm_needs_conversation_setup",
    "_process_completed_function_calls",
    "_send_session_update",
    "send_client_event",
    "_messages_added_manually",
    "_open_function_calls",
    "_create_response",
    "_disconnecting",
    "_websocket",
    "_settings",
    "_function_call_tasks",
    "_is_modality_enabled",
)

# What a tool message holds while its function runs (Pipecat's aggregator writes it).
_IN_PROGRESS = "IN_PROGRESS"


class OpenAIRealtime:
    """The shell's adapter for ``OpenAIRealtimeLLMService`` (stateless; the service is passed in)."""

    name = "OpenAI Realtime"
    resumes = False
    """Sessions cannot be resumed: a fresh one is given the conversation."""

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
                "OpenAIRealtimeLLMService as shipped in pipecat-ai 1.14 (please report this)"
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
            service: An OpenAIRealtimeLLMService, before it is set up.
            failed: Called with the failure when the socket drops or closes,
                or the server sends an ``error`` event.
            ready: Called once the session is configured (``session.updated``).
            message: Unused (no server message needs the shell's attention).
        """
        reported = False

        async def report(failure: Failure) -> None:
            nonlocal reported
            if not reported and not service._disconnecting:
                reported = True
                await failed(failure)

        receive = service._receive_task_handler

        async def receive_observed() -> None:
            try:
                await receive()
            except Exception as error:
                await report(OpenAIRealtime.failure_of(error))
                return
            websocket = service._websocket
            if websocket is not None and websocket.close_code is not None:
                # The server closed the socket cleanly (1000, 1001...).
                await report(classify_close(websocket.close_code, websocket.close_reason or ""))

        async def handle_error(evt: Any) -> None:
            # "Most errors are recoverable and the session will stay open", but
            # the stock stops reading after one: the session is lost to it.
            await report(OpenAIRealtime.failure_of(evt))

        session_updated = service._handle_evt_session_updated

        watched: object = None  # the socket watched for the server's close frame

        async def closed_by_server(close: Close) -> None:
            await report(classify_close(close.code, close.reason))

        async def handle_session_updated(evt: Any) -> None:
            nonlocal watched
            websocket = service._websocket
            if websocket is not None and websocket is not watched:
                # A close the server starts is told from its frame, once the
                # events before it are handled (not a round trip later).
                watched = websocket
                watch_close(websocket, closed_by_server, service)
            await session_updated(evt)
            await ready()

        service._receive_task_handler = receive_observed
        service._handle_evt_error = handle_error
        service._handle_evt_session_updated = handle_session_updated

    @staticmethod
    def failure_of(error: Any) -> Failure:
        """Classify what ended a session: a closed socket, or an ``error`` event."""
        details = getattr(error, "error", None)
        if details is not None and hasattr(details, "type"):
            kind, code = str(details.type or ""), str(details.code or "")
            message = str(details.message or "")[:160]
            label = f"error event {kind}{f' ({code})' if code else ''}: {message}"
            if code == "session_expired":
                return Failure(Verdict.TRANSIENT, "connectivity", f"{label}: the session reached its limit")
            if kind in ("server_error", "rate_limit_error") or "rate_limit" in code:
                category = "rate_limit" if "rate" in kind or "rate" in code else "server"
                return Failure(Verdict.TRANSIENT, category, label)
            if kind in ("authentication_error", "permission_error") or code in ("invalid_api_key",):
                return Failure(Verdict.PERMANENT, "authentication", label)
            return Failure(Verdict.SUSPECT, "invalid_request", label)
        if isinstance(error, BaseException):
            failure = classify_exception(error)
            if failure is not None:
                return failure
        if isinstance(error, ConnectionClosed):  # pragma: no cover - classified above
            return classify_close(1006)
        return Failure(Verdict.TRANSIENT, "connectivity", f"session failed: {type(error).__name__}")

    @staticmethod
    def is_ready(service: Any) -> bool:
        """Whether the session is configured and takes input."""
        return bool(service._api_session_ready) and service._websocket is not None

    @staticmethod
    def speaks(service: Any) -> bool:
        """Whether replies are spoken (the audio modality), not written."""
        return bool(service._is_modality_enabled("audio"))

    @staticmethod
    def resumable_handle(service: Any) -> str | None:
        """None: OpenAI Realtime sessions cannot be resumed."""
        return None

    @staticmethod
    def issued_handle(message: Any) -> bool:
        """Never: there are no resumption handles."""
        return False

    @staticmethod
    def goes_away(message: Any) -> bool:
        """Never: the server announces no end (the session limit is the shell's to watch)."""
        return False

    @staticmethod
    def resume_with(service: Any, handle: str) -> None:
        """Not supported (never called: :attr:`resumes` is False)."""
        raise NotImplementedError("OpenAI Realtime sessions cannot be resumed")

    @staticmethod
    def add_instruction(service: Any, text: str) -> None:
        """Append ``text`` to the instructions ``service`` (not yet set up) configures its session with."""
        settings = service._settings
        base = settings.system_instruction
        settings.system_instruction = f"{base}\n\n{text}" if base else text
        properties = settings.session_properties
        if properties is not None and hasattr(properties, "instructions"):
            properties.instructions = settings.system_instruction

    @staticmethod
    async def adopt(service: Any, context: Any) -> None:
        """Make the shell's context the session's own, with its tools and instructions, sending no message."""
        service._context = context
        service._llm_needs_conversation_setup = False
        await service._process_completed_function_calls(send_new_results=False)
        await service._send_session_update()

    @staticmethod
    async def seed(service: Any, context: Any, *, answer: bool) -> None:
        """Give a fresh session the conversation in ``context`` (an ``LLMContext``), item by item.

        With ``answer`` a response is asked for: the model answers the user's
        last turn, or goes on with its own when the conversation ends with it.
        """
        from pipecat.services.openai.realtime import events

        await OpenAIRealtime.adopt(service, context)
        items, running = _items(context.get_messages())
        for item in items:
            service._messages_added_manually[item.id] = True
            await service.send_client_event(events.ConversationItemCreateEvent(item=item))
        # A result still to come answers its call on this session.
        service._open_function_calls.update(running)
        if answer:
            await service._create_response()

    @staticmethod
    async def send_turns(service: Any, messages: list[dict[str, Any]], *, answer: bool) -> None:
        """Not supported (never called: :attr:`resumes` is False)."""
        raise NotImplementedError("OpenAI Realtime sessions cannot be resumed")

    @staticmethod
    async def ask_again(service: Any, heard: str) -> bool:
        """Not done on a live session: the shell moves to a fresh one instead.

        Returns:
            False.
        """
        return False

    @staticmethod
    def name_tool_calls(service: Any, names: dict[str, str]) -> None:
        """Nothing to do: a result carries its call id, which is all the API needs."""

    @staticmethod
    def function_calls_running(service: Any) -> bool:
        """Whether a function call is still running on ``service``."""
        return bool(service._function_call_tasks)


def _items(messages: list[Any]) -> tuple[list[Any], set[str]]:
    """Conversation items for context ``messages``, and the calls still waiting for their result."""
    from pipecat.services.openai.realtime import events

    items: list[Any] = []
    outputs: dict[str, str] = {}
    calls: list[str] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            continue  # provider-specific messages are not for this API
        role = message.get("role")
        content = message.get("content")
        if role == "system" and index == 0:
            continue  # the session's instructions
        if role == "assistant" and message.get("tool_calls"):
            for call in message["tool_calls"]:
                function = call.get("function", {})
                items.append(
                    events.ConversationItem(
                        type="function_call",
                        call_id=call.get("id"),
                        name=function.get("name"),
                        arguments=function.get("arguments") or "{}",
                    )
                )
                calls.append(str(call.get("id")))
            continue
        if role == "tool":
            call_id = str(message.get("tool_call_id"))
            text = _text(content)
            if text != _IN_PROGRESS:
                outputs[call_id] = text
                items.append(
                    events.ConversationItem(type="function_call_output", call_id=call_id, output=text)
                )
            continue
        text = _text(content)
        if not text.strip():
            continue
        if role == "assistant":
            part = events.ItemContent(type="output_text", text=text)
            items.append(events.ConversationItem(type="message", role="assistant", content=[part]))
        else:
            part = events.ItemContent(type="input_text", text=text)
            speaker: Literal["user", "system"] = "user" if role == "user" else "system"
            items.append(events.ConversationItem(type="message", role=speaker, content=[part]))
    return items, {call for call in calls if call not in outputs}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict)).strip()
    return "" if content is None else json.dumps(content)
