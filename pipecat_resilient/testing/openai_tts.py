"""A local emulator of OpenAI's text-to-speech HTTP API (``POST /v1/audio/speech``).

Point the stock ``OpenAITTSService`` at it with ``base_url=emulator.base_url``
and it answers like the real API, with speech-code audio
(:mod:`pipecat_resilient.testing.speech`) instead of a voice, so a test can
decode what a listener heard. Faults come from a
:class:`~pipecat_resilient.testing.faults.FaultPlan`.

Protocol, after OpenAI's API reference for "Create speech":

* request: ``POST /v1/audio/speech`` with ``Authorization: Bearer KEY`` and a
  JSON body ``{"model", "input", "voice", "response_format", "speed"?,
  "instructions"?, "stream_format"?}``. ``voice`` is a built-in name
  (:data:`VOICES`) or a custom voice ``{"id": ...}``; ``input`` holds at most
  4096 characters. The emulator can only speak ``response_format: "pcm"``
  (raw 24 kHz, 16-bit, little-endian, mono) and ``stream_format: "audio"``
  (the default); anything else is refused with 400, like a missing field,
  an unknown voice or an input that is too long. ``speed`` and
  ``instructions`` are recorded and do not change the audio (a decoder needs
  a fixed duration per character).
* answer: ``200`` with ``Content-Type: audio/pcm`` and a chunked body: the
  speech code of ``input`` (its spaces included: they take time too), in
  pieces of ``bytes_per_chunk`` bytes that cut through characters, samples
  and words alike; the last piece is shorter. An error is an OpenAI error
  body ``{"error": {"message", "type", "param", "code"}}`` with its status.

Faults count *requests*, like :class:`~.openai.OpenAIEmulator`: the
``connection`` field of a :class:`~.faults.Fault` is the request's index
(0-based, in arrival order, refused requests and the SDK's own retries
included; ``None`` for every request). Kinds:

* ``refuse(status, headers=...)``: that status and an OpenAI error body
  (429 with ``Retry-After``, 500, 503, 401, 400...);
* ``abort()``: reset the TCP connection, before the answer or in the middle
  of its body;
* ``close()``: end the chunked body cleanly but early (a truncating proxy):
  the client sees a normal end with fewer bytes; its code is ignored;
* ``stall()``: stop sending and keep the connection open until the client
  hangs up or the emulator stops;
* ``hang()``: never answer the request at all (no status line);
* ``delay_first_audio(seconds)``: wait that long between the response
  headers and the first audio (a slow time to first byte, not a failure),
  on top of the emulator's ``first_audio_delay``.

``after_audio_chunks=N`` counts the body pieces sent: the fault happens once
N of them are out, so N=0 is right after the response headers and N at or
beyond the piece count is after all the audio but before the end of the
chunked body (a ``close`` there is no fault at all). ``after_seconds``
counts from the request's arrival. With no trigger, ``abort``, ``stall`` and
``hang`` happen before the response headers (the SDK's ``create()`` is what
fails or waits) and ``close`` answers 200 with an empty body.
``after_text_messages``, ``after_audio_received``, ``go_away`` and ``error``
(a provider message on a connection left open) have no meaning for one HTTP
request and are refused when the emulator is built.

Outages (:meth:`~.outage.OutageSwitch.outage`, :meth:`~.outage.OutageSwitch.restore`;
see :mod:`.outage`) take the whole API down for a while, before any plan,
key or body check: every request is refused with the outage's status and an
OpenAI error body (``"refuse"``), gets its 200 ``audio/pcm`` headers and never
a byte of audio (``"stall"``), or never gets a status line (``"hang"``); the
requests in flight when one starts are cut (TCP abort) unless
``drop_existing=False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from loguru import logger

from pipecat_resilient.testing.faults import Fault, FaultKind, FaultPlan
from pipecat_resilient.testing.outage import OutageMode, OutageSwitch, answer_http_outage
from pipecat_resilient.testing.speech import SpeechDecoder, encode, samples_per_char

__all__ = ["SAMPLE_RATE", "VOICES", "OpenAITTSEmulator", "SpeechRequest"]

PATH = "/v1/audio/speech"

# OpenAI's "pcm" format: raw samples at 24 kHz, 16-bit signed, little-endian, mono.
SAMPLE_RATE = 24000

# The documented limit of ``input``, in characters.
MAX_INPUT_CHARS = 4096

VOICES = frozenset(
    {
        "alloy",
        "ash",
        "ballad",
        "cedar",
        "coral",
        "echo",
        "fable",
        "marin",
        "nova",
        "onyx",
        "sage",
        "shimmer",
        "verse",
    }
)
"""The built-in voices the real API accepts by name."""

# Bodies of the errors the real API returns, keyed by status: (type, code, message).
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", None, "Not found."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}

_UNSUPPORTED = {FaultKind.GO_AWAY: "go_away", FaultKind.ERROR: "error"}

# How many 1 ms polls an abort waits for the send buffer to empty (1 s at most).
_ABORT_FLUSH_POLLS = 1000


@dataclass
class SpeechRequest:
    """One request the emulator received, for tests to inspect.

    Parameters:
        index: The request's number (0-based, in arrival order).
        body: The parsed JSON body ({} when it was not JSON).
        retry_count: The SDK's ``x-stainless-retry-count`` header (0 on a
            first attempt), or None without it.
        spc: Samples per character of the audio it was answered with.
        status: The HTTP status answered (200 for audio, 0 if it never was).
        audio: The whole answer planned for ``input`` (b"" when refused).
        bytes_sent: Audio bytes written to the body.
        chunks_sent: Body pieces written.
        fault: The fault carried out on it, if any.
        faulted_at: ``time.monotonic()`` when the fault was carried out.
        completed: Whether the whole audio and the end of the body were sent.
        closed: Whether the response is over, one way or another.
        closed_at: ``time.monotonic()`` when it was over.
        received_at: ``time.monotonic()`` at arrival.
        first_audio_at: ``time.monotonic()`` when the first audio was written.
        outage: The mode of the outage that answered it, if one did.
        cut_by_outage: Whether an outage that started while it was in flight cut it.
    """

    index: int
    body: dict[str, Any]
    retry_count: int | None = None
    spc: int = 1
    status: int = 0
    audio: bytes = field(default=b"", repr=False)
    bytes_sent: int = 0
    chunks_sent: int = 0
    fault: Fault | None = None
    faulted_at: float | None = None
    completed: bool = False
    closed: bool = False
    closed_at: float | None = None
    received_at: float = field(default_factory=time.monotonic)
    first_audio_at: float | None = None
    outage: OutageMode | None = None
    cut_by_outage: bool = False

    @property
    def input(self) -> str:
        """The text to speak ("" when missing)."""
        value = self.body.get("input")
        return value if isinstance(value, str) else ""

    @property
    def voice(self) -> str | None:
        """The voice name, or a custom voice's id."""
        value = self.body.get("voice")
        if isinstance(value, Mapping):
            value = value.get("id")
        return value if isinstance(value, str) else None

    @property
    def model(self) -> str | None:
        """The model asked for."""
        value = self.body.get("model")
        return value if isinstance(value, str) else None

    @property
    def response_format(self) -> str:
        """The audio format asked for (the API's default is mp3)."""
        return str(self.body.get("response_format", "mp3"))

    @property
    def speed(self) -> float | None:
        """The speed asked for, if any (recorded only)."""
        value = self.body.get("speed")
        return float(value) if isinstance(value, int | float) else None

    @property
    def instructions(self) -> str | None:
        """The voice instructions, if any (recorded only)."""
        value = self.body.get("instructions")
        return value if isinstance(value, str) else None

    @property
    def words_sent(self) -> list[str]:
        """The words whose audio was sent in full (what a client could have heard)."""
        decoder = SpeechDecoder(self.spc)
        decoder.feed(self.audio[: self.bytes_sent])
        return decoder.heard()


