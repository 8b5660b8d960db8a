"""A local emulator of OpenAI's streaming chat-completions API.

Point the stock ``OpenAILLMService`` at it with ``base_url=emulator.base_url``
and it answers like the real API: ``POST /v1/chat/completions`` with
``"stream": true`` gets server-sent events, one ``chat.completion.chunk`` per
token, then a chunk with ``finish_reason``, a usage chunk when
``stream_options.include_usage`` is set, and ``data: [DONE]``. Replies are
scripted and deterministic, and faults come from a
:class:`~pipecat_resilient.testing.faults.FaultPlan`.

Conversations hold any number of turns. Replies:

* a request that asks to continue a cut answer - it ends with the cut
  assistant answer and a user message that is the continuation instruction
  (``continue_marker``: by default
  :data:`~pipecat_resilient.policy.CONTINUE_INSTRUCTION`, what
  :class:`~pipecat_resilient.llm.ResilientLLM` sends after a drop) - is
  answered with the rest of the answer the conversation before it would get,
  after repeating its last ``repeat_on_continue`` words, like a model that
  does not quite follow the instruction (:attr:`ChatRequest.cut_answer` holds
  the cut answer);
* a request whose messages after the last user message hold ``tool`` results
  (:attr:`ChatRequest.continuation`) is answered with text that quotes them:
  ``"get_weather returned {"conditions": "sunny"}."``;
* any other request is a new turn, answered by the text of its last user
  message, whatever earlier turns precede it: a scripted reply from
  ``replies`` (text, or one or more :class:`ChatToolCall`, streamed as
  ``tool_calls`` deltas with the id and name first and the JSON arguments
  split over later chunks), otherwise ``"You said: <text>. That is all."``.
  An assistant message before the last user message is an earlier turn, not
  a cut answer: only the continuation instruction asks to continue.

Faults count *requests* where the websocket emulators count connections: the
``connection`` field of a :class:`~.faults.Fault` is the request's index (0-based,
in arrival order, refused ones and the SDK's own retries included; ``None``
for every request), whatever the request is (a first turn, a later turn, a
tool result or a continuation). Kinds and triggers:

* ``refuse(status, headers=...)``: answer with that HTTP status and an
  OpenAI-style error body (500, 503, 429 with ``Retry-After``, 401, ...);
* ``abort()``: drop the TCP connection without finishing the response;
* ``stall()``: stop sending and keep the connection open;
* ``close()``: end the HTTP response cleanly but early, with no
  ``finish_reason`` and no ``[DONE]`` (a truncating proxy); the code is ignored;
* ``delay_first_audio(seconds)``: wait before the first chunk (a slow
  time-to-first-token, not a failure).

``after_audio_chunks=N`` counts the chunks that carry text or tool-call data
(not the opening role chunk nor the closing ones): the fault happens once N of
them were sent, so N=0 is right after the response headers and N equal to the
token count is after the whole text but before ``finish_reason``. With no
trigger the fault happens before the response headers, so the SDK's
``create()`` is what waits or fails. ``after_seconds`` counts from the
request's arrival. ``after_text_messages`` and ``go_away`` have no HTTP
meaning and are rejected.

Outages (:meth:`~.outage.OutageSwitch.outage`, :meth:`~.outage.OutageSwitch.restore`;
see :mod:`.outage`) take the whole API down for a while, before any plan,
key or body check: every request is refused with the outage's status and an
OpenAI error body (``"refuse"``), gets its 200 headers and never a byte of
body (``"stall"``), or never gets a status line (``"hang"``); the requests in
flight when one starts are cut (TCP abort) unless ``drop_existing=False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from loguru import logger

from pipecat_resilient.policy import CONTINUE_INSTRUCTION
from pipecat_resilient.testing.faults import Fault, FaultKind, FaultPlan
from pipecat_resilient.testing.outage import OutageMode, OutageSwitch, answer_http_outage

__all__ = ["ChatRequest", "OpenAIEmulator", "ChatToolCall"]

# A word with the whitespace before it, or one punctuation mark with its
# whitespace, or trailing whitespace: pieces that join back into the text and
# are about as small as the real tokenizer's.
_TOKEN = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")

# Bodies of the errors the real API returns, keyed by status: (type, code, message).
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}

_UNSUPPORTED = {FaultKind.GO_AWAY}

# How many 1 ms polls an abort waits for the send buffer to empty (1 s at most).
_ABORT_FLUSH_POLLS = 1000


def tokens(text: str) -> list[str]:
    """Split ``text`` into the pieces the emulator streams, one per chunk."""
    return _TOKEN.findall(text)


@dataclass(frozen=True, slots=True)
class ChatToolCall:
    """A tool call the emulator answers with.

    Parameters:
        name: The function name.
        arguments: The arguments, sent as JSON split over several chunks.
        id: The tool call id; ``call_<request>_<n>`` when None.
    """

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None


Reply = str | ChatToolCall | Sequence[ChatToolCall]
"""What a scripted user text is answered with."""


@dataclass
class ChatRequest:
    """One request the emulator received, for tests to inspect.

    Parameters:
        index: The request's number (0-based, in arrival order).
        body: The parsed JSON body.
        retry_count: The SDK's ``x-stainless-retry-count`` header (0 on a
            first attempt), or None without it.
        status: The HTTP status answered (200 for a stream).
        reply: The text planned for the answer ("" for a tool call).
        tool_calls: The tool calls planned for the answer.
        sent: The text pieces actually sent.
        chunks_sent: Chunks with text or tool-call data sent.
        fault: The fault carried out on it, if any.
        faulted_at: ``time.monotonic()`` when the fault was carried out.
        completed: Whether ``[DONE]`` was sent.
        closed: Whether the response is over, one way or another.
        received_at: ``time.monotonic()`` at arrival.
        cut_answer: The cut assistant answer the request asked to continue
            (its last message is the continuation instruction), else None.
        outage: The mode of the outage that answered it, if one did.
        cut_by_outage: Whether an outage that started while it was in flight cut it.
    """

    index: int
    body: dict[str, Any]
    retry_count: int | None = None
    status: int = 200
    reply: str = ""
    tool_calls: list[ChatToolCall] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    chunks_sent: int = 0
    fault: Fault | None = None
    faulted_at: float | None = None
    completed: bool = False
    closed: bool = False
    received_at: float = field(default_factory=time.monotonic)
    cut_answer: str | None = None
    outage: OutageMode | None = None
    cut_by_outage: bool = False

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The request's messages."""
        return list(self.body.get("messages") or [])

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The tools offered, as sent."""
        return list(self.body.get("tools") or [])

    @property
    def tool_names(self) -> list[str]:
        """The names of the functions offered."""
        return [t.get("function", {}).get("name", "") for t in self.tools]

    @property
    def stream(self) -> bool:
        """Whether a stream was asked for."""
        return bool(self.body.get("stream"))

    @property
    def user_text(self) -> str | None:
        """The text of the last user message, if any."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return _content_text(message.get("content"))
        return None

    @property
    def tool_results(self) -> list[tuple[str, str]]:
        """``(function name, content)`` of the tool messages after the last user message."""
        messages = self.messages
        names: dict[str, str] = {}
        for message in messages:
            for call in message.get("tool_calls") or []:
                names[call.get("id", "")] = call.get("function", {}).get("name", "")
        results: list[tuple[str, str]] = []
        for message in reversed(messages):
            role = message.get("role")
            if role == "user":
                break
            if role == "tool":
                name = names.get(message.get("tool_call_id", ""), "")
                results.append((name, _content_text(message.get("content"))))
        return list(reversed(results))

    @property
    def continuation(self) -> bool:
        """Whether it carries tool results to answer (a second request of a tool call)."""
        return bool(self.tool_results)

    @property
    def text_sent(self) -> str:
        """The reply text that actually went out."""
        return "".join(self.sent)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else json.dumps(content)


