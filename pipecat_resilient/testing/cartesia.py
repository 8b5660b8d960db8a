"""A local emulator of Cartesia's TTS websocket API (``/tts/websocket``, version 2026-03-01).

Point the stock ``CartesiaTTSService`` at it with
``url=f"{emulator.url}/tts/websocket"`` (the URL is used verbatim) and it
behaves like the real service, with speech-code audio
(:mod:`pipecat_resilient.testing.speech`) and word timestamps exactly
consistent with that audio, so a test can decode what a listener heard and
compare it with what Pipecat wrote into the LLM context. Faults come from a
:class:`~pipecat_resilient.testing.faults.FaultPlan`.

Protocol (headers ``X-API-Key`` and ``Cartesia-Version``):

* client: a generation request ``{"transcript": T, "continue": bool,
  "context_id": C, "model_id", "voice": {"mode": "id", "id"},
  "output_format": {"container", "encoding", "sample_rate"},
  "add_timestamps": true, ...}``; Pipecat flushes a context with the same
  request, ``transcript: ""`` and ``continue: false``; a cancel
  ``{"context_id": C, "cancel": true}``;
* server: ``{"type": "chunk", "data": b64, "done": false, "status_code": 206,
  "step_time", "context_id"}`` per audio chunk; ``{"type": "timestamps",
  "done": false, "status_code": 206, "context_id", "word_timestamps":
  {"words": [...], "start": [...], "end": [...]}}`` (one message may carry
  several words); ``{"type": "done", "done": true, "status_code": 206,
  "context_id"}`` once a context that got ``continue: false`` has no more
  audio; an error as ``{"type": "error", "done": true, "status_code": N,
  "error_code", "title", "message", "request_id", "context_id"}``.

Message formats follow Cartesia's API reference for ``/tts/websocket``
(version 2026-03-01) and its "API Errors" page (docs.cartesia.ai); an error
on an older ``Cartesia-Version`` is one ``error`` string, as those versions sent.

Every transcript of a context is synthesized as it arrives, exactly as sent,
spaces kept; a word never spans two transcripts. Pipecat sends sentences
without a separating space (``"fox."`` then ``"It jumps"``), and the audio
has none either, but the speech code still ends the word at each transcript. Contexts are
synthesized independently and concurrently: a new context never waits
behind another. Word times are seconds from the start of the context's
audio, cumulative across its transcripts, spaces counted.

Real Cartesia does not fix how word timestamps are grouped or where they
fall against the audio, so the ``timestamps`` option picks an unkind but
legal schedule (words always in order):

* ``"after"`` (default): a word's timestamps right after the chunk that
  completes its audio (words completed by the same chunk share a message);
* ``"grouped"``: ``words_per_timestamps`` words at a time, sent together
  after the audio of all of them, possibly several chunks (or transcripts)
  later; a partial group is flushed before ``done``;
* ``"ahead"``: each group of ``words_per_timestamps`` words sent *before*
  the audio chunks that cover them;
* ``"shuffled"``: each group takes one of the above at random (``seed``);
  a group that would overtake the one before it waits for it.

Faults: ``after_audio_chunks`` counts ``chunk`` messages sent,
``after_text_messages`` generation requests with a non-empty transcript.
An ERROR fault sends Cartesia's error message for the context the
triggering message belonged to (for a timer, the context that last sent
audio or text); that context is abandoned (no more chunks, and no separate
``done``: the error carries ``done: true``) and the socket stays open.
Requests for a context that is done, cancelled or failed are recorded and
otherwise ignored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus

from websockets.exceptions import ConnectionClosed

from pipecat_resilient.testing._server import ConnectionState, WebsocketEmulator, WorkFailed, _Faulted
from pipecat_resilient.testing.faults import Fault, FaultPlan
from pipecat_resilient.testing.speech import encode, samples_per_char

__all__ = ["TIMESTAMP_MODES", "CartesiaEmulator"]

TIMESTAMP_MODES = ("after", "grouped", "ahead", "shuffled")
"""The word timestamp schedules :class:`CartesiaEmulator` can follow."""

# The version Pipecat 1.14 pins; older versions sent errors as one ``error`` string.
STRUCTURED_ERRORS_SINCE = "2026-03-01"
# Every message of a context in progress carries HTTP 206 (partial content).
_IN_PROGRESS = 206
_WORD = re.compile(r"\S+")


@dataclass(frozen=True, slots=True)
class _Word:
    """A word of a context, in characters from the start of the context's audio."""

    text: str
    start: int
    end: int  # one past its last character