class _Aborted(Exception):
    """The connection was dropped on purpose; the handler just returns."""


class _Closed(Exception):
    """The response was ended early on purpose."""


@dataclass
class _Run:
    """Fault bookkeeping of one request."""

    record: SpeechRequest
    faults: list[Fault]  # triggered by a chunk count
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


class OpenAITTSEmulator(OutageSwitch):
    """Emulates OpenAI's text-to-speech API on 127.0.0.1, on an ephemeral port.

    Take it down with :meth:`outage` and bring it back with :meth:`restore`
    (see :mod:`pipecat_resilient.testing.outage`).

    Example::

        plan = FaultPlan(Fault.abort(after_audio_chunks=30))
        async with OpenAITTSEmulator(plan=plan) as emulator:
            tts = OpenAITTSService(api_key="test", base_url=emulator.base_url)
            async with Scenario(tts, spc=emulator.samples_per_char()) as run:
                ...
            assert emulator.requests[0].bytes_sent == 30 * emulator.bytes_per_chunk

    Args:
        plan: Faults to inject, by request index; none when omitted.
        api_key: When set, requests must carry ``Authorization: Bearer <key>``
            or get HTTP 401. Any key is accepted when None.
        ms_per_char: Duration of one character of speech code, in milliseconds.
        bytes_per_chunk: Size of each piece of the body, in bytes; any size,
            odd ones included (HTTP does not keep samples whole).
        first_audio_delay: Seconds between the response headers and the first
            audio of every request.
        realtime: Pace the audio at its own duration; when False, send it as
            fast as the client reads it.

    Raises:
        ValueError: On a bad option, or a fault with no meaning for HTTP.
    """

    name = "openai-tts"

    def __init__(
        self,
        *,
        plan: FaultPlan | None = None,
        api_key: str | None = None,
        ms_per_char: float = 10.0,
        bytes_per_chunk: int = 1000,
        first_audio_delay: float = 0.0,
        realtime: bool = False,
    ) -> None:
        """Create a stopped emulator."""
        super().__init__()
        if ms_per_char <= 0:
            raise ValueError("ms_per_char must be positive")
        if bytes_per_chunk < 1:
            raise ValueError("bytes_per_chunk must be at least 1")
        if first_audio_delay < 0:
            raise ValueError("first_audio_delay must not be negative")
        self.plan = plan or FaultPlan()
        for fault in self.plan:
            _check_fault(fault)
        self.api_key = api_key
        self.ms_per_char = ms_per_char
        self.bytes_per_chunk = bytes_per_chunk
        self.first_audio_delay = first_audio_delay
        self.realtime = realtime
        self.requests: list[SpeechRequest] = []
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._changed = asyncio.Condition()
        self._in_flight: dict[int, tuple[web.Request, SpeechRequest]] = {}

    def samples_per_char(self, sample_rate: int = SAMPLE_RATE) -> int:
        """Samples per character at ``sample_rate`` (what a decoder needs)."""
        return samples_per_char(sample_rate, self.ms_per_char)

    @property
    def voices(self) -> list[str | None]:
        """The voice of each request, in arrival order (refused ones included)."""
        return [record.voice for record in self.requests]

    # Lifecycle.

    async def start(self) -> OpenAITTSEmulator:
        """Start listening on an ephemeral port of 127.0.0.1."""
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_post(PATH, self._handle)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        # handler_cancellation: a client that hangs up on a stalled body
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

    async def __aenter__(self) -> OpenAITTSEmulator:
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

    # HTTP.

    async def _not_found(self, request: web.Request) -> web.Response:
        return _error(404, f"Invalid URL ({request.method} {request.path})")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        retry = request.headers.get("x-stainless-retry-count")
        record = SpeechRequest(
            index=len(self.requests),
            body=body if isinstance(body, dict) else {},
            retry_count=int(retry) if retry and retry.isdigit() else None,
            spc=self.samples_per_char(),
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
                    refusal=lambda status, headers: _error(status, None, headers),
                    content_type="audio/pcm",
                    stopping=self._stopping.wait,
                )
            return await self._answer(request, record, parsed=isinstance(body, dict))
        except _Aborted:
            # aiohttp must not try to finish a response on a dropped transport.
            raise asyncio.CancelledError() from None
        finally:
            self._in_flight.pop(record.index, None)
            record.closed = True
            self._outage_changed()
            record.closed_at = time.monotonic()
            await self._notify()

    def _cut_open_connections(self) -> list[int]:
        """Abort the connection of every request in flight; returns their indices."""
        cut = sorted(self._in_flight)
        for request, record in self._in_flight.values():
            record.cut_by_outage = True
            if request.transport is not None:
                request.transport.abort()
        return cut

    async def _answer(
        self, request: web.Request, record: SpeechRequest, *, parsed: bool
    ) -> web.StreamResponse:
        faults = self.plan.for_connection(record.index)
        await self._notify()
        refusal = next((f for f in faults if f.kind is FaultKind.REFUSE), None)
        if refusal is not None:
            record.status = refusal.status
            record.fault = refusal
            record.faulted_at = time.monotonic()
            logger.debug(f"{self.name}: request {record.index}: refused with {refusal.status}")
            return _error(refusal.status, refusal.reason or None, refusal.headers)
        loop = asyncio.get_running_loop()
        timed = sorted(
            (f for f in faults if f.after_seconds is not None and f.kind is not FaultKind.DELAY_FIRST_AUDIO),
            key=lambda f: f.after_seconds or 0.0,
        )
        deadline = None
        if timed:
            # after_seconds counts from the request's arrival, not from now.
            elapsed = time.monotonic() - record.received_at
            deadline = loop.time() + (timed[0].after_seconds or 0.0) - elapsed
        run = _Run(
            record=record,
            faults=[f for f in faults if f.after_audio_chunks is not None],
            deadline=deadline,
            timed=timed[0] if timed else None,
        )
        immediate = next(
            (f for f in faults if f.immediate and f.kind is not FaultKind.DELAY_FIRST_AUDIO), None
        )
        if immediate is not None and immediate.kind is not FaultKind.CLOSE:
            # Before the status line: the SDK's create() is what fails or waits.
            await self._carry_out(request, run, immediate, None)
        # The key itself is never logged.
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            record.status = 401
            logger.debug(f"{self.name}: request {record.index}: refused with 401 (api key)")
            return _error(401)
        problem = _invalid(record.body) if parsed else "We could not parse the JSON body of your request."
        if problem is not None:
            record.status = 400
            logger.debug(f"{self.name}: request {record.index}: refused with 400 ({problem})")
            return _error(400, problem)
        record.audio = encode(record.input, sample_rate=SAMPLE_RATE, ms_per_char=self.ms_per_char)
        delay = self.first_audio_delay + sum(
            f.seconds for f in faults if f.kind is FaultKind.DELAY_FIRST_AUDIO
        )
        response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "audio/pcm", "x-request-id": f"req_emu{record.index}"},
        )
        response.enable_chunked_encoding()
        record.status = 200
        await response.prepare(request)
        with contextlib.suppress(_Closed):
            if immediate is not None:
                # An immediate CLOSE: a 200 with an empty body.
                await self._carry_out(request, run, immediate, response)
            await self._stream(request, run, response, delay)
        return response

    async def _stream(
        self, request: web.Request, run: _Run, response: web.StreamResponse, delay: float
    ) -> None:
        record = run.record
        loop = asyncio.get_running_loop()

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

        await checkpoint(delay)
        audio, size = record.audio, self.bytes_per_chunk
        started = loop.time()
        for offset in range(0, len(audio), size):
            pause = 0.0
            if self.realtime:
                # Each piece goes out once the audio before it has played.
                pause = started + offset / (2 * SAMPLE_RATE) - loop.time()
            await checkpoint(max(0.0, pause))
            piece = audio[offset : offset + size]
            await response.write(piece)
            if record.first_audio_at is None:
                record.first_audio_at = time.monotonic()
            record.chunks_sent += 1
            record.bytes_sent += len(piece)
            await self._notify()
        await checkpoint(0.0)
        await response.write_eof()
        record.completed = True

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
        transport = request.transport
        if fault.kind is FaultKind.ABORT:
            if transport is not None:
                # abort() discards what is still buffered; let the chunks
                # counted as sent reach the socket first.
                for _ in range(_ABORT_FLUSH_POLLS):
                    if transport.get_write_buffer_size() == 0:
                        break
                    await asyncio.sleep(0.001)
                transport.abort()
            raise _Aborted()
        if fault.kind in (FaultKind.STALL, FaultKind.HANG):
            # Nothing more is sent; the socket stays up until the client hangs
            # up (which cancels this handler) or the emulator stops.
            await self._stopping.wait()
            if transport is not None:
                transport.abort()
            raise _Aborted()
        if fault.kind is FaultKind.CLOSE:
            if response is None:
                raise _Aborted()
            # The terminating empty chunk: to the client, a complete body.
            await response.write_eof()
            raise _Closed()
        raise RuntimeError(f"{fault.kind.value} cannot be carried out on an HTTP request")


