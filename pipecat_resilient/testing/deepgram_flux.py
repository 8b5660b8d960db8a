"""A local emulator of Deepgram Flux's turn-taking speech-to-text websocket (``/v2/listen``).

Point the stock ``DeepgramFluxSTTService`` at it with
``url=emulator.ws_url`` and it transcribes exactly the audio it received,
which is speech code (:mod:`pipecat_resilient.testing.speech`), and owns the
turn detection, as Flux does. Faults come from a
:class:`~pipecat_resilient.testing.faults.FaultPlan`; ``after_audio_received``
counts the binary audio messages of a connection (Pipecat sends one per audio
frame it is given, 20 ms in the harness).

Protocol (``/v2/listen?model=flux-general-en&sample_rate=16000&encoding=linear16``,
optionally ``eot_threshold``, ``eager_eot_threshold``, ``eot_timeout_ms``,
``keyterm``, ``tag``, ``mip_opt_out``..., header ``Authorization: Token KEY``),
as Pipecat 1.14's ``DeepgramFluxSTTService`` speaks it (shapes from
``pipecat.services.deepgram.flux.stt_base`` and developers.deepgram.com):

* client: binary audio (16-bit little-endian PCM at ``sample_rate``);
  ``{"type": "CloseStream"}``; ``{"type": "Configure", ...}`` (recorded,
  answered with ``ConfigureSuccess``);
* server: ``Connected {request_id, sequence_id}`` when the connection opens;
  ``TurnInfo {request_id, sequence_id, event, turn_index, audio_window_start,
  audio_window_end, transcript, words: [{word, confidence}],
  end_of_turn_confidence}`` with times in seconds of the audio received on
  that connection; an ERROR fault sends ``Error {code, description}`` and
  closes the socket with 1011, as Flux does after a fatal error.

The transcriber (kind; no EagerEndOfTurn, no TurnResumed):

* ``StartOfTurn`` when speech starts (the first non-zero sample after the last
  end of turn), with an empty transcript;
* ``Update`` with the turn's transcript so far each time a new word is heard
  (the text as spoken, punctuation included);
* ``EndOfTurn`` with the whole turn's transcript and words after
  ``end_of_turn_ms`` of silence (zero samples) following the turn's speech
  (``eot_timeout_ms`` from the query, when shorter), or at ``CloseStream``
  (which then closes with 1000). ``audio_window_end`` is the position of the
  audio received when the turn ended, its silence included.

What a connection heard and finalized (the words of its ended turns) is kept
in a :class:`~pipecat_resilient.testing.deepgram_stt.StreamRecord` per
connection (:meth:`DeepgramFluxEmulator.stream`). The words of a turn that had
not ended when the connection died, or when an ERROR fault fired, are lost:
a Flux turn lives in one connection.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from pipecat_resilient.testing._server import ConnectionState
from pipecat_resilient.testing.deepgram_stt import StreamRecord, StreamTranscriber, StreamWord, STTEmulator
from pipecat_resilient.testing.faults import Fault, FaultPlan

__all__ = ["DeepgramFluxEmulator"]

PATH = "/v2/listen"
CONFIDENCE = 0.99
END_OF_TURN_CONFIDENCE = 0.9


class _Flux:
    """Sans-I/O: Flux's turn decisions for one connection; each input returns the messages to send."""

    def __init__(self, emulator: DeepgramFluxEmulator, record: StreamRecord) -> None:
        query = record.query
        self.record = record
        self.model = query.get("model", "flux-general-en")
        self.end_of_turn_s = emulator.end_of_turn_ms / 1000
        timeout = query.get("eot_timeout_ms")
        if timeout is not None:
            try:
                self.end_of_turn_s = min(self.end_of_turn_s, float(timeout) / 1000)
            except ValueError:
                pass
        self.stream = StreamTranscriber(
            sample_rate=record.sample_rate,
            spc=emulator.samples_per_char(record.sample_rate),
        )
        record.transcriber = self.stream
        self.request_id = str(uuid.uuid4())
        self.sequence_id = 0
        self.turn_index = 0
        self.in_turn = False
        self.turn_start = 0.0
        self._shown = 0  # words starting before this sample were in an Update
        self.closing = False  # an Error was sent: the socket is being closed

    def connected(self) -> dict[str, Any]:
        """The message that confirms the connection."""
        return self._message({"type": "Connected"})

    def audio_received(self, audio: bytes) -> None:
        """Take in one audio message (then ask for :meth:`results`)."""
        self.stream.audio_received(audio)
        self.record.audio_bytes += len(audio)

    def results(self) -> list[dict[str, Any]]:
        """The messages the audio received so far makes due."""
        stream = self.stream
        out: list[dict[str, Any]] = []
        if stream.voiced and not self.in_turn:
            self.in_turn = True
            self.turn_start = stream.speech_started_at or 0.0
            out.append(self._turn_info("StartOfTurn", []))
        pending = stream.pending()
        if pending and pending[-1].offset >= self._shown:
            self._shown = pending[-1].offset + 1
            out.append(self._turn_info("Update", pending))
        if self.in_turn and not stream.in_word() and stream.silence >= self.end_of_turn_s:
            out.extend(self.end_turn())
        return out

    def end_turn(self) -> list[dict[str, Any]]:
        """End the turn in progress (silence, ``CloseStream``); nothing when there is none."""
        if not self.in_turn:
            return []
        stream = self.stream
        words = stream.pending(flush=True)
        stream.endpointed()
        self.in_turn = False
        message = self._turn_info("EndOfTurn", words, confidence=END_OF_TURN_CONFIDENCE)
        stream.finalized(words)
        self.record.words_finalized.extend(word.text for word in words)
        self.turn_index += 1
        return [message]

    def configured(self, message: dict[str, Any]) -> dict[str, Any]:
        """The answer to a ``Configure``."""
        fields = {key: value for key, value in message.items() if key != "type"}
        return self._message({"type": "ConfigureSuccess", **fields})

    def error(self) -> None:
        """A fatal error: the turn in flight is lost."""
        self.record.words_dropped.extend(word.text for word in self.stream.discard())
        self.in_turn = False

    def ended(self) -> None:
        """The connection ended: the turn in flight is lost."""
        self.record.words_dropped.extend(word.text for word in self.stream.pending(flush=True))

    def _message(self, message: dict[str, Any]) -> dict[str, Any]:
        message = {"request_id": self.request_id, "sequence_id": self.sequence_id, **message}
        self.sequence_id += 1
        return message

    def _turn_info(self, event: str, words: list[StreamWord], *, confidence: float = 0.0) -> dict[str, Any]:
        return self._message(
            {
                "type": "TurnInfo",
                "event": event,
                "turn_index": self.turn_index,
                "audio_window_start": round(self.turn_start, 3),
                "audio_window_end": round(self.stream.position, 3),
                "transcript": " ".join(word.text for word in words),
                "words": [{"word": word.text, "confidence": CONFIDENCE} for word in words],
                "end_of_turn_confidence": confidence,
            }
        )


