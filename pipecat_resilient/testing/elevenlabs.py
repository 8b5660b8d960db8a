"""A local emulator of ElevenLabs' multi-stream-input websocket TTS API.

Point the stock ``ElevenLabsTTSService`` at it with ``url=emulator.url`` and it
behaves like the real service, with speech-code audio
(:mod:`pipecat_resilient.testing.speech`) and exact character alignment, so a
test can decode what a listener heard. Faults come from a
:class:`~pipecat_resilient.testing.faults.FaultPlan`.

Protocol (``/v1/text-to-speech/{voice}/multi-stream-input?model_id=...&
output_format=pcm_24000&auto_mode=true``, header ``xi-api-key``):

* client: context init ``{"text": " ", "context_id": C, "voice_settings"?}``,
  text ``{"text": T, "context_id": C}``, ``{"context_id": C, "flush": true}``,
  ``{"context_id": C, "close_context": true}``, keepalive ``{"text": ""}``,
  ``{"close_socket": true}``;
* server: ``{"audio": b64, "alignment": {...}, "normalizedAlignment": {...},
  "contextId": C}`` per chunk (alignment times restart at 0 in each message),
  and ``{"isFinal": true, "contextId": C}`` once a closed context has no more
  audio to send; an error as ``{"message": M, "error": TYPE, "code": N,
  "contextId": C}`` (an ERROR fault: the context being synthesized is
  abandoned, the socket stays open).

With ``auto_mode=true`` each text message is synthesized as it arrives, and,
like the Flash models, every message after a context's first starts with a
separating space. Without it, text is buffered until a sentence ends or the
context is flushed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed

from pipecat_resilient.testing._server import ConnectionState, WebsocketEmulator, WorkFailed, _Faulted
from pipecat_resilient.testing.faults import Fault, FaultPlan
from pipecat_resilient.testing.speech import encode

__all__ = ["ElevenLabsEmulator"]

_SENTENCE_END = re.compile(r"[.!?;:]\s*$")


@dataclass
class _Context:
    id: str
    spoken: bool = False  # a message was synthesized in it already
    closed: bool = False
    buffer: str = ""
    jobs: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)  # None: closed
    synthesizer: asyncio.Task[None] | None = None


@dataclass
class _Session:
    state: ConnectionState
    sample_rate: int
    auto_mode: bool
    contexts: dict[str, _Context] = field(default_factory=dict)
    speaking: str | None = None  # the context last given text or sending audio


class ElevenLabsEmulator(WebsocketEmulator):
    """Emulates ElevenLabs' multi-stream-input websocket API on 127.0.0.1.

    Example::

        async with ElevenLabsEmulator(plan=FaultPlan(Fault.close(1012, after_audio_chunks=3))) as emulator:
            tts = ElevenLabsTTSService(api_key="test", url=emulator.url, settings=...)

    Args:
        plan: Faults to inject.
        api_key: Required ``xi-api-key`` (HTTP 401 otherwise); any key when None.
        ms_per_char: Duration of the audio for one character.
        chars_per_chunk: Characters per audio message (chunks may split words,
            as the real service's do).
        first_audio_delay: Seconds before the first audio of each message.
        realtime: Pace audio at its own duration; when False, send it as fast
            as the client reads it.
    """

    name = "ElevenLabsEmulator"
    api_key_header = "xi-api-key"

    def __init__(
        self,
        *,
        plan: FaultPlan | None = None,
        api_key: str | None = None,
        ms_per_char: float = 10.0,
        chars_per_chunk: int = 5,
        first_audio_delay: float = 0.0,
        realtime: bool = False,
    ) -> None:
        """Create a stopped emulator."""
        if chars_per_chunk < 1:
            raise ValueError("chars_per_chunk must be at least 1")
        if ms_per_char <= 0:
            raise ValueError("ms_per_char must be positive")
        super().__init__(plan=plan, api_key=api_key)
        self.ms_per_char = ms_per_char
        self.chars_per_chunk = chars_per_chunk
        self.first_audio_delay = first_audio_delay
        self.realtime = realtime
        self._sessions: dict[int, _Session] = {}

    async def serve_connection(self, state: ConnectionState) -> None:
        """Speak the multi-stream-input protocol on one connection."""
        query = parse_qs(urlsplit(state.record.path).query)
        output_format = query.get("output_format", ["pcm_24000"])[0]
        sample_rate = int(output_format.rsplit("_", 1)[-1]) if output_format.startswith("pcm_") else 24000
        auto_mode = query.get("auto_mode", ["false"])[0].lower() == "true"
        session = _Session(state, sample_rate, auto_mode)
        self._sessions[id(state)] = session
        try:
            async for raw in state.ws:
                message = json.loads(raw)
                state.record.messages.append(message)
                if await self._on_message(session, message):
                    break
        finally:
            self._sessions.pop(id(state), None)
            for context in session.contexts.values():
                if context.synthesizer is not None:
                    context.synthesizer.cancel()

    async def send_error(self, state: ConnectionState, fault: Fault) -> None:
        """Send ElevenLabs' error message; the context being synthesized is abandoned."""
        session = self._sessions.get(id(state))
        context_id = session.speaking if session is not None else None
        message: dict[str, object] = {"message": fault.reason, "error": "internal_error", "code": fault.code}
        if context_id is not None:
            message["contextId"] = context_id
        await state.ws.send(json.dumps(message))
        if session is not None and context_id is not None:
            context = session.contexts.get(context_id)
            task = context.synthesizer if context is not None else None
            if task is not None and task is not asyncio.current_task():
                task.cancel()  # fired by a timer: abandon it here

    async def _on_message(self, session: _Session, message: dict[str, object]) -> bool:
        """Handle one client message; True when the client asked to close."""
        state = session.state
        if message.get("close_socket"):
            await state.ws.close(1000)
            return True
        context_id = message.get("context_id")
        context_id = context_id if isinstance(context_id, str) else None
        text = message.get("text")
        if context_id is not None and context_id not in session.contexts:
            # Contexts are generated independently, as on the real service: a
            # new context's audio never waits behind an interrupted one's.
            new = session.contexts[context_id] = _Context(context_id)
            new.synthesizer = asyncio.create_task(self._speak(session, new))
            self.track(new.synthesizer)
        context = session.contexts.get(context_id) if context_id else None
        if isinstance(text, str) and text.strip():
            state.record.texts.append((context_id, text))
            if context is not None and not context.closed:
                if session.auto_mode:
                    context.jobs.put_nowait(text)
                else:
                    context.buffer += text
                    if _SENTENCE_END.search(context.buffer):
                        context.jobs.put_nowait(context.buffer)
                        context.buffer = ""
            session.speaking = context_id
            try:
                await state.text_received()
            except WorkFailed:
                # The error answered this message: its context is abandoned.
                if context is not None:
                    context.closed = True
                    if context.synthesizer is not None:
                        context.synthesizer.cancel()
        if context is not None and (message.get("flush") or message.get("close_context")):
            if context.buffer:
                context.jobs.put_nowait(context.buffer)
                context.buffer = ""
            if message.get("close_context") and not context.closed:
                context.closed = True
                context.jobs.put_nowait(None)
        return False

    async def _speak(self, session: _Session, context: _Context) -> None:
        """Run a context's synthesis until it is final or the connection is faulted or gone."""
        with contextlib.suppress(_Faulted, ConnectionClosed, WorkFailed):
            await self._synthesize(session, context)

    async def _synthesize(self, session: _Session, context: _Context) -> None:
        """Turn a context's queued text into audio messages, one message at a time, in order."""
        state = session.state
        context_id = context.id
        while True:
            text = await context.jobs.get()
            if text is None:
                await state.send(json.dumps({"isFinal": True, "contextId": context_id}))
                state.record.finished += 1
                return
            chars = text
            if session.auto_mode and context.spoken and not text[:1].isspace():
                chars = " " + text
            context.spoken = True
            delay = self.first_audio_delay + state.take_first_audio_delay()
            if delay:
                await asyncio.sleep(delay)
            for start in range(0, len(chars), self.chars_per_chunk):
                chunk = chars[start : start + self.chars_per_chunk]
                last = start + self.chars_per_chunk >= len(chars)
                audio = encode(
                    chunk,
                    sample_rate=session.sample_rate,
                    ms_per_char=self.ms_per_char,
                    message_end=last,
                    after=chars[start - 1] if start else " ",
                    then=None if last else chars[start + self.chars_per_chunk],
                )
                if start and self.realtime:
                    await asyncio.sleep(len(chunk) * self.ms_per_char / 1000)
                alignment = {
                    "chars": list(chunk),
                    "charStartTimesMs": [round(i * self.ms_per_char) for i in range(len(chunk))],
                    "charDurationsMs": [round(self.ms_per_char)] * len(chunk),
                }
                session.speaking = context_id
                await state.send(
                    json.dumps(
                        {
                            "audio": base64.b64encode(audio).decode(),
                            "alignment": alignment,
                            "normalizedAlignment": alignment,
                            "contextId": context_id,
                        }
                    )
                )
                await state.audio_sent()
                # Let the client's messages in between chunks, as a network would.
                await asyncio.sleep(0)
