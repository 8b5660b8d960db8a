"""A local emulator of AssemblyAI's streaming speech-to-text websocket API (v3).

Point the stock ``AssemblyAISTTService`` at it with
``api_endpoint_base_url=emulator.ws_url`` and it transcribes exactly the audio
it received, which is speech code (:mod:`pipecat_resilient.testing.speech`).
Faults come from a :class:`~pipecat_resilient.testing.faults.FaultPlan`;
``after_audio_received`` counts the binary audio messages of a connection
(Pipecat sends one per 50 ms).

Protocol (``/v3/ws?sample_rate=16000&encoding=pcm_s16le&speech_model=...&
format_turns=true&min_turn_silence=100&max_turn_silence=100``, header
``Authorization: KEY``), as Pipecat 1.14 speaks it (shapes from
``pipecat.services.assemblyai.models`` and assemblyai.com/docs/streaming):

* client: binary audio (16-bit little-endian PCM at ``sample_rate``);
  ``{"type": "ForceEndpoint"}`` (end the turn now), ``{"type": "Terminate"}``,
  ``{"type": "KeepAlive"}`` and ``{"type": "UpdateConfiguration", ...}``
  (recorded only);
* server: ``Begin {id, expires_at}`` when the connection opens; ``Turn
  {turn_order, turn_is_formatted, end_of_turn, transcript,
  end_of_turn_confidence, words: [{start, end, text, confidence,
  word_is_final}], utterance}`` with times in ms of the audio received on that
  connection; ``SpeechStarted {timestamp}`` (Universal-3 Pro models);
  ``Termination {audio_duration_seconds, session_duration_seconds}`` after a
  ``Terminate``, then a 1000 close; an ERROR fault sends ``Error {error_code,
  error}`` and, as the real service does, closes the socket with that code
  (1011 when the fault's code is not a websocket close code).

The transcriber:

* Each new word is sent in a partial ``Turn`` (``end_of_turn: false``,
  unformatted: lower case, no punctuation; ``transcript`` is the turn so
  far).
* A turn ends after ``max_turn_silence`` ms of silence (zero samples) after
  speech, or at ``ForceEndpoint`` or ``Terminate``: on Universal-3 Pro models
  (``u3-rt-pro*``, ``universal-3-5-pro*``, ``universal-3-6-pro*``, Pipecat's
  default) one ``end_of_turn`` message, formatted; on Universal-Streaming
  models an unformatted one, then with ``format_turns`` a formatted one. The
  formatted transcript is the text as spoken, punctuation included.
* ``lag`` holds a word back until that much audio followed it (the end of a
  turn flushes it).

What a connection heard and finalized (the words of its ended turns) is kept
in a :class:`~pipecat_resilient.testing.deepgram_stt.StreamRecord` per
connection (:meth:`AssemblyAIEmulator.stream`). The words of a turn that had
not ended when the connection died, or when an ERROR fault fired, are lost.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from pipecat_resilient.testing._server import ConnectionState
from pipecat_resilient.testing.deepgram_stt import StreamRecord, StreamTranscriber, StreamWord, STTEmulator
from pipecat_resilient.testing.faults import Fault, FaultPlan

__all__ = ["AssemblyAIEmulator"]

PATH = "/v3/ws"
CONFIDENCE = 0.99
U3_PRO_PREFIXES = ("u3-rt-pro", "universal-3-5-pro", "universal-3-6-pro")
# AssemblyAI's end-of-turn silence when the query does not set one.
DEFAULT_MAX_TURN_SILENCE_MS = 1280
SESSION_SECONDS = 3 * 3600


def _close_code(code: int) -> int:
    """``code`` if a server may close a websocket with it, else 1011 (internal error)."""
    if code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014):
        return code
    return code if 3000 <= code <= 4999 else 1011


class _Turns:
    """Sans-I/O: AssemblyAI's turn decisions for one connection; each input returns the messages to send."""

    def __init__(self, emulator: AssemblyAIEmulator, record: StreamRecord) -> None:
        query = record.query
        self.record = record
        self.model = query.get("speech_model", "universal-streaming-english")
        self.u3 = self.model.startswith(U3_PRO_PREFIXES)
        self.format_turns = query.get("format_turns", "false").lower() == "true"
        try:
            self.max_silence = int(query.get("max_turn_silence", DEFAULT_MAX_TURN_SILENCE_MS))
        except ValueError:
            self.max_silence = DEFAULT_MAX_TURN_SILENCE_MS
        self.stream = StreamTranscriber(
            sample_rate=record.sample_rate,
            spc=emulator.samples_per_char(record.sample_rate),
            lag=emulator.lag,
        )
        record.transcriber = self.stream
        self.turn_order = 0
        self._shown = 0  # words starting before this sample were in a partial
        self._speech_announced = False
        self.opened_at = time.monotonic()
        self.closing = False  # an Error was sent: the socket is being closed

    def begin(self) -> dict[str, Any]:
        """The message that opens the session."""
        return {"type": "Begin", "id": str(uuid.uuid4()), "expires_at": int(time.time()) + SESSION_SECONDS}

    def audio_received(self, audio: bytes) -> None:
        """Take in one audio message (then ask for :meth:`results`)."""
        self.stream.audio_received(audio)
        self.record.audio_bytes += len(audio)

    def results(self) -> list[dict[str, Any]]:
        """The messages the audio received so far makes due."""
        stream = self.stream
        out: list[dict[str, Any]] = []
        if self.u3 and stream.voiced and not self._speech_announced:
            self._speech_announced = True
            started = stream.speech_started_at or 0.0
            out.append({"type": "SpeechStarted", "timestamp": round(started * 1000)})
        pending = stream.pending()
        if pending and pending[-1].offset >= self._shown:
            self._shown = pending[-1].offset + 1
            out.append(self._turn(pending, end_of_turn=False, formatted=False))
        if stream.voiced and not stream.in_word() and stream.silence * 1000 >= self.max_silence:
            out.extend(self.end_turn())
        return out

    def end_turn(self) -> list[dict[str, Any]]:
        """End the current turn (silence, ``ForceEndpoint``, ``Terminate``); nothing when it is empty."""
        stream = self.stream
        words = stream.pending(flush=True)
        stream.endpointed()
        self._speech_announced = False
        if not words:
            return []
        out = []
        if not self.u3:
            out.append(self._turn(words, end_of_turn=True, formatted=False))
        if self.u3 or self.format_turns:
            out.append(self._turn(words, end_of_turn=True, formatted=True))
        stream.finalized(words)
        self.record.words_finalized.extend(word.text for word in words)
        self.turn_order += 1
        return out

    def terminate(self) -> list[dict[str, Any]]:
        """A ``Terminate``: the turn in flight, then ``Termination``."""
        out = self.end_turn()
        out.append(
            {
                "type": "Termination",
                "audio_duration_seconds": round(self.stream.position, 3),
                "session_duration_seconds": round(time.monotonic() - self.opened_at, 3),
            }
        )
        return out

    def error(self) -> None:
        """An error: the turn in flight is lost."""
        self.record.words_dropped.extend(word.text for word in self.stream.discard())
        self._shown = 0

    def ended(self) -> None:
        """The connection ended: the turn in flight is lost."""
        self.record.words_dropped.extend(word.text for word in self.stream.pending(flush=True))

    def _turn(self, words: list[StreamWord], *, end_of_turn: bool, formatted: bool) -> dict[str, Any]:
        texts = [word.text if formatted else word.bare for word in words]
        transcript = " ".join(texts)
        return {
            "type": "Turn",
            "turn_order": self.turn_order,
            "turn_is_formatted": formatted,
            "end_of_turn": end_of_turn,
            "transcript": transcript,
            "end_of_turn_confidence": 1.0 if end_of_turn else 0.0,
            "words": [
                {
                    "start": round(word.start * 1000),
                    "end": round(word.end * 1000),
                    "text": text,
                    "confidence": CONFIDENCE,
                    "word_is_final": True,
                }
                for word, text in zip(words, texts, strict=True)
            ],
            "utterance": transcript if end_of_turn else "",
        }