def _check_reply(reply: object) -> None:
    """Raise TypeError unless ``reply`` is a text, a ChatToolCall of this module, or a list of them."""
    if isinstance(reply, str | ChatToolCall):
        return
    if isinstance(reply, Sequence) and reply and all(isinstance(c, ChatToolCall) for c in reply):
        return
    raise TypeError(
        "a scripted reply is a str, a pipecat_resilient.testing.openai.ChatToolCall or a list of them, "
        f"not {reply!r}"
    )


def _default_reply(text: str) -> str:
    return f"You said: {text}. That is all."


def _default_tool_reply(results: Sequence[tuple[str, str]]) -> str:
    return " ".join(f"{name} returned {content}." for name, content in results)


class _Aborted(Exception):
    """The connection was dropped on purpose; the handler just returns."""


class _Closed(Exception):
    """The response was ended early on purpose."""


@dataclass
class _Run:
    """Fault bookkeeping of one request."""

    record: ChatRequest
    faults: list[Fault]
    deadline: float | None  # loop time of the earliest after_seconds fault
    timed: Fault | None

    def due(self, now: float) -> Fault | None:
        """The chunk-count or time fault that is due now, if any."""
        for fault in self.faults:
            if fault.after_audio_chunks is not None and fault.after_audio_chunks <= self.record.chunks_sent:
                return fault
        if self.deadline is not None and now >= self.deadline:
            return self.timed
        return None


