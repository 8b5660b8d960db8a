"""A local emulator of Deepgram's streaming text-to-speech websocket API (``/v1/speak``).

Point the stock ``DeepgramTTSService`` at it with ``base_url=emulator.url`` and
it behaves like the real service, with speech-code audio
(:mod:`pipecat_resilient.testing.speech`), so a test can decode what a listener
heard. Faults come from a :class:`~pipecat_resilient.testing.faults.FaultPlan`.

Protocol (``/v1/speak?model=VOICE&encoding=linear16&sample_rate=N``, header
``Authorization: Token KEY``), after Deepgram's AsyncAPI description of
``speak.v1`` and its "Flush", "Clear", "Close" and streaming TTS pages:

* client: ``{"type": "Speak", "text": T}``, ``{"type": "Flush"}``,
  ``{"type": "Clear"}``, ``{"type": "Close"}`` (JSON text messages only);
* server: ``{"type": "Metadata", "request_id", "model_name", "model_version",
  "model_uuid"}`` once the connection opens; the audio as binary messages of
  raw PCM, with no alignment or word timestamps (Deepgram has none);
  ``{"type": "Flushed", "sequence_id": N}`` once a flush's audio has all been
  sent; ``{"type": "Cleared", "sequence_id": N}`` after a Clear;
  ``{"type": "Warning", "description", "code"}``.

Text is buffered across Speak messages, joined exactly as sent, and
synthesized when a Flush arrives. Deepgram's pages only promise that a Flush
makes it "generate the audio from its existing text buffer without waiting for
additional text"; they document no size or punctuation at which it starts on
its own. So by default nothing is spoken before a Flush, and the
``auto_generate_chars`` option models a server that starts on the complete
sentences of a long enough buffer. ``sequence_id`` numbers the Flush messages
of a connection from 0; a Cleared carries the number the next Flush will get.

A Clear drops the buffered text and the audio not sent yet (the flushes it
cuts short never get their Flushed). A Close flushes the buffer, sends the rest
of the audio, and closes with 1000 (the AsyncAPI: "Flush the buffer and close
the connection gracefully after all audio is generated").

Failures: a Speak longer than ``max_chars`` (2000 for Aura and Aura-2, the
documented "Input Text Limit") closes with 1009; a binary message closes with
1003, and a message that is not one of the four above with 1008 (the close
codes the TTS troubleshooting page lists; the reasons here are the emulator's
own wording). ``idle_timeout`` closes with 1011 when the client has sent
nothing for that long (the page's NET-0001; Deepgram documents no figure for
TTS, so it is off by default).

An ERROR fault sends ``{"type": "Error", "description": M, "message": ...}``
(the Error message of Deepgram's websocket SDKs; the TTS pages themselves
describe errors as close frames) and leaves the socket open: the flush in
progress is abandoned (no more of its audio, no Flushed) and the connection
goes on serving the next one. The stock Pipecat service does not recognize
``Error`` and logs it at debug level.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from pipecat_resilient.testing._server import ConnectionState, WebsocketEmulator, WorkFailed, _Faulted
from pipecat_resilient.testing.faults import Fault, FaultPlan
from pipecat_resilient.testing.speech import encode

__all__ = ["DeepgramTTSEmulator"]

PATH = "/v1/speak"

# Deepgram's "Input Text Limit" for Aura and Aura-2, in characters.
MAX_CHARS = 2000

# A sentence end followed by a space or the end of the buffer.
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


@dataclass
class _Job:
    """One item of a connection's synthesis queue."""

    sequence_id: int  # the flush it belongs to
    generation: int  # a Clear bumps the session's; older jobs are dropped
    text: str = ""  # text to speak
    flushed: bool = False  # send Flushed(sequence_id) instead
    close: bool = False  # close the socket (after a Close message)