def _check_fault(fault: Fault) -> None:
    """Raise ValueError for a fault that has no meaning for one HTTP request."""
    if fault.kind in _UNSUPPORTED:
        hint = " (use refuse() for an HTTP error status)" if fault.kind is FaultKind.ERROR else ""
        raise ValueError(f"{_UNSUPPORTED[fault.kind]} has no meaning for an HTTP request{hint}")
    if fault.after_text_messages is not None:
        raise ValueError("after_text_messages has no meaning for HTTP; use after_audio_chunks")
    if fault.after_audio_received is not None:
        raise ValueError("after_audio_received has no meaning for text-to-speech; use after_audio_chunks")


def _invalid(body: Mapping[str, Any]) -> str | None:
    """Why the real API would refuse ``body`` with 400, or None if it would not."""
    for name in ("model", "input", "voice"):
        if body.get(name) in (None, ""):
            return f"Missing required parameter: '{name}'."
    text = body["input"]
    if not isinstance(text, str):
        return "Invalid type for 'input': expected a string."
    if len(text) > MAX_INPUT_CHARS:
        return f"Invalid 'input': string too long. Expected a string with maximum length {MAX_INPUT_CHARS}."
    voice = body["voice"]
    if isinstance(voice, Mapping):
        if not isinstance(voice.get("id"), str):
            return "Invalid 'voice': a custom voice needs an 'id'."
    elif voice not in VOICES:
        return f"Invalid value for 'voice': {voice!r} is not one of {sorted(VOICES)}."
    fmt = body.get("response_format", "mp3")
    if fmt != "pcm":
        return f"This emulator only speaks response_format 'pcm', not {fmt!r}."
    if body.get("stream_format", "audio") != "audio":
        return "This emulator only streams raw audio (stream_format 'audio')."
    speed = body.get("speed")
    if speed is not None and (not isinstance(speed, int | float) or not 0.25 <= speed <= 4.0):
        return "Invalid 'speed': expected a number from 0.25 to 4.0."
    return None


def _error(status: int, message: str | None = None, headers: Mapping[str, str] | None = None) -> web.Response:
    """An OpenAI-style error answer."""
    kind, code, default = _ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, "Error.")
    )
    body = {"error": {"message": message or default, "type": kind, "param": None, "code": code}}
    return web.Response(
        text=json.dumps(body), status=status, content_type="application/json", headers=dict(headers or {})
    )
