"""A local emulator of Deepgram's live transcription websocket API (``/v1/listen``).

Point the stock ``DeepgramSTTService`` at it with ``base_url=emulator.url`` and
it transcribes exactly the audio it received: the caller's audio is speech code
(:mod:`pipecat_resilient.testing.speech`), so every word has a text and a place
in the stream. Faults come from a :class:`~pipecat_resilient.testing.faults.FaultPlan`;
``after_audio_received`` counts the binary audio messages of a connection.

Protocol (``/v1/listen?model=...&encoding=linear16&sample_rate=16000&channels=1&
interim_results=true&punctuate=true&endpointing=10&utterance_end_ms=1000&
vad_events=true``, header ``Authorization: Token KEY``), as deepgram-sdk 7 and
Pipecat 1.14 speak it (shapes from the SDK's ``listen.v1`` types and
developers.deepgram.com):

* client: binary audio (16-bit little-endian PCM at ``sample_rate``);
  ``{"type": "KeepAlive"}`` (no answer), ``{"type": "Finalize"}``,
  ``{"type": "CloseStream"}``;
* server: ``Results`` ``{"type", "channel_index": [0, 1], "start", "duration",
  "is_final", "speech_final", "from_finalize", "channel": {"alternatives":
  [{"transcript", "confidence", "words": [{"word", "start", "end",
  "confidence", "punctuated_word"}]}]}, "metadata": {"request_id",
  "model_info": {"name", "version", "arch"}, "model_uuid"}}``; times are
  seconds of the audio received *on that connection* (0 when it opens);
  ``UtteranceEnd`` ``{"channel": [0, 1], "last_word_end"}``; ``SpeechStarted``
  ``{"channel": [0], "timestamp"}`` (with ``vad_events=true``); ``Metadata``
  ``{"transaction_key", "request_id", "sha256", "created", "duration",
  "channels"}`` after a ``CloseStream``, then a 1000 close; an ERROR fault
  sends ``{"type": "Error", "variant", "description", "code"}`` and leaves the
  socket open.

The transcriber, kind by default:

* A word is transcribed once its last character arrived. With
  ``interim_results`` each new word is first shown in an interim result
  (``is_final: false``, covering everything not final yet) and finalized on the
  next audio message, in finals of ``words_per_final`` words (``start`` where
  the last final ended, ``duration`` up to the end of its last word).
* Silence (zero samples) of ``endpointing`` ms (default 10, ``false`` turns it
  off) after speech finalizes whatever is left with ``speech_final: true``;
  with ``utterance_end_ms`` an ``UtteranceEnd`` follows that much silence
  after the last final word.
* ``Finalize`` finalizes every word received so far with ``from_finalize:
  true`` (an empty final when there is nothing left, so the client always
  gets its confirmation); ``CloseStream`` finalizes, sends ``Metadata`` and
  closes with 1000.
* ``transcript`` joins ``punctuated_word`` with ``punctuate`` or
  ``smart_format`` (Pipecat's default), else the bare lower-case ``word``.

Unkind options: ``words_per_final`` > 1, ``lag`` (the server holds a word back
until ``lag`` seconds of audio came after it, or a ``Finalize``),
``revise_interims`` (the newest word of every interim is misheard, and set
right by the next interim or the final), and ``idle_timeout`` (close with 1011
``NET-0001`` after that long without a message, as the real service does after
about 10 s; off by default).

What a connection heard and finalized is kept per connection in a
:class:`StreamRecord` (:meth:`DeepgramSTTEmulator.stream`); what was not
finalized when a connection died, or when an ERROR fault fired, is lost, as it
is on the real service.

This module also holds :class:`StreamTranscriber`, the sans-I/O record of one
connection's audio both speech-to-text emulators build on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from pipecat_resilient.testing._server import ConnectionState, WebsocketEmulator, WorkFailed
from pipecat_resilient.testing.faults import Fault, FaultPlan
from pipecat_resilient.testing.speech import HeardWord, SpeechDecoder, samples_per_char

__all__ = ["DeepgramSTTEmulator", "StreamRecord", "StreamTranscriber", "StreamWord"]

PATH = "/v1/listen"
CONFIDENCE = 0.99
# Deepgram's default endpointing when the query does not set it.
DEFAULT_ENDPOINTING_MS = 10
_PUNCTUATION = string.punctuation + "¡¿…“”‘’"


# -- the sans-I/O core --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamWord:
    """A word heard in one connection's audio stream.

    Parameters:
        text: The word as spoken, punctuation included.
        start: Seconds from the start of the connection's stream.
        end: Seconds from the start of the stream to the end of its last
            character (of the part of it the stream carried).
        offset: The sample it starts at: its identity in the stream.
        complete: False for a fragment, a word whose end never came.
    """

    text: str
    start: float
    end: float
    offset: int
    complete: bool = True

    @property
    def bare(self) -> str:
        """The word lower-cased, without punctuation (an STT's unformatted form)."""
        return self.text.strip(_PUNCTUATION).lower() or self.text.lower()


class StreamTranscriber:
    """Sans-I/O record of one connection's audio: its words, with stream times, and its silences.

    Feed it audio as it arrives (:meth:`audio_received`); ask which words are
    heard and not final yet (:meth:`pending`), mark the ones a result finalized
    (:meth:`finalized`) or drop them all (:meth:`discard`). Times are seconds
    of audio received, so the core never reads a clock.

    Args:
        sample_rate: Sample rate of the 16-bit mono PCM received.
        spc: Samples per character of the speech code.
        lag: Seconds of audio that must follow a word before it is available
            (a server that holds back the newest words).
    """

    def __init__(self, *, sample_rate: int, spc: int, lag: float = 0.0) -> None:
        """Create an empty stream."""
        if sample_rate <= 0:
            raise ValueError("sample_rate must be positive")
        self.sample_rate = sample_rate
        self.spc = spc
        self.lag = lag
        self._decoder = SpeechDecoder(spc)
        self._samples = 0
        self._trailing_zeros = 0
        self._watermark = 0  # words starting before this sample are final or dropped
        self._voiced = False  # speech since the last endpoint
        self._speech_started_at: float | None = None
        self._sha = hashlib.sha256()

    # Inputs.

    def audio_received(self, audio: bytes) -> None:
        """Take in one audio message."""
        self._sha.update(audio)
        samples = len(audio) // 2
        stripped = len(audio.rstrip(b"\x00"))
        if stripped:
            lead = len(audio) - len(audio.lstrip(b"\x00"))
            if not self._voiced:
                self._speech_started_at = (self._samples + lead // 2) / self.sample_rate
            self._voiced = True
            self._trailing_zeros = samples - (stripped + 1) // 2
        else:
            self._trailing_zeros += samples
        self._samples += samples
        self._decoder.feed(audio)

    def finalized(self, words: list[StreamWord]) -> None:
        """Mark ``words`` (and every word before them) as finalized."""
        if words:
            self._watermark = max(self._watermark, words[-1].offset + 1)

    def discard(self) -> list[StreamWord]:
        """Drop every word not finalized yet, the one being spoken included.

        Returns:
            The words dropped that were heard (an unfinished one is not).
        """
        dropped = self.pending(flush=True)
        self._watermark = self._samples
        return dropped

    def endpointed(self) -> None:
        """Note that an endpoint was reported: speech after this starts a new utterance."""
        self._voiced = False
        self._speech_started_at = None

    # Outputs.

    @property
    def position(self) -> float:
        """Seconds of audio received."""
        return self._samples / self.sample_rate

    @property
    def silence(self) -> float:
        """Seconds of silence (zero samples) at the end of the audio received."""
        return self._trailing_zeros / self.sample_rate

    @property
    def voiced(self) -> bool:
        """Whether speech arrived since the last endpoint."""
        return self._voiced

    @property
    def speech_started_at(self) -> float | None:
        """Stream time of the first speech since the last endpoint, if any."""
        return self._speech_started_at

    @property
    def sha256(self) -> str:
        """Hex digest of the audio received."""
        return self._sha.hexdigest()

    def words(self) -> list[StreamWord]:
        """Every word heard so far, final or not, without the one being spoken."""
        decoded = self._decoder.words
        words = [self._word(heard) for heard in decoded]
        if decoded and not decoded[-1].complete and not self._trailing_zeros:
            words.pop()  # still being spoken
        return words

    def pending(self, *, flush: bool = False) -> list[StreamWord]:
        """The words heard and not finalized yet, in order.

        Args:
            flush: Ignore the lag (a ``Finalize``, an endpoint).
        """
        limit = self.position - self.lag
        return [
            word
            for word in self.words()
            if word.offset >= self._watermark and (flush or word.end <= limit + 1e-9)
        ]

    def in_word(self) -> bool:
        """Whether a word is being spoken (started and not ended, no silence since)."""
        decoded = self._decoder.words
        return bool(decoded) and not decoded[-1].complete and not self._trailing_zeros

    def _word(self, heard: HeardWord) -> StreamWord:
        # Timed by the samples the word's audio took: the tail of a word cut
        # by the start of the stream (a replay that begins inside it) ends
        # where its audio did, not a whole character later.
        rate = self.sample_rate
        return StreamWord(heard.text, heard.offset / rate, heard.end / rate, heard.offset, heard.complete)


@dataclass
class StreamRecord:
    """What one speech-to-text connection heard and finalized, for tests to inspect.

    Parameters:
        index: The connection's index in the emulator's ``connections``.
        query: The handshake's query parameters (the last value of each).
        sample_rate: The sample rate the audio was read at.
        audio_bytes: Bytes of audio received.
        words_finalized: The words sent in final results, as spoken.
        words_dropped: Words heard but never finalized: dropped by an ERROR
            fault, or left when the connection ended.
        sent: Every JSON message sent, in order.
        transcriber: The connection's :class:`StreamTranscriber`.
    """

    index: int
    query: dict[str, str]
    sample_rate: int
    audio_bytes: int = 0
    words_finalized: list[str] = field(default_factory=list)
    words_dropped: list[str] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list, repr=False)
    transcriber: StreamTranscriber | None = field(default=None, repr=False)

    @property
    def words_heard(self) -> list[str]:
        """Every word heard on the connection, final or not."""
        return [word.text for word in self.transcriber.words()] if self.transcriber else []

    @property
    def seconds_received(self) -> float:
        """Seconds of audio received."""
        return self.audio_bytes / (2 * self.sample_rate)


def _flag(query: dict[str, str], name: str, default: bool) -> bool:
    value = query.get(name)
    return default if value is None else value.lower() == "true"


def _milliseconds(query: dict[str, str], name: str, default: int | None) -> int | None:
    """A duration in ms from the query; None when absent (``default``) or ``false``."""
    value = query.get(name)
    if value is None:
        return default
    if value.lower() == "false":
        return None
    try:
        return int(float(value))
    except ValueError:
        return default


def _misheard(word: StreamWord) -> tuple[str, str]:
    """A plausible mishearing of ``word``: ``(word, punctuated_word)``."""
    bare = word.bare
    wrong = bare[:-1] if len(bare) > 1 else "uh"
    tail = word.text[len(word.text.rstrip(_PUNCTUATION)) :]
    return wrong, wrong + tail


class _Listen:
    """Sans-I/O: Deepgram's live-transcription decisions for one connection.

    Each input returns the messages to send, in order.
    """

    def __init__(self, emulator: DeepgramSTTEmulator, record: StreamRecord) -> None:
        query = record.query
        self.record = record
        self.closing = False  # (Deepgram closes on an error at once)
        self.model = query.get("model", "nova-3-general")
        self.interim = _flag(query, "interim_results", False)
        self.punctuate = _flag(query, "punctuate", False) or _flag(query, "smart_format", False)
        self.vad_events = _flag(query, "vad_events", False)
        self.endpointing = _milliseconds(query, "endpointing", DEFAULT_ENDPOINTING_MS)
        utterance_end = _milliseconds(query, "utterance_end_ms", None)
        # Deepgram sends UtteranceEnd only alongside interim results.
        self.utterance_end = utterance_end if self.interim else None
        self.words_per_final = emulator.words_per_final
        self.revise = emulator.revise_interims
        self.stream = StreamTranscriber(
            sample_rate=record.sample_rate,
            spc=emulator.samples_per_char(record.sample_rate),
            lag=emulator.lag,
        )
        record.transcriber = self.stream
        self.request_id = str(uuid.uuid4())
        self.model_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, self.model))
        self._segment_start = 0.0
        self._shown = 0  # words starting before this sample were shown in an interim
        self._last_final_end: float | None = None  # end of the last word finalized
        self._utterance_ended = True
        self._speech_announced = False

    # Inputs.

    def audio_received(self, audio: bytes) -> None:
        """Take in one audio message (then ask for :meth:`results`)."""
        self.stream.audio_received(audio)
        self.record.audio_bytes += len(audio)

    def results(self) -> list[dict[str, Any]]:
        """The messages the audio received so far makes due."""
        stream = self.stream
        out: list[dict[str, Any]] = []
        if self.vad_events and stream.voiced and not self._speech_announced:
            self._speech_announced = True
            started = stream.speech_started_at or 0.0
            out.append({"type": "SpeechStarted", "channel": [0], "timestamp": round(started, 3)})
        pending = stream.pending()
        # Finals for the words already shown in an interim (all of them without interims).
        ready = [w for w in pending if w.offset < self._shown] if self.interim else pending
        while len(ready) >= self.words_per_final:
            group, ready = ready[: self.words_per_final], ready[self.words_per_final :]
            out.append(self._final(group, end=group[-1].end))
        if self.interim:
            pending = stream.pending()
            if pending and pending[-1].offset >= self._shown:
                self._shown = pending[-1].offset + 1
                out.append(self._interim(pending))
        endpoint = self.endpointing
        if (
            endpoint is not None
            and stream.voiced
            and not stream.in_word()
            and stream.silence * 1000 >= max(endpoint, stream.lag * 1000)
        ):
            out.append(self._final(stream.pending(flush=True), end=stream.position, speech_final=True))
            stream.endpointed()
            self._speech_announced = False
        if (
            self.utterance_end is not None
            and not self._utterance_ended
            and self._last_final_end is not None
            and not stream.in_word()
            and not stream.pending(flush=True)
            and (stream.position - self._last_final_end) * 1000 >= self.utterance_end
            and stream.silence * 1000 >= self.utterance_end
        ):
            self._utterance_ended = True
            out.append(
                {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": round(self._last_final_end, 3)}
            )
        return out

    def finalize(self) -> list[dict[str, Any]]:
        """A ``Finalize``: every word received so far, final, with ``from_finalize``."""
        stream = self.stream
        return [self._final(stream.pending(flush=True), end=stream.position, from_finalize=True)]

    def close_stream(self) -> list[dict[str, Any]]:
        """A ``CloseStream``: what is left, final, then the summary ``Metadata``."""
        stream = self.stream
        out: list[dict[str, Any]] = []
        pending = stream.pending(flush=True)
        if pending or stream.position > self._segment_start:
            out.append(self._final(pending, end=stream.position))
        out.append(
            {
                "type": "Metadata",
                "transaction_key": "deprecated",
                "request_id": self.request_id,
                "sha256": stream.sha256,
                "created": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "duration": round(stream.position, 3),
                "channels": 1,
                "models": [self.model_uuid],
                "model_info": {self.model_uuid: self._model_info()},
            }
        )
        return out

    def error(self) -> None:
        """An error: the words not finalized are lost, as on the real service."""
        self.record.words_dropped.extend(word.text for word in self.stream.discard())
        self._segment_start = self.stream.position
        self._shown = 0

    def ended(self) -> None:
        """The connection ended: what was not finalized is lost."""
        self.record.words_dropped.extend(word.text for word in self.stream.pending(flush=True))

    # Messages.

    def _model_info(self) -> dict[str, str]:
        return {"name": self.model, "version": "emulated", "arch": "nova-3"}

    def _results(
        self,
        words: list[tuple[StreamWord, str, str]],
        *,
        start: float,
        end: float,
        is_final: bool,
        speech_final: bool = False,
        from_finalize: bool = False,
    ) -> dict[str, Any]:
        entries = [
            {
                "word": bare,
                "start": round(word.start, 3),
                "end": round(word.end, 3),
                "confidence": CONFIDENCE,
                "punctuated_word": punctuated,
            }
            for word, bare, punctuated in words
        ]
        transcript = " ".join(p if self.punctuate else b for _, b, p in words)
        message: dict[str, Any] = {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(max(0.0, end - start), 3),
            "start": round(start, 3),
            "is_final": is_final,
            "speech_final": speech_final,
            "channel": {
                "alternatives": [
                    {"transcript": transcript, "confidence": CONFIDENCE if words else 0.0, "words": entries}
                ]
            },
            "metadata": {
                "request_id": self.request_id,
                "model_info": self._model_info(),
                "model_uuid": self.model_uuid,
            },
        }
        if from_finalize:
            message["from_finalize"] = True
        return message

    def _interim(self, words: list[StreamWord]) -> dict[str, Any]:
        entries = [(word, word.bare, word.text) for word in words]
        if self.revise and entries:
            wrong, punctuated = _misheard(words[-1])
            entries[-1] = (words[-1], wrong, punctuated)
        return self._results(entries, start=self._segment_start, end=self.stream.position, is_final=False)

    def _final(
        self,
        words: list[StreamWord],
        *,
        end: float,
        speech_final: bool = False,
        from_finalize: bool = False,
    ) -> dict[str, Any]:
        start = self._segment_start
        end = max(end, start)
        self._segment_start = end
        self.stream.finalized(words)
        self.record.words_finalized.extend(word.text for word in words)
        if words:
            self._last_final_end = words[-1].end
            self._utterance_ended = False
        return self._results(
            [(word, word.bare, word.text) for word in words],
            start=start,
            end=end,
            is_final=True,
            speech_final=speech_final,
            from_finalize=from_finalize,
        )


# -- the emulator -------------------------------------------------------------


class _Session(Protocol):
    """One connection's sans-I/O protocol state, as :class:`STTEmulator` drives it."""

    record: StreamRecord
    closing: bool  # an error was sent: nothing more is heard

    def audio_received(self, audio: bytes) -> None: ...

    def results(self) -> list[dict[str, Any]]: ...


class STTEmulator(WebsocketEmulator):
    """What the speech-to-text emulators share: the endpoint, the streams served, waiting on them.

    A subclass sets :attr:`path`, speaks its protocol in ``serve_connection``
    (starting with :meth:`_open_stream`) and calls :meth:`_signal` after every
    message in or out.

    Args:
        plan: Faults to inject.
        api_key: The key the handshake must carry (as the provider's header
            spells it); any key when None.
        ms_per_char: Duration of one character of the caller's speech code.
    """

    path = ""
    """The provider's endpoint; any other path is answered 404."""

    def __init__(self, *, plan: FaultPlan | None, api_key: str | None, ms_per_char: float) -> None:
        """Create a stopped emulator."""
        if ms_per_char <= 0:
            raise ValueError("ms_per_char must be positive")
        super().__init__(plan=plan, api_key=api_key)
        self.ms_per_char = ms_per_char
        self.streams: list[StreamRecord] = []
        self._changed = asyncio.Condition()
        # The protocol state of each connection being served, by id(state).
        self._sessions: dict[int, Any] = {}

    @property
    def ws_url(self) -> str:
        """The endpoint's URL (``ws://127.0.0.1:PORT`` and :attr:`path`)."""
        return f"{self.url}{self.path}"

    def samples_per_char(self, sample_rate: int | None = None) -> int:
        """Samples per character at ``sample_rate`` (what the caller encodes with)."""
        return samples_per_char(sample_rate or 16000, self.ms_per_char)

    # -- what happened, for tests ------------------------------------------

    def stream(self, connection: int = -1) -> StreamRecord:
        """The :class:`StreamRecord` of a connection that was served (negative counts from the last).

        Raises:
            LookupError: If that connection was refused, or none was served.
        """
        index = self.connections[connection].index
        for record in self.streams:
            if record.index == index:
                return record
        raise LookupError(f"{self.name}: connection {index} was not served")

    def words_finalized(self) -> list[str]:
        """Every word finalized (a final result, an ended turn), on every connection, in order."""
        return [word for record in self.streams for word in record.words_finalized]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; checked after every message in or out.

        Raises:
            TimeoutError: If it does not hold within ``timeout`` seconds.
        """
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    async def _signal(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _on_audio(self, state: ConnectionState, session: _Session, audio: bytes) -> None:
        """Transcribe one audio message, unless a fault it triggers stops that."""
        if state.faulted.is_set() or session.closing:
            return  # closing, aborted or stalled: nothing more is heard
        session.audio_received(audio)
        try:
            await state.audio_received()
        except WorkFailed:
            return  # the error dropped what was not final, this message included
        await self._send(state, session.results())

    async def _send(self, state: ConnectionState, messages: list[dict[str, Any]]) -> None:
        """Send ``messages`` in order, recording them in the connection's stream record."""
        session = self._sessions.get(id(state))
        for message in messages:
            await state.send(json.dumps(message))
            if session is not None:
                session.record.sent.append(message)
        if messages:
            await self._signal()

    # -- handshake ---------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        response = super()._process_request(connection, request)
        if response is None and urlsplit(request.path).path != self.path:
            record = self.connections[-1]
            record.refused = 404
            record.closed = True
            return connection.respond(404, f"{self.name}: no such path\n")
        return response

    def _open_stream(self, state: ConnectionState) -> StreamRecord:
        """Start the record of a connection being served (its query and sample rate)."""
        query = dict(parse_qsl(urlsplit(state.record.path).query))
        record = StreamRecord(state.record.index, query, int(query.get("sample_rate", "16000")))
        self.streams.append(record)
        return record


class DeepgramSTTEmulator(STTEmulator):
    """Emulates Deepgram's live transcription websocket (``/v1/listen``) on 127.0.0.1.

    Example::

        plan = FaultPlan(Fault.close(1011, after_audio_received=50))
        async with DeepgramSTTEmulator(plan=plan, api_key="test-key") as emulator:
            stt = DeepgramSTTService(api_key="test-key", base_url=emulator.url)

    Args:
        plan: Faults to inject.
        api_key: Required key (``Authorization: Token KEY``, HTTP 401
            otherwise); any key when None.
        ms_per_char: Duration of one character of the caller's speech code.
        words_per_final: Words per final result before an endpoint.
        lag: Seconds of audio the server waits for after a word before
            transcribing it (a ``Finalize`` or an endpoint flushes it).
        revise_interims: Mishear the newest word of every interim result.
        idle_timeout: Close with 1011 ``NET-0001`` after this many seconds
            without a message from the client; never when None.
    """

    name = "DeepgramSTTEmulator"
    api_key_header = "Authorization"
    path = PATH

    def __init__(
        self,
        *,
        plan: FaultPlan | None = None,
        api_key: str | None = None,
        ms_per_char: float = 10.0,
        words_per_final: int = 1,
        lag: float = 0.0,
        revise_interims: bool = False,
        idle_timeout: float | None = None,
    ) -> None:
        """Create a stopped emulator."""
        if words_per_final < 1:
            raise ValueError("words_per_final must be at least 1")
        if lag < 0:
            raise ValueError("lag must not be negative")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        super().__init__(
            plan=plan, api_key=None if api_key is None else f"Token {api_key}", ms_per_char=ms_per_char
        )
        self.words_per_final = words_per_final
        self.lag = lag
        self.revise_interims = revise_interims
        self.idle_timeout = idle_timeout

    # -- protocol ------------------------------------------------------------

    async def serve_connection(self, state: ConnectionState) -> None:
        """Speak the live transcription protocol on one connection."""
        record = self._open_stream(state)
        session = _Listen(self, record)
        self._sessions[id(state)] = session
        activity = asyncio.Event()
        watchdog = None
        if self.idle_timeout is not None:
            watchdog = asyncio.create_task(self._watch_idle(state, activity, self.idle_timeout))
            self.track(watchdog)
        try:
            async for raw in state.ws:
                activity.set()
                if isinstance(raw, bytes):
                    if raw:
                        await self._on_audio(state, session, raw)
                    continue
                message = json.loads(raw)
                state.record.messages.append(message)
                kind = message.get("type") if isinstance(message, dict) else None
                if kind == "Finalize":
                    await self._send(state, session.finalize())
                elif kind == "CloseStream":
                    await self._send(state, session.close_stream())
                    await state.ws.close(1000)
                    break
                await self._signal()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            session.ended()
            self._sessions.pop(id(state), None)
            await self._signal()

    async def _watch_idle(self, state: ConnectionState, activity: asyncio.Event, timeout: float) -> None:
        """Close with 1011 NET-0001 once ``timeout`` passes without a client message."""
        while True:
            activity.clear()
            try:
                await asyncio.wait_for(activity.wait(), timeout)
            except TimeoutError:
                if not state.faulted.is_set():
                    with contextlib.suppress(ConnectionClosed):
                        await state.ws.close(1011, "NET-0001")
                return

    async def send_error(self, state: ConnectionState, fault: Fault) -> None:
        """Send Deepgram's error message; the words not finalized are lost, the socket stays open."""
        session = self._sessions.get(id(state))
        message = {
            "type": "Error",
            "variant": "InternalServerError",
            "description": fault.reason,
            "code": str(fault.code),
        }
        await state.ws.send(json.dumps(message))
        if session is not None:
            session.record.sent.append(message)
            session.error()
        await self._signal()