class OpenAIEmulator(OutageSwitch):
    """Emulates OpenAI's chat-completions API on 127.0.0.1, on an ephemeral port.

    Take it down with :meth:`outage` and bring it back with :meth:`restore`
    (see :mod:`pipecat_resilient.testing.outage`).

    Example::

        plan = FaultPlan(Fault.abort(after_audio_chunks=3))
        replies = {"weather?": ChatToolCall("get_weather", {"city": "Paris"})}
        async with OpenAIEmulator(plan=plan, replies=replies) as emu:
            llm = OpenAILLMService(api_key="test", base_url=emu.base_url)
            ...
            assert emu.requests[0].text_sent == "You said:"

    Args:
        plan: Faults to inject, by request index; none when omitted.
        api_key: When set, requests must carry ``Authorization: Bearer <key>``
            or get HTTP 401. Any key is accepted when None.
        replies: Scripted answers by user text: text, or tool calls.
        default_reply: Answer to any other user text.
        tool_reply: Answer to a continuation, from its ``(name, content)`` results.
        chunk_interval: Seconds between chunks; 0 sends them as fast as they are read.
        repeat_on_continue: Words of the cut answer a continuation repeats first.
        continue_marker: The user text that asks to continue the assistant
            answer before it (``ReplayPolicy.continue_instruction``; the default
            instruction when omitted).
    """

    name = "openai"

    def __init__(
        self,
        *,
        plan: FaultPlan | None = None,
        api_key: str | None = None,
        replies: Mapping[str, Reply] | None = None,
        default_reply: Callable[[str], str] = _default_reply,
        tool_reply: Callable[[Sequence[tuple[str, str]]], str] = _default_tool_reply,
        chunk_interval: float = 0.0,
        repeat_on_continue: int = 0,
        continue_marker: str = CONTINUE_INSTRUCTION,
    ) -> None:
        """Create a stopped emulator."""
        super().__init__()
        if not isinstance(continue_marker, str) or not continue_marker.strip():
            raise ValueError("continue_marker must be a non-empty string")
        self.repeat_on_continue = repeat_on_continue
        self.continue_marker = continue_marker
        self.plan = plan or FaultPlan()
        for fault in self.plan:
            self._check_fault(fault)
        self.api_key = api_key
        self.replies: dict[str, Reply] = dict(replies or {})
        for reply in self.replies.values():
            _check_reply(reply)
        self.default_reply = default_reply
        self.tool_reply = tool_reply
        self.chunk_interval = chunk_interval
        self.requests: list[ChatRequest] = []
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._changed = asyncio.Condition()
        self._in_flight: dict[int, tuple[web.Request, ChatRequest]] = {}

    @staticmethod
    def _check_fault(fault: Fault) -> None:
        if fault.kind in _UNSUPPORTED:
            raise ValueError(f"{fault.kind.value} has no meaning for HTTP")
        if fault.after_text_messages is not None:
            raise ValueError("after_text_messages has no meaning for HTTP; use after_audio_chunks")

    # Lifecycle.

    async def start(self) -> OpenAIEmulator:
        """Start listening on an ephemeral port of 127.0.0.1."""
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        # handler_cancellation: a client that hangs up on a stalled stream
        # cancels its handler, as it would free a worker on the real API.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return self

    async def stop(self) -> None:
        """Stop the server, ending stalled responses and dropping open connections.

        An outage under way ends now.
        """
        self._stopping.set()
        self._end_outage_at_stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> OpenAIEmulator:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The port the emulator listens on."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError(f"{self.name} emulator is not running")
        return int(self._runner.addresses[0][1])

    @property
    def base_url(self) -> str:
        """The ``base_url`` to give the OpenAI client (``http://127.0.0.1:PORT/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    # Waiting.

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; checked on every request, chunk and fault.

        Raises:
            TimeoutError: If it does not hold within ``timeout`` seconds.
        """
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    async def wait_for_requests(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least ``count`` requests have arrived."""
        await self.wait_until(lambda: len(self.requests) >= count, timeout)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # Replies.

    def plan_reply(self, record: ChatRequest) -> None:
        """Fill in ``record.reply`` or ``record.tool_calls`` from the script."""
        record.cut_answer = self._cut_answer(record.messages)
        if record.cut_answer is not None:
            rest = self._rest_of_cut_answer(record, record.cut_answer)
            if rest is not None:
                record.reply = rest
                return
        if record.continuation:
            record.reply = self.tool_reply(record.tool_results)
            return
        text = record.user_text or ""
        scripted = self.replies.get(text)
        if scripted is None:
            record.reply = self.default_reply(text)
        elif isinstance(scripted, str):
            record.reply = scripted
        elif isinstance(scripted, ChatToolCall):
            record.tool_calls = [scripted]
        else:
            _check_reply(scripted)
            record.tool_calls = list(scripted)

    def _cut_answer(self, messages: Sequence[Mapping[str, Any]]) -> str | None:
        """The assistant answer ``messages`` ask to continue, if they ask to continue one.

        Only the continuation instruction asks that: a conversation of several
        turns also has an assistant message before its last user message.
        """
        if len(messages) < 3 or messages[-1].get("role") != "user" or messages[-2].get("role") != "assistant":
            return None
        if _content_text(messages[-1].get("content")).strip() != self.continue_marker.strip():
            return None
        cut = _content_text(messages[-2].get("content"))
        if not cut or messages[-2].get("tool_calls"):
            return None
        return cut

    def _rest_of_cut_answer(self, record: ChatRequest, cut: str) -> str | None:
        """The rest of ``cut``: what the conversation before it would get, after it."""
        messages = record.messages
        earlier = ChatRequest(index=record.index, body={**record.body, "messages": messages[:-2]})
        self.plan_reply(earlier)
        whole = earlier.reply
        if earlier.tool_calls or not whole.startswith(cut):
            return None
        repeated = " ".join(cut.split()[-self.repeat_on_continue :]) if self.repeat_on_continue else ""
        rest = whole[len(cut) :]
        return (
            (" " + repeated if repeated and not cut.endswith(" ") else repeated) + rest if repeated else rest
        )

    def _deltas(self, record: ChatRequest) -> list[tuple[dict[str, Any], str]]:
        """The counted deltas of the answer, each with the reply text it carries."""
        if not record.tool_calls:
            return [({"content": piece}, piece) for piece in tokens(record.reply)]
        deltas: list[tuple[dict[str, Any], str]] = []
        for n, call in enumerate(record.tool_calls):
            call_id = call.id or f"call_{record.index}_{n}"
            head = {
                "index": n,
                "id": call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            first: dict[str, Any] = {"tool_calls": [head]}
            if n == 0:
                # The real API opens a tool-call answer with the role in the same chunk.
                first = {"role": "assistant", "content": None, "tool_calls": [head], "refusal": None}
            deltas.append((first, ""))
            for piece in tokens(json.dumps(dict(call.arguments))):
                deltas.append(({"tool_calls": [{"index": n, "function": {"arguments": piece}}]}, ""))
        return deltas

    # HTTP.

    async def _not_found(self, request: web.Request) -> web.Response:
        return self._error(404, f"Unknown request URL: {request.method} {request.path}.")

    def _error(
        self, status: int, message: str | None = None, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        kind, code, default = _ERRORS.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None, "Error.")
        )
        body = {"error": {"message": message or default, "type": kind, "param": None, "code": code}}
        return web.json_response(body, status=status, headers=dict(headers or {}))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        retry = request.headers.get("x-stainless-retry-count")
        record = ChatRequest(
            index=len(self.requests),
            body=body if isinstance(body, dict) else {},
            retry_count=int(retry) if retry and retry.isdigit() else None,
        )
        self.requests.append(record)
        self._in_flight[record.index] = (request, record)
        try:
            outage = self._outage_for(record.index)
            if outage is not None:
                record.outage = outage.mode
                if outage.mode != "hang":
                    record.status = outage.status if outage.mode == "refuse" else 200
                await self._notify()
                return await answer_http_outage(
                    request,
                    outage,
                    refusal=lambda status, headers: self._error(status, None, headers),
                    content_type="text/event-stream; charset=utf-8" if record.stream else "application/json",
                    stopping=self._stopping.wait,
                )
            return await self._answer(request, record)
        except _Aborted:
            # aiohttp must not try to finish a response on a dropped transport.
            raise asyncio.CancelledError() from None
        finally:
            self._in_flight.pop(record.index, None)
            record.closed = True
            self._outage_changed()
            await self._notify()

    def _cut_open_connections(self) -> list[int]:
        """Abort the connection of every request in flight; returns their indices."""
        cut = sorted(self._in_flight)
        for request, record in self._in_flight.values():
            record.cut_by_outage = True
            if request.transport is not None:
                request.transport.abort()
        return cut

    async def _answer(self, request: web.Request, record: ChatRequest) -> web.StreamResponse:
        faults = [f for f in self.plan.for_connection(record.index) if f.kind not in _UNSUPPORTED]
        refusal = next((f for f in faults if f.kind is FaultKind.REFUSE), None)
        await self._notify()
        if refusal is not None:
            record.status = refusal.status
            record.fault = refusal
            record.faulted_at = time.monotonic()
            logger.debug(f"{self.name}: request {record.index}: refused with {refusal.status}")
            return self._error(refusal.status, refusal.reason or None, refusal.headers)
        # The key itself is never logged.
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            record.status = 401
            logger.debug(f"{self.name}: request {record.index}: refused with 401 (api key)")
            return self._error(401)
        if not record.body.get("messages"):
            record.status = 400
            return self._error(400, "'messages' is a required property.")
        self.plan_reply(record)
        loop = asyncio.get_running_loop()
        timed = [
            f for f in faults if f.after_seconds is not None and f.kind is not FaultKind.DELAY_FIRST_AUDIO
        ]
        timed.sort(key=lambda f: f.after_seconds or 0.0)
        run = _Run(
            record=record,
            faults=[
                f
                for f in faults
                if f.after_audio_chunks is not None and f.kind is not FaultKind.DELAY_FIRST_AUDIO
            ],
            deadline=loop.time() + (timed[0].after_seconds or 0.0) if timed else None,
            timed=timed[0] if timed else None,
        )
        delay = sum(f.seconds for f in faults if f.kind is FaultKind.DELAY_FIRST_AUDIO)
        immediate = next(
            (f for f in faults if f.immediate and f.kind is not FaultKind.DELAY_FIRST_AUDIO), None
        )
        if immediate is not None and immediate.kind is not FaultKind.CLOSE:
            await self._carry_out(request, run, immediate, None)
        if not record.stream:
            return await self._answer_whole(request, run, delay)
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "x-request-id": f"req_emu{record.index}",
            },
        )
        await response.prepare(request)
        with contextlib.suppress(_Closed):
            if immediate is not None:
                # An immediate CLOSE: a 200 with an empty stream.
                await self._carry_out(request, run, immediate, response)
            await self._stream(request, run, response, delay)
        return response

    async def _stream(
        self, request: web.Request, run: _Run, response: web.StreamResponse, delay: float
    ) -> None:
        record = run.record
        loop = asyncio.get_running_loop()
        created = int(time.time())
        base = {
            "id": f"chatcmpl-emu{record.index}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": str(record.body.get("model", "gpt-4.1")),
            "system_fingerprint": "fp_emulator",
        }
        include_usage = bool((record.body.get("stream_options") or {}).get("include_usage"))

        def chunk(
            delta: dict[str, Any] | None, finish: str | None = None, usage: dict[str, Any] | None = None
        ) -> bytes:
            choices = (
                []
                if delta is None
                else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            )
            payload = {**base, "choices": choices, "usage": usage}
            return f"data: {json.dumps(payload)}\n\n".encode()

        async def checkpoint(pause: float) -> None:
            """Wait ``pause`` seconds, carrying out any fault that falls due."""
            end = loop.time() + pause
            while True:
                fault = run.due(loop.time())
                if fault is not None:
                    await self._carry_out(request, run, fault, response)
                remaining = end - loop.time()
                if remaining <= 0:
                    return
                wake = end if run.deadline is None else min(end, run.deadline)
                await asyncio.sleep(max(0.0, wake - loop.time()))

        deltas = self._deltas(record)
        await checkpoint(delay)
        if not record.tool_calls:
            # The real API opens a text answer with an empty content and the role.
            await response.write(chunk({"role": "assistant", "content": "", "refusal": None}))
        for n, (delta, text) in enumerate(deltas):
            await checkpoint(self.chunk_interval if n else 0.0)
            await response.write(chunk(delta))
            record.chunks_sent += 1
            record.sent.append(text)
            await self._notify()
        await checkpoint(0.0)
        finish = "tool_calls" if record.tool_calls else "stop"
        await response.write(chunk({}, finish))
        if include_usage:
            prompt = sum(len(tokens(_content_text(m.get("content")))) for m in record.messages)
            completion = len(deltas)
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
            }
            await response.write(chunk(None, usage=usage))
        await response.write(b"data: [DONE]\n\n")
        record.completed = True
        await response.write_eof()

    async def _answer_whole(self, request: web.Request, run: _Run, delay: float) -> web.Response:
        """Answer a request without ``stream`` (``run_inference``).

        Only refusals, delays and faults without a trigger apply to it.
        """
        record = run.record
        if delay:
            await asyncio.sleep(delay)
        message: dict[str, Any] = {"role": "assistant", "content": record.reply or None, "refusal": None}
        if record.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id or f"call_{record.index}_{n}",
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.dumps(dict(call.arguments))},
                }
                for n, call in enumerate(record.tool_calls)
            ]
        record.sent = [record.reply]
        record.completed = True
        return web.json_response(
            {
                "id": f"chatcmpl-emu{record.index}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": str(record.body.get("model", "gpt-4.1")),
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": "tool_calls" if record.tool_calls else "stop",
                    }
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            }
        )

    async def _carry_out(
        self, request: web.Request, run: _Run, fault: Fault, response: web.StreamResponse | None
    ) -> None:
        """Do what ``fault`` says. It always raises: _Aborted, or _Closed once the response ended."""
        record = run.record
        record.fault = fault
        record.faulted_at = time.monotonic()
        when = "before the response" if response is None else f"after {record.chunks_sent} chunks"
        logger.debug(f"{self.name}: request {record.index}: {fault.kind.value} {when}")
        await self._notify()
        if fault.kind is FaultKind.ABORT:
            transport = request.transport
            if transport is not None:
                # abort() discards what is still buffered; let the chunks
                # counted as sent reach the socket first.
                for _ in range(_ABORT_FLUSH_POLLS):
                    if transport.get_write_buffer_size() == 0:
                        break
                    await asyncio.sleep(0.001)
                transport.abort()
            raise _Aborted()
        if fault.kind is FaultKind.STALL:
            # Half-open: nothing more is sent, the socket stays up until the
            # client hangs up (which cancels this handler) or the emulator stops.
            await self._stopping.wait()
            if request.transport is not None:
                request.transport.abort()
            raise _Aborted()
        if fault.kind is FaultKind.CLOSE:
            if response is None:
                raise _Aborted()
            # A clean end of the chunked body, with no finish_reason and no [DONE].
            await response.write_eof()
            raise _Closed()
        raise RuntimeError(f"{fault.kind.value} cannot be carried out mid-request")