class AssemblyAIEmulator(STTEmulator):
    """Emulates AssemblyAI's streaming speech-to-text websocket (v3) on 127.0.0.1.

    Example::

        async with AssemblyAIEmulator(plan=FaultPlan(Fault.abort(after_audio_received=20))) as emulator:
            stt = AssemblyAISTTService(api_key="test-key", api_endpoint_base_url=emulator.ws_url)

    Args:
        plan: Faults to inject.
        api_key: Required ``Authorization`` header (HTTP 401 otherwise); any
            key when None.
        ms_per_char: Duration of one character of the caller's speech code.
        lag: Seconds of audio the server waits for after a word before
            sending it in a partial (the end of a turn flushes it).
    """

    name = "AssemblyAIEmulator"
    path = PATH
    api_key_header = "Authorization"

    def __init__(
        self,
        *,
        plan: FaultPlan | None = None,
        api_key: str | None = None,
        ms_per_char: float = 10.0,
        lag: float = 0.0,
    ) -> None:
        """Create a stopped emulator."""
        if lag < 0:
            raise ValueError("lag must not be negative")
        super().__init__(plan=plan, api_key=api_key, ms_per_char=ms_per_char)
        self.lag = lag

    # -- protocol ------------------------------------------------------------

    async def serve_connection(self, state: ConnectionState) -> None:
        """Speak the v3 streaming protocol on one connection."""
        record = self._open_stream(state)
        turns = _Turns(self, record)
        self._sessions[id(state)] = turns
        try:
            await self._send(state, [turns.begin()])
            async for raw in state.ws:
                if isinstance(raw, bytes):
                    if raw:
                        await self._on_audio(state, turns, raw)
                    continue
                message = json.loads(raw)
                state.record.messages.append(message)
                kind = message.get("type") if isinstance(message, dict) else None
                if kind == "ForceEndpoint":
                    await self._send(state, turns.end_turn())
                elif kind == "Terminate":
                    await self._send(state, turns.terminate())
                    await state.ws.close(1000)
                    break
                await self._signal()
        finally:
            turns.ended()
            self._sessions.pop(id(state), None)
            await self._signal()

    async def send_error(self, state: ConnectionState, fault: Fault) -> None:
        """Send AssemblyAI's ``Error`` message, drop the turn in flight, and close with its code."""
        turns = self._sessions.get(id(state))
        code = _close_code(fault.code)
        message = {"type": "Error", "error_code": code, "error": fault.reason}
        await state.ws.send(json.dumps(message))
        if turns is not None:
            turns.record.sent.append(message)
            turns.error()
            turns.closing = True
        # The real service closes right after its Error frame; in the
        # background, since the caller may be the connection's reader.
        closing = asyncio.create_task(state.ws.close(code, fault.reason[:120]))
        self.track(closing)
        await self._signal()