@dataclass
class _Session:
    """One connection's protocol state."""

    state: ConnectionState
    sample_rate: int
    buffer: str = ""  # text received and not flushed yet
    sequence_id: int = 0  # the number the next Flush gets
    generation: int = 0
    failed: set[int] = field(default_factory=set)  # flushes abandoned after an Error
    speaking: int | None = None  # the flush whose audio is being sent
    receiving: bool = False  # a Speak is being counted (a fault it triggers hits the buffer)
    jobs: asyncio.Queue[_Job] = field(default_factory=asyncio.Queue)

    def abandoned(self, job: _Job) -> bool:
        """Whether a Clear or an Error has cancelled ``job``."""
        return job.generation != self.generation or job.sequence_id in self.failed


class DeepgramTTSEmulator(WebsocketEmulator):
    """Emulates Deepgram's streaming text-to-speech websocket API on 127.0.0.1.

    Example::

        async with DeepgramTTSEmulator(plan=FaultPlan(Fault.close(1011, after_audio_chunks=3))) as emulator:
            tts = DeepgramTTSService(
                api_key="test", base_url=emulator.url,
                settings=DeepgramTTSService.Settings(voice="aura-2-helena-en"),
            )

    Args:
        plan: Faults to inject. ``after_audio_chunks`` counts the binary audio
            messages sent, ``after_text_messages`` the Speak messages received.
        api_key: Required key, sent as ``Authorization: Token KEY`` (HTTP 401
            with a ``dg-error`` header otherwise); any key when None.
        ms_per_char: Duration of the audio for one character.
        bytes_per_chunk: Bytes per binary audio message (whole 16-bit samples).
            The default cuts through characters and words at every common
            sample rate (a character is 480 bytes at 24 kHz), as the real
            service's messages do; the last message of a flush may be shorter.
        first_audio_delay: Seconds before the first audio of each flush.
        realtime: Pace audio at its own duration; when False, send it as fast
            as the client reads it.
        auto_generate_chars: Once the buffered text holds at least this many
            characters, speak its complete sentences without waiting for a
            Flush (the rest waits). None: only a Flush starts synthesis.
        warning_after_chunks: Send an unsolicited Warning after this many audio
            messages of each flush, when more of its audio follows. None: never.
        warning: The Warning's ``(code, description)``.
        max_chars: Longest Speak text accepted (close 1009 beyond); None: any.
        idle_timeout: Close with 1011 after this many seconds without a client
            message; None: never.
    """

    name = "DeepgramTTSEmulator"

    def __init__(
        self,
        *,
        plan: FaultPlan | None = None,
        api_key: str | None = None,
        ms_per_char: float = 10.0,
        bytes_per_chunk: int = 2000,
        first_audio_delay: float = 0.0,
        realtime: bool = False,
        auto_generate_chars: int | None = None,
        warning_after_chunks: int | None = None,
        warning: tuple[str, str] = ("WARNING", "Some of the input text could not be spoken as written."),
        max_chars: int | None = MAX_CHARS,
        idle_timeout: float | None = None,
    ) -> None:
        """Create a stopped emulator."""
        if bytes_per_chunk < 2 or bytes_per_chunk % 2:
            raise ValueError("bytes_per_chunk must be a positive, even number (whole 16-bit samples)")
        if ms_per_char <= 0:
            raise ValueError("ms_per_char must be positive")
        if auto_generate_chars is not None and auto_generate_chars < 1:
            raise ValueError("auto_generate_chars must be at least 1")
        if warning_after_chunks is not None and warning_after_chunks < 1:
            raise ValueError("warning_after_chunks must be at least 1")
        # The base class would compare the whole header with the key; the
        # header carries "Token KEY", so the key is checked here instead.
        super().__init__(plan=plan, api_key=None)
        self.token = api_key
        self.ms_per_char = ms_per_char
        self.bytes_per_chunk = bytes_per_chunk
        self.first_audio_delay = first_audio_delay
        self.realtime = realtime
        self.auto_generate_chars = auto_generate_chars
        self.warning_after_chunks = warning_after_chunks
        self.warning = warning
        self.max_chars = max_chars
        self.idle_timeout = idle_timeout
        self._sessions: dict[int, _Session] = {}

    @property
    def models(self) -> list[str | None]:
        """The ``model`` query parameter (the voice) of each connection, in handshake order.

        Refused handshakes are included, so the list lines up with
        :attr:`connections`.
        """
        return [_query(record.path).get("model") for record in self.connections]

    # -- handshake -----------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        response = super()._process_request(connection, request)
        if response is not None:
            return response
        query = _query(request.path)
        if urlsplit(request.path).path != PATH:
            return self._refuse(connection, 404, "NOT_FOUND", f"{self.name} serves {PATH} only")
        if self.token is not None and not _authorized(request.headers.get("Authorization"), self.token):
            return self._refuse(connection, 401, "INVALID_AUTH", "Invalid credentials.")
        if query.get("encoding", "linear16") != "linear16":
            return self._refuse(connection, 400, "UNSUPPORTED_ENCODING", f"{self.name} speaks linear16 only")
        if not query.get("sample_rate", "24000").isdigit() or int(query.get("sample_rate", "24000")) < 1:
            return self._refuse(connection, 400, "INVALID_QUERY_PARAMETER", "Invalid sample_rate.")
        return None

    def _refuse(self, connection: ServerConnection, status: int, code: str, message: str) -> Response:
        """Refuse the handshake the way Deepgram does: the reason in ``dg-error`` and a JSON body."""
        record = self.connections[-1]
        record.refused = status
        record.closed = True
        request_id = str(uuid.uuid4())
        body = json.dumps({"err_code": code, "err_msg": message, "request_id": request_id})
        response = connection.respond(status, body + "\n")
        response.headers["dg-error"] = message
        response.headers["dg-request-id"] = request_id
        return response

    # -- protocol ------------------------------------------------------------

    async def serve_connection(self, state: ConnectionState) -> None:
        """Speak the ``/v1/speak`` protocol on one connection."""
        query = _query(state.record.path)
        session = _Session(state, int(query.get("sample_rate", "24000")))
        self._sessions[id(state)] = session
        synthesizer = asyncio.create_task(self._synthesize(session))
        self.track(synthesizer)
        try:
            await state.send(
                json.dumps(
                    {
                        "type": "Metadata",
                        "request_id": str(uuid.uuid4()),
                        "model_name": query.get("model", "aura-asteria-en"),
                        "model_version": "emulated",
                        "model_uuid": str(uuid.uuid4()),
                    }
                )
            )
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        raw = await state.ws.recv()
                except TimeoutError:
                    if state.faulted.is_set():
                        continue  # stalled on purpose: stay silent
                    await state.ws.close(1011, "NET-0001: no message from the client within the timeout")
                    return
                if not await self._on_message(session, raw):
                    return
        finally:
            self._sessions.pop(id(state), None)
            synthesizer.cancel()

    async def send_error(self, state: ConnectionState, fault: Fault) -> None:
        """Send Deepgram's Error message and abandon the flush in progress; the socket stays open."""
        session = self._sessions.get(id(state))
        if session is not None:
            if session.receiving or (session.speaking is None and session.buffer):
                # The Speak that triggered it, with the text buffered before it,
                # is lost: its flush will send neither audio nor Flushed.
                session.failed.add(session.sequence_id)
                session.buffer = ""
            elif session.speaking is not None:
                session.failed.add(session.speaking)
        await state.ws.send(
            json.dumps({"type": "Error", "description": fault.reason, "message": f"status {fault.code}"})
        )

    async def _on_message(self, session: _Session, raw: str | bytes) -> bool:
        """Handle one client message; False once the connection is being closed."""
        state = session.state
        if isinstance(raw, bytes):
            await state.ws.close(1003, "MESSAGE-0000: binary messages are not accepted")
            return False
        message = _parse(raw)
        if message is None:
            await state.ws.close(1008, "DATA-0000: the message could not be parsed as a TTS message")
            return False
        state.record.messages.append(message)
        kind, text = message["type"], message.get("text", "")
        if kind == "Speak":
            if self.max_chars is not None and len(text) > self.max_chars:
                await state.ws.close(1009, f"BIG-0000: text longer than {self.max_chars} characters")
                return False
            state.record.texts.append((None, text))
            session.buffer += text
            session.receiving = True
            try:
                await state.text_received()
            except WorkFailed:
                pass  # the Error message went out; the text is dropped
            finally:
                session.receiving = False
            self._generate_early(session)
        elif kind == "Flush":
            self._queue_buffer(session)
            session.jobs.put_nowait(_Job(session.sequence_id, session.generation, flushed=True))
            session.sequence_id += 1
        elif kind == "Clear":
            # Drop the buffer and every queued job; the synthesizer drops the
            # rest of the audio it is sending at its next message.
            session.generation += 1
            session.buffer = ""
            session.failed.discard(session.sequence_id)
            dropped = [session.jobs.get_nowait() for _ in range(session.jobs.qsize())]
            for job in dropped:
                if job.close:
                    session.jobs.put_nowait(job)  # a Close still closes
            await state.send(json.dumps({"type": "Cleared", "sequence_id": session.sequence_id}))
        else:
            self._queue_buffer(session)
            session.jobs.put_nowait(_Job(session.sequence_id, session.generation, close=True))
        return True

    def _queue_buffer(self, session: _Session) -> None:
        """Queue the buffered text for synthesis."""
        if session.buffer.strip():
            session.jobs.put_nowait(_Job(session.sequence_id, session.generation, text=session.buffer))
        session.buffer = ""

    def _generate_early(self, session: _Session) -> None:
        """With ``auto_generate_chars``, queue the complete sentences of a long enough buffer."""
        if self.auto_generate_chars is None or len(session.buffer) < self.auto_generate_chars:
            return
        ends = [match.end() for match in _SENTENCE_END.finditer(session.buffer)]
        if ends:
            text, session.buffer = session.buffer[: ends[-1]], session.buffer[ends[-1] :]
            session.jobs.put_nowait(_Job(session.sequence_id, session.generation, text=text))

    async def _synthesize(self, session: _Session) -> None:
        """Work through the connection's queue until it closes or is faulted."""
        state = session.state
        with contextlib.suppress(_Faulted, ConnectionClosed):
            while True:
                job = await session.jobs.get()
                if job.close:
                    await state.ws.close(1000)
                    return
                if session.abandoned(job):
                    continue
                if job.flushed:
                    await state.send(json.dumps({"type": "Flushed", "sequence_id": job.sequence_id}))
                    state.record.finished += 1
                    continue
                session.speaking = job.sequence_id
                try:
                    await self._speak(session, job)
                except WorkFailed:
                    pass  # an ERROR fault: send_error marked the flush abandoned
                finally:
                    session.speaking = None

    async def _speak(self, session: _Session, job: _Job) -> None:
        """Send one text's audio in ``bytes_per_chunk`` messages, unless it is abandoned meanwhile."""
        state = session.state
        audio = encode(job.text.strip(), sample_rate=session.sample_rate, ms_per_char=self.ms_per_char)
        delay = self.first_audio_delay + state.take_first_audio_delay()
        if delay:
            await asyncio.sleep(delay)
        previous = 0
        for start in range(0, len(audio), self.bytes_per_chunk):
            if self.realtime and previous:
                await asyncio.sleep(previous / (2 * session.sample_rate))
            if session.abandoned(job):
                return
            chunk = audio[start : start + self.bytes_per_chunk]
            await state.send(chunk)
            await state.audio_sent()
            previous = len(chunk)
            sent = start // self.bytes_per_chunk + 1
            if sent == self.warning_after_chunks and start + len(chunk) < len(audio):
                code, description = self.warning
                await state.send(json.dumps({"type": "Warning", "description": description, "code": code}))
            # Let the client's messages (a Clear) in between chunks, as a network would.
            await asyncio.sleep(0)


def _parse(raw: str) -> dict[str, Any] | None:
    """A client message, or None when it is not one of Speak (with its text), Flush, Clear, Close."""
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("type") not in ("Speak", "Flush", "Clear", "Close"):
        return None
    if message["type"] == "Speak" and not isinstance(message.get("text"), str):
        return None
    return message


def _query(path: str) -> dict[str, str]:
    """The first value of each query parameter of ``path``."""
    return {name: values[0] for name, values in parse_qs(urlsplit(path).query).items()}


def _authorized(header: str | None, key: str) -> bool:
    """Whether an ``Authorization`` header carries ``key`` as Deepgram expects (``Token KEY``)."""
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "token" and value.strip() == key
