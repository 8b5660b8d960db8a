"""Every reach into GeminiLiveLLMService's internals, in one place (checked against Pipecat 1.14).

The stock service keeps its session, its reconnect loop and its tool-call
bookkeeping private, and offers no hook to take recovery over. Rather than
scatter private names through the shell, this module is the only one that
touches them; :func:`check` verifies at construction that they are all there,
so a Pipecat release that renames one fails loudly, at once, with the name.

What is used, and why:

* ``_handle_connection_error(error) -> bool`` - returning False stops the
  stock reconnect; the failure is reported to the shell instead.
* ``_connection_task_handler(config)`` - a connection refused before
  ``setupComplete`` raises out of it unreported; the shell hears of it.
* ``_handle_session_ready(session)`` - when the session takes input.
* ``_handle_server_message(message)`` - ``goAway`` (ignored by the stock).
* ``_connect(session_resumption_handle)`` and ``_session_resumption_handle``
  - a fresh instance resumes the lost session.
* ``_session``, ``_ready_for_realtime_input``, ``_context``,
  ``_process_completed_function_calls``, ``_tool_call_id_to_name``,
  ``_function_call_tasks``, ``_inference_on_context_initialization``,
  ``_is_gemini_3`` - adopting a context without re-seeding, sending a turn,
  naming a tool result, waiting for a running tool.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

__all__ = [
    "adopt_context",
    "check",
    "function_calls_running",
    "hook",
    "is_ready",
    "name_tool_calls",
    "resumable_handle",
    "resume_with",
    "send_turn",
    "set_answer_on_seed",
]

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
)


def check(service: object) -> None:
    """Raise if ``service`` lacks an internal this module relies on.

    Raises:
        TypeError: Naming the missing attribute and the Pipecat version it was checked against.
    """
    missing = [name for name in _REQUIRED if not hasattr(service, name)]
    if missing:
        raise TypeError(
            f"{type(service).__name__} lacks {', '.join(missing)}; pipecat_resilient supports "
            "GeminiLiveLLMService as shipped in pipecat-ai 1.14 (please report this)"
        )


def hook(
    service: Any,
    *,
    failed: Callable[[BaseException], Awaitable[None]],
    ready: Callable[[], Awaitable[None]],
    message: Callable[[Any], Awaitable[None]],
) -> None:
    """Take the connection over from ``service``.

    Args:
        service: A GeminiLiveLLMService, before it is set up.
        failed: Called with the error when the connection fails or is refused.
        ready: Called once a session is up (after the stock service set it up).
        message: Called with every server message, after the stock service
            handled it.
    """

    async def handle_connection_error(error: Exception) -> bool:
        await failed(error)
        return False  # never reconnect on its own

    task_handler = service._connection_task_handler

    async def connection_task_handler(config: Any) -> None:
        try:
            await task_handler(config)
        except Exception as error:  # refused before setupComplete, or broken setup
            await failed(error)

    session_ready = service._handle_session_ready

    async def handle_session_ready(session: Any) -> None:
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


def resumable_handle(service: Any) -> str | None:
    """The latest handle the server said can resume this session."""
    handle = getattr(service, "_session_resumption_handle", None)
    return handle if isinstance(handle, str) and handle else None


def resume_with(service: Any, handle: str) -> None:
    """Make ``service`` (not yet set up) connect by resuming the session ``handle`` names."""
    service._session_resumption_handle = handle
    connect = service._connect

    async def connect_resuming(session_resumption_handle: str | None = None) -> None:
        await connect(
            session_resumption_handle=session_resumption_handle or service._session_resumption_handle
        )

    service._connect = connect_resuming


def is_ready(service: Any) -> bool:
    """Whether the session takes realtime input."""
    return service._session is not None and bool(service._ready_for_realtime_input)


async def adopt_context(service: Any, context: Any) -> None:
    """Give a resumed session its context without sending it again (the server has it)."""
    service._context = context
    await service._process_completed_function_calls(send_new_results=False)


def set_answer_on_seed(service: Any, answer: bool) -> None:
    """Whether seeding a fresh session's history makes the model answer its last turn."""
    service._inference_on_context_initialization = answer


def name_tool_calls(service: Any, names: dict[str, str]) -> None:
    """Tell ``service`` which function each tool call id belongs to (so its result carries the name)."""
    service._tool_call_id_to_name.update(names)


def function_calls_running(service: Any) -> bool:
    """Whether a function call is still running on ``service``."""
    return bool(service._function_call_tasks)


async def send_turn(service: Any, text: str) -> None:
    """Send ``text`` as a complete user turn, so the model answers it."""
    from google.genai.types import Content, Part

    session = service._session
    if session is None:
        return
    await session.send_client_content(
        turns=[Content(role="user", parts=[Part(text=text)])], turn_complete=True
    )
    if getattr(service, "_is_gemini_3", False):
        # Gemini 3 runs no inference without a realtime input (as the stock does).
        await session.send_realtime_input(text=" ")