@dataclass(slots=True)
class _Message:
    """Timestamps to send at ``slot``: before chunk k is ``2k``, after it ``2k + 1``."""

    slot: int
    words: list[_Word]
    mergeable: bool  # per-word timestamps: words completed by one chunk share a message


@dataclass
class _Context:
    id: str
    sample_rate: int
    rng: random.Random
    jobs: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)  # None: no more input
    chars: int = 0  # characters synthesized so far, the clock of its timestamps
    pending: list[_Word] = field(default_factory=list)  # grouped: spoken, timestamps not sent yet
    closed: bool = False  # got continue: false
    ended: bool = False  # done, cancelled or failed: further input is ignored
    synthesizer: asyncio.Task[None] | None = None


@dataclass
class _Session:
    state: ConnectionState
    version: str
    contexts: dict[str, _Context] = field(default_factory=dict)
    current: str | None = None  # the context whose message was last sent or received


class CartesiaEmulator(WebsocketEmulator):
    """Emulates Cartesia's TTS websocket API on 127.0.0.1.

    Example::

        async with CartesiaEmulator(timestamps="ahead") as emulator:
            tts = CartesiaTTSService(
                api_key="test",
                url=f"{emulator.url}/tts/websocket",
                settings=CartesiaTTSService.Settings(voice="voice-a"),
            )

    Args:
        plan: Faults to inject.
        api_key: Required ``X-API-Key`` (HTTP 401 otherwise); any key when None.
        ms_per_char: Duration of the audio for one character.
        chars_per_chunk: Characters per ``chunk`` message (chunks may split words).
        first_audio_delay: Seconds before the first audio of each transcript.
        realtime: Pace audio at its own duration; when False, send it as fast
            as the client reads it.
        timestamps: When word timestamps are sent against the audio, one of
            :data:`TIMESTAMP_MODES` (see the module docstring).
        words_per_timestamps: Words per group in the ``"grouped"``, ``"ahead"``
            and ``"shuffled"`` modes.
        seed: Seeds the ``"shuffled"`` mode's choices (per connection and
            context, so concurrent contexts do not disturb each other).
    """

    name = "CartesiaEmulator"
    api_key_header = "x-api-key"

    def __init__(
        self,
        *,
        plan: FaultPlan | None = None,
        api_key: str | None = None,
        ms_per_char: float = 10.0,
        chars_per_chunk: int = 5,
        first_audio_delay: float = 0.0,
        realtime: bool = False,
        timestamps: str = "after",
        words_per_timestamps: int = 3,
        seed: int = 0,
    ) -> None:
        """Create a stopped emulator."""
        if chars_per_chunk < 1:
            raise ValueError("chars_per_chunk must be at least 1")
        if ms_per_char <= 0:
            raise ValueError("ms_per_char must be positive")
        if timestamps not in TIMESTAMP_MODES:
            raise ValueError(f"timestamps must be one of {', '.join(TIMESTAMP_MODES)}, got {timestamps!r}")
        if words_per_timestamps < 1:
            raise ValueError("words_per_timestamps must be at least 1")
        super().__init__(plan=plan, api_key=api_key)
        self.ms_per_char = ms_per_char
        self.chars_per_chunk = chars_per_chunk
        self.first_audio_delay = first_audio_delay
        self.realtime = realtime
        self.timestamps = timestamps
        self.words_per_timestamps = words_per_timestamps
        self.seed = seed
        self._sessions: dict[int, _Session] = {}

    async def serve_connection(self, state: ConnectionState) -> None:
        """Speak the TTS websocket protocol on one connection."""
        request = state.ws.request
        version = request.headers.get("cartesia-version", "") if request is not None else ""
        session = _Session(state, version)
        self._sessions[id(state)] = session
        try:
            async for raw in state.ws:
                message = json.loads(raw)
                state.record.messages.append(message)
                try:
                    await self._on_message(session, message)
                except WorkFailed:
                    # The error went out and its context was abandoned (send_error).
                    pass
        finally:
            self._sessions.pop(id(state), None)
            for context in session.contexts.values():
                if context.synthesizer is not None:
                    context.synthesizer.cancel()

    async def send_error(self, state: ConnectionState, fault: Fault) -> None:
        """Send Cartesia's error message; the context it names is abandoned, the socket stays open."""
        session = self._sessions.get(id(state))
        context_id = session.current if session is not None else None
        context = session.contexts.get(context_id) if session is not None and context_id else None
        if context is not None:
            # Abandon it before anything else can go out: no more chunks, no done.
            context.ended = True
            task = context.synthesizer
            if task is not None and task is not asyncio.current_task():
                task.cancel()  # fired by a timer or a request: stop it here
        await state.ws.send(json.dumps(self._error(session, fault, context_id)))

    def _error(self, session: _Session | None, fault: Fault, context_id: str | None) -> dict[str, object]:
        """Cartesia's error event: structured since 2026-03-01, one ``error`` string before."""
        try:
            title = HTTPStatus(fault.code).phrase
        except ValueError:
            title = "Error"
        request_id = str(uuid.uuid4())
        message: dict[str, object] = {"type": "error", "done": True, "status_code": fault.code}
        if session is not None and session.version and session.version < STRUCTURED_ERRORS_SINCE:
            message["error"] = f"{title}: {fault.reason}"
        else:
            # https://docs.cartesia.ai/use-the-api/api-errors: error_code may be null.
            message["error_code"] = "concurrency_limited" if fault.code == 429 else None
            message["title"] = title
            message["message"] = fault.reason
            message["request_id"] = f"{request_id}:{context_id}" if context_id else request_id
        if context_id is not None:
            message["context_id"] = context_id
        return message

    async def _on_message(self, session: _Session, message: dict[str, object]) -> None:
        """Handle one client message."""
        state = session.state
        context_id = message.get("context_id")
        if not isinstance(context_id, str):
            return
        context = session.contexts.get(context_id)
        if message.get("cancel"):
            if context is not None and not context.ended:
                context.ended = True
                if context.synthesizer is not None:
                    context.synthesizer.cancel()
            return
        transcript = message.get("transcript")
        if not isinstance(transcript, str):
            return
        if context is None:
            context = self._open(session, context_id, message)
        if transcript:
            state.record.texts.append((context_id, transcript))
        if not context.ended and not context.closed:
            if transcript:
                context.jobs.put_nowait(transcript)
            # "continue" defaults to false: a request without it ends the context.
            if not message.get("continue", False):
                context.closed = True
                context.jobs.put_nowait(None)
        if transcript:
            session.current = context_id
            await state.text_received()

    def _open(self, session: _Session, context_id: str, message: dict[str, object]) -> _Context:
        """Start a context's synthesizer; the first request fixes its output format."""
        output_format = message.get("output_format")
        sample_rate = 44100
        if isinstance(output_format, dict) and isinstance(output_format.get("sample_rate"), int):
            sample_rate = output_format["sample_rate"]
        ordinal = len(session.contexts)
        rng = random.Random(f"{self.seed}:{session.state.record.index}:{ordinal}")
        context = session.contexts[context_id] = _Context(context_id, sample_rate, rng)
        context.synthesizer = asyncio.create_task(self._speak(session, context))
        self.track(context.synthesizer)
        return context

    async def _speak(self, session: _Session, context: _Context) -> None:
        """Run a context's synthesis until it is done, or abandoned, or the connection is gone."""
        with contextlib.suppress(_Faulted, ConnectionClosed, WorkFailed):
            await self._synthesize(session, context)

    async def _synthesize(self, session: _Session, context: _Context) -> None:
        """Turn a context's transcripts into chunks and timestamps, in order, then done."""
        state = session.state
        while True:
            text = await context.jobs.get()
            if text is None:
                if context.pending:
                    await self._send_timestamps(session, context, context.pending)
                    context.pending = []
                context.ended = True
                await state.send(
                    json.dumps(
                        {"type": "done", "done": True, "status_code": _IN_PROGRESS, "context_id": context.id}
                    )
                )
                state.record.finished += 1
                return
            await self._say(session, context, text)

    async def _say(self, session: _Session, context: _Context, text: str) -> None:
        """Send one transcript's audio chunks, with its word timestamps where the mode puts them."""
        state = session.state
        base = context.chars
        words = [_Word(m.group(), base + m.start(), base + m.end()) for m in _WORD.finditer(text)]
        plan = self._plan(context, words, base)
        delay = self.first_audio_delay + state.take_first_audio_delay()
        if delay:
            await asyncio.sleep(delay)
        size = self.chars_per_chunk
        for index, start in enumerate(range(0, len(text), size)):
            while plan and plan[0].slot <= 2 * index:
                await self._send_timestamps(session, context, plan.pop(0).words)
            chunk = text[start : start + size]
            last = start + size >= len(text)
            audio = encode(
                chunk,
                sample_rate=context.sample_rate,
                ms_per_char=self.ms_per_char,
                message_end=last,
                after=text[start - 1] if start else " ",
                then=None if last else text[start + size],
            )
            if index and self.realtime:
                await asyncio.sleep(len(chunk) * self.ms_per_char / 1000)
            session.current = context.id
            await state.send(
                json.dumps(
                    {
                        "type": "chunk",
                        "data": base64.b64encode(audio).decode(),
                        "done": False,
                        "status_code": _IN_PROGRESS,
                        "step_time": len(chunk) * self.ms_per_char,
                        "context_id": context.id,
                    }
                )
            )
            await state.audio_sent()
            while plan and plan[0].slot <= 2 * index + 1:
                await self._send_timestamps(session, context, plan.pop(0).words)
            # Let the client's messages in between chunks, as a network would.
            await asyncio.sleep(0)
        context.chars += len(text)

    def _plan(self, context: _Context, words: list[_Word], base: int) -> list[_Message]:
        """Where each of a transcript's timestamps messages goes, in word order.

        ``"grouped"`` carries a partial group over in ``context.pending``.
        """
        size = self.chars_per_chunk
        group = self.words_per_timestamps

        def before(word: _Word) -> int:
            return 2 * ((word.start - base) // size)

        def after(word: _Word) -> int:
            return 2 * ((word.end - 1 - base) // size) + 1

        planned: list[_Message] = []
        if self.timestamps == "grouped":
            queue = context.pending + words
            full = len(queue) - len(queue) % group
            for i in range(0, full, group):
                planned.append(_Message(after(queue[i + group - 1]), queue[i : i + group], False))
            context.pending = queue[full:]
        else:
            for i in range(0, len(words), group):
                chosen = words[i : i + group]
                mode = self.timestamps
                if mode == "shuffled":
                    mode = context.rng.choice(("after", "grouped", "ahead"))
                if mode == "after":
                    planned.extend(_Message(after(word), [word], True) for word in chosen)
                elif mode == "grouped":
                    planned.append(_Message(after(chosen[-1]), chosen, False))
                else:
                    planned.append(_Message(before(chosen[0]), chosen, False))
        # Words go out in order: a message never overtakes the one before it.
        messages: list[_Message] = []
        for message in planned:
            if messages and message.slot < messages[-1].slot:
                message.slot = messages[-1].slot
            previous = messages[-1] if messages else None
            if previous and message.mergeable and previous.mergeable and previous.slot == message.slot:
                previous.words.extend(message.words)
            else:
                messages.append(_Message(message.slot, list(message.words), message.mergeable))
        return messages

    async def _send_timestamps(self, session: _Session, context: _Context, words: list[_Word]) -> None:
        """Send one ``timestamps`` message; times are exact multiples of a character's audio."""
        spc = samples_per_char(context.sample_rate, self.ms_per_char)
        rate = context.sample_rate
        await session.state.send(
            json.dumps(
                {
                    "type": "timestamps",
                    "done": False,
                    "status_code": _IN_PROGRESS,
                    "context_id": context.id,
                    "word_timestamps": {
                        "words": [word.text for word in words],
                        "start": [word.start * spc / rate for word in words],
                        "end": [word.end * spc / rate for word in words],
                    },
                }
            )
        )