class DeepgramFluxEmulator(STTEmulator):
    """Emulates Deepgram Flux's websocket (``/v2/listen``) on 127.0.0.1.

    Example::

        plan = FaultPlan(Fault.close(1011, after_audio_received=50))
        async with DeepgramFluxEmulator(plan=plan, api_key="test-key") as emulator:
            stt = DeepgramFluxSTTService(api_key="test-key", url=emulator.ws_url)

    Args:
        plan: Faults to inject.
        api_key: Required key (``Authorization: Token KEY``, HTTP 401
            otherwise); any key when None.
        ms_per_char: Duration of one character of the caller's speech code.
        end_of_turn_ms: Silence after a turn's speech that ends the turn.
    """

    name = "DeepgramFluxEmulator"
    path = PATH
    api_key_header = "Authorization"

    def __init__(
        self,
        *,
        plan: FaultPlan | None = None,
        api_key: str | None = None,
        ms_per_char: float = 10.0,
        end_of_turn_ms: float = 300.0,
    ) -> None:
        """Create a stopped emulator."""
        if end_of_turn_ms <= 0:
            raise ValueError("end_of_turn_ms must be positive")
        super().__init__(
            plan=plan, api_key=None if api_key is None else f"Token {api_key}", ms_per_char=ms_per_char
        )
        self.end_of_turn_ms = end_of_turn_ms

    # -- protocol ------------------------------------------------------------

    async def serve_connection(self, state: ConnectionState) -> None:
        """Speak the Flux protocol on one connection."""
        record = self._open_stream(state)
        flux = _Flux(self, record)
        self._sessions[id(state)] = flux
        try:
            await self._send(state, [flux.connected()])
            async for raw in state.ws:
                if isinstance(raw, bytes):
                    if raw:
                        await self._on_audio(state, flux, raw)
                    continue
                message = json.loads(raw)
                state.record.messages.append(message)
                kind = message.get("type") if isinstance(message, dict) else None
                if kind == "CloseStream":
                    await self._send(state, flux.end_turn())
                    await state.ws.close(1000)
                    break
                if kind == "Configure":
                    await self._send(state, [flux.configured(message)])
                await self._signal()
        finally:
            flux.ended()
            self._sessions.pop(id(state), None)
            await self._signal()

    async def send_error(self, state: ConnectionState, fault: Fault) -> None:
        """Send Flux's fatal ``Error`` message, drop the turn in flight, and close with 1011."""
        flux = self._sessions.get(id(state))
        message = {"type": "Error", "code": str(fault.code), "description": fault.reason}
        await state.ws.send(json.dumps(message))
        if flux is not None:
            flux.record.sent.append(message)
            flux.error()
            flux.closing = True
        closing = asyncio.create_task(state.ws.close(1011, fault.reason[:120]))
        self.track(closing)
        await self._signal()
