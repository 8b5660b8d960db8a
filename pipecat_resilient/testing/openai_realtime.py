"""A local emulator of the OpenAI Realtime API (GA) websocket.

Point the stock ``OpenAIRealtimeLLMService`` at it with
``base_url=emulator.base_url`` (it appends ``?model=...``) and it talks to a
scripted model that answers in speech-code audio
(:mod:`pipecat_resilient.testing.speech`) with output transcripts, calls
tools, keeps the conversation of its session, honours truncation, and fails on
cue from a :class:`~pipecat_resilient.testing.faults.FaultPlan`.

Protocol (``ws://HOST/v1/realtime?model=M``, header ``Authorization: Bearer
KEY``), as the openai SDK 3.60 types and Pipecat 1.14 describe it:

* server, at once: ``session.created {session}`` (the GA defaults: server VAD,
  no input transcription, 24 kHz ``audio/pcm`` both ways);
* client ``session.update {session}`` (merged; ``audio.input.turn_detection:
  null`` turns server VAD off) -> ``session.updated {session}``;
* client ``conversation.item.create {previous_item_id?, item}`` (``message``
  of role user, system or assistant; ``function_call``;
  ``function_call_output``) -> ``conversation.item.added`` then
  ``conversation.item.done``, both ``{previous_item_id, item}``;
* client ``input_audio_buffer.append {audio}`` (base64 pcm16, 24 kHz). With
  server VAD: ``input_audio_buffer.speech_started {audio_start_ms, item_id}``
  at the first speech-code sample (cancelling a response in progress, when
  ``interrupt_response``), and once the session's ``silence_duration_ms``
  (200 by default) has passed after the end of a speech-code message with no
  new speech, ``input_audio_buffer.speech_stopped {audio_end_ms, item_id}``
  (the end of speech plus the silence), then the commit below and, when
  ``create_response`` (the default), a response.
  Without VAD the client sends ``input_audio_buffer.commit``, which is
  refused (``input_audio_buffer_commit_empty``) under 100 ms of audio. A
  commit sends ``input_audio_buffer.committed {previous_item_id, item_id}``,
  the user item (``input_audio`` content) as ``conversation.item.added`` /
  ``.done``, and, when the session asks for input transcription,
  ``conversation.item.input_audio_transcription.completed {item_id,
  content_index, transcript, usage}``. ``input_audio_buffer.clear`` ->
  ``input_audio_buffer.cleared``;
* client ``response.create {response?}`` -> ``response.created``,
  ``response.output_item.added``, ``conversation.item.added``,
  ``response.content_part.added``, then ``response.output_audio.delta`` and
  ``response.output_audio_transcript.delta`` (or ``response.output_text.delta``
  with ``output_modalities: ["text"]``), then ``response.output_audio.done``,
  ``response.output_audio_transcript.done {transcript}``,
  ``response.content_part.done``, ``response.output_item.done``,
  ``conversation.item.done`` and ``response.done {response: {status, output,
  usage}}``. A tool call is a ``function_call`` item with
  ``response.function_call_arguments.delta`` / ``.done {name, call_id,
  arguments}``. A second create while a response runs is refused
  (``conversation_already_has_active_response``);
* client ``response.cancel`` -> the open item is closed ``incomplete`` and
  ``response.done`` has ``status: "cancelled"``, ``status_details: {type:
  "cancelled", reason: "client_cancelled"}`` (``"turn_detected"`` when server
  VAD hears the user start speaking); with no response running, an error
  ``response_cancel_not_active``;
* client ``conversation.item.truncate {item_id, content_index, audio_end_ms}``
  -> ``conversation.item.truncated {item_id, content_index, audio_end_ms}``;
  the item keeps, as its transcript, the words whose audio ends within
  ``audio_end_ms`` (the real API "removes the server-side text transcript" so
  that "there is no text in the context that hasn't been heard"). Past the
  audio's end, or on an item that is not an assistant message with audio: an
  ``invalid_value`` error;
* client ``conversation.item.delete`` / ``.retrieve`` -> ``.deleted`` /
  ``.retrieved`` (an unknown id on retrieve: ``item_retrieve_invalid_item_id``);
* server ``error {error: {type, code, message, param, event_id}}`` for what it
  refuses; the socket stays open ("most errors are recoverable and the session
  will stay open", openai SDK docs).

The model reads its conversation as the items hold it (decoded speech for
user audio, transcripts for assistant audio; a user message that packs a
past conversation as Pipecat's adapter does - "This is a previously saved
conversation ..." and a JSON list of messages - reads as those messages) and,
on ``response.create``:

* after a user (or system) message, says the reply its ``script`` gives for
  the text (stripped), by default ``"You said: <text>."``; blank text gets an
  empty response unless the script maps ``""``. A :class:`ToolCall` reply is a
  ``function_call`` (call ids ``call_1``, ``call_2``, ...); once a
  ``function_call_output`` with that ``call_id`` is in the conversation, on
  whatever connection, a response says the call's reply;
* when the conversation ends with an assistant message whose words are a
  proper prefix of the reply the conversation before it gets (a cut reply a
  client re-created, or one truncated; also when a user message equal to
  ``continue_marker`` follows it), answers according to ``continuation``:
  ``"continue"`` says the rest after the heard words, ``"restart"`` the whole
  reply again, ``"repeat"`` the last ``repeat_words`` heard words again, then
  the rest. A conversation ending with anything else gets an empty response.

Unkindness: ``transcript`` places each transcript delta (``words_per_delta``
words) ``"with_audio"`` (right after the audio chunk that completes its last
word), ``"before_audio"`` (right before the chunk in which its first word
starts) or ``"after_audio"`` (one chunk after the one that completes it, so at
a cut the last words heard have no transcript); ``chars_per_chunk`` sets the
audio per delta; ``session_max_seconds`` ends each session after that long the
way the real API does: an ``error`` with code ``session_expired`` (type
``invalid_request_error``, "Your session hit the maximum duration of 60
minutes.") then a close with 1001 and the same reason (Pipecat issue #3170,
LiveKit agents #2358, reachy_mini_conversation_app #134).

Faults: close, abort, stall, refuse and delay_first_audio come from the base
class. ``error(message, code)`` sends an ``error`` event (type
``server_error`` for a code of 500 or more, else ``invalid_request_error``;
``error.code`` null) and keeps the socket open; a response in progress is
abandoned at once: its open item is closed ``incomplete`` and
``response.done`` has ``status: "failed"`` and ``status_details: {type:
"failed", error}``. Triggers: ``after_audio_chunks`` counts audio deltas (text
deltas in a text response) sent; ``after_text_messages`` counts user turns: a
``conversation.item.create`` of a user message and a committed audio turn
(system messages and tool outputs are not turns). The turn is recorded before
the count and acknowledged after it, so a fault on the Nth turn leaves it out
of the conversation. ``after_audio_received`` counts
``input_audio_buffer.append`` events; an error on one drops the audio buffered
so far.

Each connection's :class:`~pipecat_resilient.testing._server.ConnectionRecord`
holds every parsed client event in ``messages`` and, in ``texts``, each
non-blank text taken in as ``(channel, text)``: ``"message"`` for a user
message item, ``"system"`` for a system one, ``"audio"`` for committed speech.
:meth:`OpenAIRealtimeEmulator.items` and :meth:`~OpenAIRealtimeEmulator.conversation`
show the conversation as the server holds it and as the model reads it.

Chosen where the real API could not be checked from here: the ids (``item_1``,
``resp_1``, ``call_1``, ``event_1``, ``sess_1``), token counts (words in, words
and audio deltas out), the error codes and messages for invalid events and
truncations, the order of the done events of a cut response, that a user turn
is answered right after its transcription, that server VAD times the silence
by the clock (a client streams audio in real time; speech resumed within it
continues the utterance), and the HTTP 401 for a wrong key. Not emulated:
out-of-band responses (``response.conversation: "none"``, ``response.input``),
images, and formats other than ``audio/pcm``.
"""

from __future__ import annotations

import array
import asyncio
import base64
import copy
import itertools
import json
import re
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from loguru import logger
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from pipecat_resilient.policy import CONTINUE_INSTRUCTION
from pipecat_resilient.testing._server import ConnectionState, WebsocketEmulator, WorkFailed, _Faulted
from pipecat_resilient.testing.faults import Fault, FaultPlan
from pipecat_resilient.testing.gemini_live import ToolCall
from pipecat_resilient.testing.speech import MESSAGE_END, SpeechDecoder, encode, samples_per_char

__all__ = [
    "PATH",
    "SESSION_EXPIRED",
    "SERVER_ERROR",
    "Continuation",
    "OpenAIRealtimeEmulator",
    "ToolCall",
    "TranscriptOrder",
]

PATH = "/v1/realtime"
"""The websocket path; the stock service adds ``?model=<model>``."""

SESSION_EXPIRED = "Your session hit the maximum duration of 60 minutes."
"""The real API's message (error event and 1001 close reason) when a session reaches its limit."""

SERVER_ERROR = (
    "The server had an error while processing your request. Sorry about that! You can retry your "
    "request, or contact us through our help center at help.openai.com if the error persists."
)
"""The real API's message for a ``server_error`` (its session id suffix left out)."""

SAMPLE_RATE = 24000  # Hz; audio/pcm in both directions, the only rate the API takes.
_MIN_COMMIT_MS = 100  # The real API refuses to commit less audio than this.
_PACKED = "This is a previously saved conversation"  # Pipecat's adapter packs history under this.

_DEFAULT_SILENCE_MS = 200  # server VAD's silence_duration_ms when a session does not set it
# Turn detection as the API fills it in (GA defaults) when a session.update names only its type.
_SERVER_VAD: dict[str, Any] = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": _DEFAULT_SILENCE_MS,
    "idle_timeout_ms": None,
    "create_response": True,
    "interrupt_response": True,
}
_SEMANTIC_VAD: dict[str, Any] = {
    "type": "semantic_vad",
    "eagerness": "auto",
    "create_response": True,
    "interrupt_response": True,
}

Continuation = Literal["continue", "restart", "repeat"]
TranscriptOrder = Literal["with_audio", "before_audio", "after_audio"]
Reply = str | ToolCall
Script = Mapping[str, Reply] | Callable[[str], Reply | None]


@dataclass(frozen=True, slots=True)
class _Turn:
    """One entry of the conversation as the model reads it."""

    role: str  # user, system, assistant, function_call, function_call_output
    text: str
    call_id: str | None = None
    name: str | None = None


@dataclass
class _Response:
    """One response being generated."""

    id: str
    modality: str
    item: dict[str, Any] | None = None
    item_closed: bool = False
    output: list[dict[str, Any]] = field(default_factory=list)
    spoken: str = ""
    chunks: int = 0
    input_words: int = 0
    task: asyncio.Task[None] | None = None
    finished: bool = False
    error: dict[str, Any] | None = None


@dataclass
class _Link:
    """One connection's session: its configuration, conversation and input audio."""

    state: ConnectionState
    session: dict[str, Any]
    reader: asyncio.Task[Any] | None = None
    items: list[dict[str, Any]] = field(default_factory=list)
    heard: dict[str, str] = field(default_factory=dict)  # user audio item id -> decoded speech
    spoken: dict[str, str] = field(default_factory=dict)  # assistant item id -> text of its audio
    sent: list[dict[str, Any]] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    response: _Response | None = None
    event_id: str | None = None  # the client event being handled
    decoder: SpeechDecoder | None = None
    end_samples: int = 0
    speaking: bool = False
    speech_item_id: str | None = None
    pause: asyncio.Task[None] | None = None  # server VAD: the silence after speech, until speech_stopped
    samples_in: int = 0
    buffer_samples: int = 0
    timers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def index(self) -> int:
        return self.state.record.index

    def item(self, item_id: Any) -> dict[str, Any] | None:
        return next((item for item in self.items if item.get("id") == item_id), None)

    def last_item_id(self) -> str | None:
        return self.items[-1]["id"] if self.items else None

    @property
    def turn_detection(self) -> dict[str, Any] | None:
        detection = _path(self.session, "audio", "input", "turn_detection")
        return detection if isinstance(detection, dict) else None

    @property
    def transcribes_input(self) -> bool:
        return _path(self.session, "audio", "input", "transcription") is not None


def _path(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> None:
    """Merge a ``session.update`` into the session: nested objects field by field, the rest replaced."""
    for key, value in update.items():
        if key == "turn_detection" and isinstance(value, dict):
            base[key] = {**(_SERVER_VAD if value.get("type") != "semantic_vad" else _SEMANTIC_VAD), **value}
        elif isinstance(value, dict) and isinstance(base.get(key), dict) and key != "tools":
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _content_text(content: Any) -> str:
    """The text of message content: a string, or parts with ``text`` or ``transcript``."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = []
    for part in content:
        if isinstance(part, dict):
            value = part.get("text") if part.get("text") is not None else part.get("transcript")
            if isinstance(value, str):
                texts.append(value)
    return " ".join(texts)


def _unpack(text: str) -> list[_Turn] | None:
    """The messages of a conversation Pipecat's adapter packed into one user message, if it is one."""
    start = text.find("[", text.find(_PACKED)) if _PACKED in text else -1
    if start < 0:
        return None
    try:
        messages, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    if not isinstance(messages, list):
        return None
    turns = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            for call in message["tool_calls"]:
                function = call.get("function", {}) if isinstance(call, dict) else {}
                turns.append(
                    _Turn(
                        "function_call",
                        str(function.get("arguments", "")),
                        call.get("id"),
                        function.get("name"),
                    )
                )
        elif role == "tool":
            turns.append(
                _Turn(
                    "function_call_output", _content_text(message.get("content")), message.get("tool_call_id")
                )
            )
        elif role in ("user", "system", "developer", "assistant"):
            turns.append(
                _Turn("assistant" if role == "assistant" else "user", _content_text(message.get("content")))
            )
    return turns


def _words_match(heard: Sequence[str], words: Sequence[str]) -> bool:
    """Whether ``heard`` are the first words of ``words``, punctuation and case aside."""

    def norm(word: str) -> str:
        return word.strip(".,;:!?\"'()[]").casefold()

    return len(heard) <= len(words) and all(norm(a) == norm(b) for a, b in zip(heard, words, strict=False))


def _output_mapping(output: str) -> Mapping[str, Any]:
    """A function output as the mapping a :class:`ToolCall` reply is made from."""
    try:
        value = json.loads(output)
    except ValueError:
        value = output
    return value if isinstance(value, dict) else {"value": value}


def _transcript_deltas(text: str, words_per_delta: int) -> list[tuple[str, int, int]]:
    """Transcript deltas of ``text``: ``(delta, first word start, last word end)``, joining into ``text``."""
    spans = [match.span() for match in re.finditer(r"\S+", text)]
    groups = [spans[i : i + words_per_delta] for i in range(0, len(spans), words_per_delta)]
    deltas = []
    for index, group in enumerate(groups):
        start = 0 if index == 0 else group[0][0]
        end = groups[index + 1][0][0] if index + 1 < len(groups) else len(text)
        deltas.append((text[start:end], group[0][0], group[-1][1]))
    return deltas


def _echo(text: str) -> str:
    return f"You said: {text.rstrip('.!?')}."


def _parse(raw: str | bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


class OpenAIRealtimeEmulator(WebsocketEmulator):
    """Emulates the OpenAI Realtime API on 127.0.0.1.

    Example::

        script = {"What's the weather?": ToolCall("get_weather", {"city": "Paris"})}
        plan = FaultPlan(Fault.close(1011, after_audio_chunks=3))
        async with OpenAIRealtimeEmulator(script=script, plan=plan) as emu:
            llm = OpenAIRealtimeLLMService(api_key="test", base_url=emu.base_url)

    Args:
        plan: Faults to inject.
        api_key: Required bearer key (HTTP 401 otherwise); any key when None.
            Held in :attr:`api_key` as the whole header value, ``"Bearer <key>"``.
        script: The model's replies by user text (stripped), or a callable of
            the text returning a reply, or None for the default echo; a reply
            is a text to speak or a :class:`ToolCall`.
        continuation: What the model says when asked to respond after a cut
            reply: ``"continue"``, ``"restart"`` or ``"repeat"``.
        repeat_words: Heard words said again by ``"repeat"``.
        continue_marker: A user message that, right after a cut reply, asks to
            continue it, like the conversation ending with the cut reply; None
            for none.
        transcript: Where transcript deltas go relative to the audio they
            transcribe: ``"with_audio"``, ``"before_audio"`` or ``"after_audio"``.
        words_per_delta: Words per transcript delta.
        chars_per_chunk: Characters of reply per audio (or text) delta; chunks
            may split words.
        ms_per_char: Duration of the reply audio for one character.
        input_ms_per_char: Duration of one character of the user's speech-code
            audio, to decode it.
        first_audio_delay: Seconds before the first delta of each response.
        realtime: Pace reply audio at its own duration; when False, send it as
            fast as the client reads it.
        session_max_seconds: Session lifetime, after which the session
            expires as on the real API; None for no limit.
        session_expired_message: The error message and close reason then.
    """

    name = "OpenAIRealtimeEmulator"
    api_key_header = "authorization"

    def __init__(
        self,
        *,
        plan: FaultPlan | None = None,
        api_key: str | None = None,
        script: Script | None = None,
        continuation: Continuation = "continue",
        repeat_words: int = 3,
        continue_marker: str | None = CONTINUE_INSTRUCTION,
        transcript: TranscriptOrder = "with_audio",
        words_per_delta: int = 1,
        chars_per_chunk: int = 5,
        ms_per_char: float = 10.0,
        input_ms_per_char: float = 10.0,
        first_audio_delay: float = 0.0,
        realtime: bool = False,
        session_max_seconds: float | None = None,
        session_expired_message: str = SESSION_EXPIRED,
    ) -> None:
        """Create a stopped emulator."""
        if continuation not in ("continue", "restart", "repeat"):
            raise ValueError(f"continuation must be continue, restart or repeat, not {continuation!r}")
        if transcript not in ("with_audio", "before_audio", "after_audio"):
            raise ValueError(
                f"transcript must be with_audio, before_audio or after_audio, not {transcript!r}"
            )
        if words_per_delta < 1 or chars_per_chunk < 1 or repeat_words < 0:
            raise ValueError(
                "words_per_delta and chars_per_chunk must be at least 1, repeat_words at least 0"
            )
        if ms_per_char <= 0 or input_ms_per_char <= 0:
            raise ValueError("ms_per_char and input_ms_per_char must be positive")
        if session_max_seconds is not None and session_max_seconds <= 0:
            raise ValueError("session_max_seconds must be positive (or None for no limit)")
        if len(session_expired_message.encode()) > 123:
            raise ValueError("session_expired_message is a close reason: at most 123 bytes")
        super().__init__(plan=plan, api_key=None if api_key is None else f"Bearer {api_key}")
        self.script = script
        self.continuation = continuation
        self.repeat_words = repeat_words
        self.continue_marker = continue_marker
        self.transcript = transcript
        self.words_per_delta = words_per_delta
        self.chars_per_chunk = chars_per_chunk
        self.ms_per_char = ms_per_char
        self.input_ms_per_char = input_ms_per_char
        self.first_audio_delay = first_audio_delay
        self.realtime = realtime
        self.session_max_seconds = session_max_seconds
        self.session_expired_message = session_expired_message
        self._links: dict[int, _Link] = {}
        self._calls: dict[str, ToolCall] = {}
        self._numbers: dict[str, itertools.count[int]] = {}
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> OpenAIRealtimeEmulator:
        await self.start()
        return self

    @property
    def base_url(self) -> str:
        """What to pass as the stock service's ``base_url=`` (``ws://127.0.0.1:PORT/v1/realtime``)."""
        return self.url + PATH

    def samples_per_char(self, sample_rate: int | None = None) -> int:
        """Samples per character of the reply audio at ``sample_rate`` (what a decoder needs)."""
        return samples_per_char(sample_rate or SAMPLE_RATE, self.ms_per_char)

    # -- what happened, for tests -------------------------------------------

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; checked after every event in or out.

        Raises:
            TimeoutError: If it does not hold within ``timeout`` seconds.
        """
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    def client_messages(self, kind: str, connection: int = -1) -> list[dict[str, Any]]:
        """The client events of one type (``"response.create"``, ...) on one connection, in order."""
        return [
            message
            for message in self.connections[connection].messages
            if isinstance(message, dict) and message.get("type") == kind
        ]

    def client_kinds(self, connection: int = -1) -> list[str]:
        """The type of each client event on a connection, in order."""
        return [
            str(m.get("type")) if isinstance(m, dict) else "?" for m in self.connections[connection].messages
        ]

    def user_texts(self, connection: int | None = None) -> list[str]:
        """The user turns the model took in: user message texts and decoded speech, in order."""
        records = self.connections if connection is None else [self.connections[connection]]
        return [
            text for record in records for channel, text in record.texts if channel in ("message", "audio")
        ]

    def sent(self, connection: int = -1) -> list[dict[str, Any]]:
        """Every server event sent on a connection, in order."""
        link = self._links.get(self.connections[connection].index)
        return list(link.sent) if link else []

    def sent_kinds(self, connection: int = -1) -> list[str]:
        """The type of each server event sent on a connection, in order."""
        return [str(event["type"]) for event in self.sent(connection)]

    def items(self, connection: int = -1) -> list[dict[str, Any]]:
        """The conversation items as the server holds them on a connection (copies)."""
        link = self._links.get(self.connections[connection].index)
        return copy.deepcopy(link.items) if link else []

    def conversation(self, connection: int = -1) -> list[tuple[str, str]]:
        """The conversation as the model reads it, as ``(role, text)``."""
        link = self._links.get(self.connections[connection].index)
        return [(turn.role, turn.text) for turn in self._reading(link)] if link else []

    def session(self, connection: int = -1) -> dict[str, Any]:
        """The session configuration on a connection, as it stands."""
        link = self._links.get(self.connections[connection].index)
        return copy.deepcopy(link.session) if link else {}

    def replies(self, connection: int = -1) -> list[str]:
        """The text each response on a connection set out to say ("" for one with nothing to say)."""
        link = self._links.get(self.connections[connection].index)
        return list(link.replies) if link else []

    def function_call_outputs(self, connection: int | None = None) -> list[dict[str, Any]]:
        """Every ``function_call_output`` item created, on one connection or all."""
        indexes = range(len(self.connections)) if connection is None else [connection]
        return [
            event["item"]
            for index in indexes
            for event in self.client_messages("conversation.item.create", index)
            if isinstance(event.get("item"), dict) and event["item"].get("type") == "function_call_output"
        ]

    async def _signal(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._numbers.setdefault(prefix, itertools.count(1)))}"

    # -- handshake -----------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        response = super()._process_request(connection, request)
        if response is None and request.path.split("?")[0] != PATH:
            record = self.connections[-1]
            record.refused = 404
            record.closed = True
            return connection.respond(404, f"{self.name}: no such path\n")
        return response

    # -- protocol ------------------------------------------------------------

    async def serve_connection(self, state: ConnectionState) -> None:
        """Speak the Realtime protocol on one connection."""
        query = state.record.path.partition("?")[2]
        model = next((v for k, _, v in (p.partition("=") for p in query.split("&")) if k == "model"), "")
        link = _Link(state, self._default_session(model), reader=asyncio.current_task())
        self._links[state.record.index] = link
        if self.session_max_seconds is not None:
            timer = asyncio.create_task(self._expire(link, self.session_max_seconds))
            self.track(timer)
            link.timers.append(timer)
        try:
            await self._send(link, "session.created", session=link.session)
            async for raw in state.ws:
                event = _parse(raw)
                state.record.messages.append(event)
                await self._signal()
                await self._on_event(link, event)
        finally:
            tasks = [*link.timers, *([link.pause] if link.pause else [])]
            if link.response is not None and link.response.task is not None:
                tasks.append(link.response.task)
            for task in tasks:
                task.cancel()

    def _default_session(self, model: str) -> dict[str, Any]:
        pcm = {"type": "audio/pcm", "rate": SAMPLE_RATE}
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self._new_id("sess"),
            "model": model,
            "output_modalities": ["audio"],
            "instructions": "",
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "tracing": None,
            "prompt": None,
            "expires_at": 0,
            "audio": {
                "input": {
                    "format": dict(pcm),
                    "transcription": None,
                    "noise_reduction": None,
                    "turn_detection": dict(_SERVER_VAD),
                },
                "output": {"format": dict(pcm), "voice": "marin", "speed": 1.0},
            },
            "include": None,
        }

    async def _on_event(self, link: _Link, event: Any) -> None:
        """Handle one client event."""
        kind = event.get("type") if isinstance(event, dict) else None
        link.event_id = event.get("event_id") if isinstance(event, dict) else None
        try:
            if not isinstance(event, dict):
                await self._error(link, "invalid_json", "The event is not a JSON object.")
            elif kind == "session.update":
                _merge(link.session, event.get("session") or {})
                await self._send(link, "session.updated", session=link.session)
            elif kind == "input_audio_buffer.append":
                await self._on_append(link, str(event.get("audio", "")))
            elif kind == "input_audio_buffer.commit":
                await self._commit(link, manual=True)
            elif kind == "input_audio_buffer.clear":
                self._drop_input(link)
                await self._send(link, "input_audio_buffer.cleared")
            elif kind == "conversation.item.create":
                await self._on_item_create(link, event)
            elif kind == "conversation.item.truncate":
                await self._on_truncate(link, event)
            elif kind == "conversation.item.delete":
                await self._on_delete(link, event)
            elif kind == "conversation.item.retrieve":
                item = link.item(event.get("item_id"))
                if item is None:
                    await self._error(
                        link,
                        "item_retrieve_invalid_item_id",
                        f"Item with item_id not found: {event.get('item_id')}",
                    )
                else:
                    await self._send(link, "conversation.item.retrieved", item=item)
            elif kind == "response.create":
                await self._create_response(link, event.get("response") or {})
            elif kind == "response.cancel":
                await self._on_cancel(link)
            elif kind == "output_audio_buffer.clear":
                pass  # WebRTC and SIP only; nothing is buffered on a websocket.
            else:
                await self._error(link, "invalid_value", f"Invalid value: '{kind}'.", param="type")
        finally:
            link.event_id = None

    async def _error(
        self,
        link: _Link,
        code: str | None,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
    ) -> dict[str, Any]:
        """Send an ``error`` event about the client event being handled (if any)."""
        error = {"type": type_, "code": code, "message": message, "param": param, "event_id": None}
        if asyncio.current_task() is link.reader:
            error["event_id"] = link.event_id
        await self._send(link, "error", error=error)
        return error

    async def _send(self, link: _Link, kind: str, **fields: Any) -> None:
        payload = json.dumps({"type": kind, "event_id": self._new_id("event"), **fields})
        await link.state.send(payload)
        link.sent.append(json.loads(payload))
        await self._signal()

    # -- conversation items ----------------------------------------------------

    async def _add_item(self, link: _Link, item: dict[str, Any], previous: Any = None) -> None:
        """Put ``item`` in the conversation (after ``previous`` when it names an item) and announce it."""
        position = len(link.items)
        if previous == "root":
            position = 0
        elif previous is not None and link.item(previous) is not None:
            position = link.items.index(link.item(previous)) + 1  # type: ignore[arg-type]
        link.items.insert(position, item)
        previous_id = link.items[position - 1]["id"] if position else None
        await self._send(link, "conversation.item.added", previous_item_id=previous_id, item=item)
        await self._send(link, "conversation.item.done", previous_item_id=previous_id, item=item)

    async def _on_item_create(self, link: _Link, event: dict[str, Any]) -> None:
        item = event.get("item")
        kinds = ("message", "function_call", "function_call_output")
        if not isinstance(item, dict) or item.get("type") not in kinds:
            await self._error(
                link,
                "invalid_value",
                "Invalid item: type must be one of " + ", ".join(kinds),
                param="item.type",
            )
            return
        item = copy.deepcopy(item)
        item.setdefault("id", self._new_id("item"))
        item["object"] = "realtime.item"
        item["status"] = item.get("status") or "completed"
        if link.item(item["id"]) is not None:
            await self._error(link, "item_id_already_exists", f"Item with id '{item['id']}' already exists.")
            return
        if item["type"] == "message" and item.get("role") in ("user", "system"):
            text = _content_text(item.get("content"))
            if text.strip():
                channel = "message" if item["role"] == "user" else "system"
                link.state.record.texts.append((channel, text))
            if item["role"] == "user":
                try:
                    await link.state.text_received()
                except WorkFailed:
                    return  # the error is sent; the item never makes it into the conversation
        await self._add_item(link, item, event.get("previous_item_id"))

    async def _on_delete(self, link: _Link, event: dict[str, Any]) -> None:
        item = link.item(event.get("item_id"))
        if item is None:
            await self._error(link, "invalid_value", f"Item with id '{event.get('item_id')}' not found.")
            return
        link.items.remove(item)
        await self._send(link, "conversation.item.deleted", item_id=item["id"])

    async def _on_truncate(self, link: _Link, event: dict[str, Any]) -> None:
        item = link.item(event.get("item_id"))
        audio_end_ms = event.get("audio_end_ms")
        if item is None or item.get("role") != "assistant" or item["id"] not in link.spoken:
            await self._error(
                link, "invalid_value", "Only assistant messages with audio can be truncated.", param="item_id"
            )
            return
        spoken = link.spoken[item["id"]]
        duration_ms = round(len(spoken) * self.ms_per_char)
        if not isinstance(audio_end_ms, int) or not 0 <= audio_end_ms <= duration_ms:
            await self._error(
                link,
                "invalid_value",
                f"Audio content of {duration_ms}ms is already shorter than {audio_end_ms}ms",
                param="audio_end_ms",
            )
            return
        played = spoken[: int(audio_end_ms / self.ms_per_char)]
        # Keep the words whose audio was played to their end.
        whole = [m.group() for m in re.finditer(r"\S+", spoken) if m.end() <= len(played)]
        link.spoken[item["id"]] = played
        item["content"] = [{"type": "output_audio", "transcript": " ".join(whole)}]
        await self._send(
            link,
            "conversation.item.truncated",
            item_id=item["id"],
            content_index=event.get("content_index", 0),
            audio_end_ms=audio_end_ms,
        )

    # -- input audio -----------------------------------------------------------

    async def _on_append(self, link: _Link, audio: str) -> None:
        try:
            await link.state.audio_received()
        except WorkFailed:
            self._drop_input(link)
            return
        try:
            data = base64.b64decode(audio)
        except ValueError:
            await self._error(link, "invalid_value", "Invalid base64 audio.", param="audio")
            return
        await self._hear(link, data)

    async def _hear(self, link: _Link, data: bytes) -> None:
        """Take user audio in; with server VAD, find where speech starts and ends.

        Speech starts at the first speech-code sample and stops once the
        session's ``silence_duration_ms`` has passed, by the clock, after the
        end of a speech-code message with no speech since (the client streams
        audio in real time, so its time is the audio's).
        """
        spc = samples_per_char(SAMPLE_RATE, self.input_ms_per_char)
        if link.decoder is None:
            link.decoder, link.end_samples = SpeechDecoder(spc), 0
        link.decoder.feed(data)
        samples = array.array("h")
        samples.frombytes(data[: len(data) - len(data) % 2])
        if sys.byteorder != "little":
            samples.byteswap()
        base = link.samples_in
        link.samples_in += len(samples)
        link.buffer_samples += len(samples)
        detection = link.turn_detection
        if detection is None:
            return
        for index, sample in enumerate(samples):
            if sample <= 0:
                continue
            if not link.speaking and link.pause is not None and not link.pause.done():
                # Speech again before the silence was long enough: the same utterance goes on.
                link.pause.cancel()
                link.pause, link.speaking, link.end_samples = None, True, 0
            elif not link.speaking:
                link.speaking, link.end_samples = True, 0
                link.speech_item_id = self._new_id("item")
                await self._send(
                    link,
                    "input_audio_buffer.speech_started",
                    audio_start_ms=self._ms(base + index),
                    item_id=link.speech_item_id,
                )
                response = link.response
                if response is not None and detection.get("interrupt_response", True):
                    details = {"type": "cancelled", "reason": "turn_detected"}
                    await self._abandon(link, response, "cancelled", details)
            if sample & MESSAGE_END:
                link.end_samples += 1
                if link.end_samples == spc:
                    # The last character of a speech-code message is complete: silence from here.
                    link.speaking = False
                    silence = detection.get("silence_duration_ms")
                    silence_ms = _DEFAULT_SILENCE_MS if silence is None else int(silence)
                    link.pause = asyncio.create_task(
                        self._speech_stopped(link, self._ms(base + index + 1), silence_ms)
                    )
                    self.track(link.pause)

    async def _speech_stopped(self, link: _Link, end_ms: int, silence_ms: int) -> None:
        """After the silence: ``speech_stopped``, then the commit (and the response)."""
        await asyncio.sleep(silence_ms / 1000)
        link.pause = None
        try:
            await self._send(
                link,
                "input_audio_buffer.speech_stopped",
                audio_end_ms=end_ms + silence_ms,
                item_id=link.speech_item_id,
            )
            await self._commit(link, manual=False)
        except (_Faulted, ConnectionClosed):
            pass

    @staticmethod
    def _drop_input(link: _Link) -> None:
        """Forget the audio buffered so far, and any utterance in it."""
        link.decoder, link.buffer_samples, link.speaking = None, 0, False
        if link.pause is not None:
            link.pause.cancel()
            link.pause = None

    @staticmethod
    def _ms(samples: int) -> int:
        return samples * 1000 // SAMPLE_RATE

    async def _commit(self, link: _Link, *, manual: bool) -> None:
        """Make the buffered audio a user item; with server VAD, answer it."""
        if manual and link.pause is not None:
            link.pause.cancel()  # the client commits the utterance before server VAD would
            link.pause = None
        decoder, link.decoder = link.decoder, None
        buffered, link.buffer_samples = link.buffer_samples, 0
        item_id = link.speech_item_id or self._new_id("item")
        link.speech_item_id, link.speaking = None, False
        if manual and self._ms(buffered) < _MIN_COMMIT_MS:
            await self._error(
                link,
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, "
                f"but buffer only has {buffered * 1000 / SAMPLE_RATE:.2f}ms of audio.",
            )
            return
        text = " ".join(decoder.heard()) if decoder is not None else ""
        if text:
            link.state.record.texts.append(("audio", text))
        try:
            await link.state.text_received()
        except WorkFailed:
            return
        await self._send(
            link, "input_audio_buffer.committed", previous_item_id=link.last_item_id(), item_id=item_id
        )
        item: dict[str, Any] = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        link.heard[item_id] = text
        await self._add_item(link, item)
        if link.transcribes_input:
            item["content"][0]["transcript"] = text
            await self._send(
                link,
                "conversation.item.input_audio_transcription.completed",
                item_id=item_id,
                content_index=0,
                transcript=text,
                usage={"type": "duration", "seconds": round(buffered / SAMPLE_RATE, 3)},
            )
        detection = link.turn_detection
        if not manual and detection is not None and detection.get("create_response", True):
            if link.response is None:
                await self._create_response(link, {})

    # -- the model -------------------------------------------------------------

    def _reading(self, link: _Link) -> list[_Turn]:
        """The conversation as the model reads it."""
        turns: list[_Turn] = []
        for item in link.items:
            kind = item.get("type")
            if kind == "function_call":
                turns.append(
                    _Turn(
                        "function_call", str(item.get("arguments", "")), item.get("call_id"), item.get("name")
                    )
                )
            elif kind == "function_call_output":
                turns.append(_Turn("function_call_output", str(item.get("output", "")), item.get("call_id")))
            elif kind == "message":
                text = link.heard.get(item["id"]) or _content_text(item.get("content"))
                role = str(item.get("role"))
                unpacked = _unpack(text) if role == "user" else None
                turns.extend(unpacked if unpacked is not None else [_Turn(role, text)])
        return turns

    def _scripted(self, text: str) -> Reply | None:
        key = text.strip()
        if callable(self.script):
            reply = self.script(key)
        elif self.script is not None:
            reply = self.script.get(key)
        else:
            reply = None
        if reply is None and key:
            reply = _echo(key)
        return reply

    def _plan(self, turns: Sequence[_Turn]) -> Reply | None:
        """What the model says next after ``turns``: a text, a tool call, or nothing."""
        if not turns:
            return None
        last = turns[-1]
        if last.role == "assistant":
            return self._continue(turns[:-1], last.text)
        if last.role in ("user", "system", "developer"):
            marker = self.continue_marker
            if (
                marker
                and last.text.strip() == marker.strip()
                and len(turns) > 1
                and turns[-2].role == "assistant"
            ):
                return self._continue(turns[:-2], turns[-2].text)
            return self._scripted(last.text)
        if last.role == "function_call_output":
            call = self._calls.get(last.call_id or "")
            if call is None:
                # A call this emulator did not make (a replayed history): answer by its name.
                name = next(
                    (
                        t.name
                        for t in reversed(turns)
                        if t.role == "function_call" and t.call_id == last.call_id
                    ),
                    None,
                )
                call = ToolCall(name or "function")
            return call.reply_to(_output_mapping(last.text))
        return None  # a function call still waiting for its output

    def _continue(self, before: Sequence[_Turn], heard: str) -> str | None:
        """What follows a cut reply of which ``heard`` was kept, by :attr:`continuation`."""
        whole = self._plan(before)
        if not isinstance(whole, str):
            return None
        words, heard_words = whole.split(), heard.split()
        count = len(heard_words)
        if count >= len(words) or not _words_match(heard_words, words):
            return None  # not a cut reply of the answer: nothing to add
        if self.continuation == "restart":
            return whole
        if self.continuation == "repeat":
            count = max(0, count - self.repeat_words)
        return " ".join(words[count:])

    # -- responses -------------------------------------------------------------

    async def _create_response(self, link: _Link, params: Mapping[str, Any]) -> None:
        if link.response is not None:
            await self._error(
                link,
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {link.response.id}. "
                "Wait until the response is finished before creating a new one.",
            )
            return
        modalities = params.get("output_modalities") or link.session.get("output_modalities") or ["audio"]
        response = _Response(self._new_id("resp"), "audio" if "audio" in modalities else "text")
        turns = self._reading(link)
        response.input_words = sum(len(turn.text.split()) for turn in turns)
        plan = self._plan(turns)
        link.replies.append(plan if isinstance(plan, str) else "")
        link.response = response
        await self._send(
            link, "response.created", response=self._response_body(link, response, "in_progress")
        )
        response.task = asyncio.create_task(self._run_response(link, response, plan))
        self.track(response.task)

    async def _run_response(self, link: _Link, response: _Response, plan: Reply | None) -> None:
        try:
            if isinstance(plan, ToolCall):
                await self._call_function(link, response, plan)
            elif plan:
                await self._speak(link, response, plan)
            await self._finish(link, response, "completed")
        except WorkFailed:
            details = {"type": "failed", "error": response.error}
            await self._finish(link, response, "failed", details)
        except (_Faulted, ConnectionClosed):
            pass

    async def _open_item(self, link: _Link, response: _Response, item: dict[str, Any]) -> None:
        previous = link.last_item_id()
        link.items.append(item)
        response.output.append(item)
        response.item, response.item_closed = item, False
        output_index = len(response.output) - 1
        await self._send(
            link, "response.output_item.added", response_id=response.id, output_index=output_index, item=item
        )
        await self._send(link, "conversation.item.added", previous_item_id=previous, item=item)

    async def _call_function(self, link: _Link, response: _Response, call: ToolCall) -> None:
        call_id = self._new_id("call")
        self._calls[call_id] = call
        item: dict[str, Any] = {
            "id": self._new_id("item"),
            "object": "realtime.item",
            "type": "function_call",
            "status": "in_progress",
            "name": call.name,
            "call_id": call_id,
            "arguments": "",
        }
        await self._open_item(link, response, item)
        arguments = json.dumps(dict(call.args))
        where = {"response_id": response.id, "item_id": item["id"], "output_index": len(response.output) - 1}
        await self._send(
            link, "response.function_call_arguments.delta", **where, call_id=call_id, delta=arguments
        )
        item["arguments"] = arguments
        await self._send(
            link,
            "response.function_call_arguments.done",
            **where,
            call_id=call_id,
            name=call.name,
            arguments=arguments,
        )
        await self._close_item(link, response, incomplete=False)

    async def _speak(self, link: _Link, response: _Response, text: str) -> None:
        """Send one reply: audio (or text) deltas with transcript deltas, by :attr:`transcript`."""
        state = link.state
        item: dict[str, Any] = {
            "id": self._new_id("item"),
            "object": "realtime.item",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        await self._open_item(link, response, item)
        audio = response.modality == "audio"
        where = {"response_id": response.id, "item_id": item["id"], "output_index": len(response.output) - 1}
        part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
        await self._send(link, "response.content_part.added", **where, content_index=0, part=part)
        if audio:
            link.spoken[item["id"]] = ""
        deltas = deque(_transcript_deltas(text, self.words_per_delta) if audio else [])

        async def transcribe(*, starting_before: int = sys.maxsize, ending_by: int = sys.maxsize) -> None:
            """Send the next deltas whose first word starts before, or whose last word ends by, a place."""
            while deltas and (deltas[0][1] < starting_before or deltas[0][2] <= ending_by):
                delta = deltas.popleft()[0]
                await self._send(
                    link, "response.output_audio_transcript.delta", **where, content_index=0, delta=delta
                )

        delay = self.first_audio_delay + state.take_first_audio_delay()
        if delay:
            await asyncio.sleep(delay)
        for start in range(0, len(text), self.chars_per_chunk):
            end = min(start + self.chars_per_chunk, len(text))
            if start and self.realtime:
                await asyncio.sleep((end - start) * self.ms_per_char / 1000)
            if self.transcript == "before_audio":
                await transcribe(starting_before=end, ending_by=-1)
            if audio:
                data = base64.b64encode(self._encode(text, start, end)).decode()
                await self._send(link, "response.output_audio.delta", **where, content_index=0, delta=data)
                link.spoken[item["id"]] = text[:end]
            else:
                await self._send(
                    link, "response.output_text.delta", **where, content_index=0, delta=text[start:end]
                )
            response.spoken, response.chunks = text[:end], response.chunks + 1
            await state.audio_sent()
            if self.transcript == "with_audio":
                await transcribe(starting_before=-1, ending_by=end)
            elif self.transcript == "after_audio":
                await transcribe(starting_before=-1, ending_by=start)
            # Let the client's events in between deltas, as a network would.
            await asyncio.sleep(0)
        await transcribe()  # the rest, after the last audio
        await self._close_item(link, response, incomplete=False)

    def _encode(self, text: str, start: int, end: int) -> bytes:
        return encode(
            text[start:end],
            sample_rate=SAMPLE_RATE,
            ms_per_char=self.ms_per_char,
            message_end=end >= len(text),
            after=text[start - 1] if start else " ",
            then=text[end] if end < len(text) else None,
        )

    async def _close_item(self, link: _Link, response: _Response, *, incomplete: bool) -> None:
        """Send the done events of the response's open item (``incomplete`` when it was cut)."""
        item = response.item
        if item is None or response.item_closed:
            return
        response.item_closed = True
        where = {"response_id": response.id, "item_id": item["id"], "output_index": len(response.output) - 1}
        if item["type"] == "message":
            said = response.spoken
            if response.modality == "audio":
                await self._send(link, "response.output_audio.done", **where, content_index=0)
                await self._send(
                    link, "response.output_audio_transcript.done", **where, content_index=0, transcript=said
                )
                part = {"type": "audio", "transcript": said}
                item["content"] = [{"type": "output_audio", "transcript": said}]
            else:
                await self._send(link, "response.output_text.done", **where, content_index=0, text=said)
                part = {"type": "text", "text": said}
                item["content"] = [{"type": "output_text", "text": said}]
            await self._send(link, "response.content_part.done", **where, content_index=0, part=part)
        item["status"] = "incomplete" if incomplete else "completed"
        await self._send(
            link,
            "response.output_item.done",
            response_id=response.id,
            output_index=where["output_index"],
            item=item,
        )
        index = link.items.index(item) if item in link.items else 0
        previous = link.items[index - 1]["id"] if index else None
        await self._send(link, "conversation.item.done", previous_item_id=previous, item=item)

    async def _finish(
        self, link: _Link, response: _Response, status: str, details: dict[str, Any] | None = None
    ) -> None:
        """End a response: close its open item, then ``response.done`` with ``status``."""
        if response.finished:
            return
        response.finished = True
        if link.response is response:
            link.response = None
        try:
            await self._close_item(link, response, incomplete=status != "completed")
            await self._send(
                link, "response.done", response=self._response_body(link, response, status, details)
            )
        except (_Faulted, ConnectionClosed):
            pass

    async def _abandon(
        self, link: _Link, response: _Response, status: str, details: dict[str, Any] | None
    ) -> None:
        """Stop a response from outside its task (a cancel, speech, an error) and end it with ``status``."""
        task = response.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            if not response.finished:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._finish(link, response, status, details)

    async def _on_cancel(self, link: _Link) -> None:
        response = link.response
        if response is None:
            await self._error(
                link, "response_cancel_not_active", "Cancellation failed: no active response found"
            )
            return
        await self._abandon(link, response, "cancelled", {"type": "cancelled", "reason": "client_cancelled"})

    def _response_body(
        self, link: _Link, response: _Response, status: str, details: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "object": "realtime.response",
            "id": response.id,
            "status": status,
            "status_details": details,
            "output": response.output if status != "in_progress" else [],
            "conversation_id": f"conv_{link.index + 1}",
            "output_modalities": [response.modality],
            "max_output_tokens": "inf",
            "audio": {"output": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}, "voice": "marin"}},
            "usage": None,
            "metadata": None,
        }
        if status != "in_progress":
            said = len(response.spoken.split())
            audio_tokens = response.chunks if response.modality == "audio" else 0
            output = said + audio_tokens
            body["usage"] = {
                "total_tokens": response.input_words + output,
                "input_tokens": response.input_words,
                "output_tokens": output,
                "input_token_details": {
                    "cached_tokens": 0,
                    "text_tokens": response.input_words,
                    "audio_tokens": 0,
                    "image_tokens": 0,
                    "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0},
                },
                "output_token_details": {"text_tokens": said, "audio_tokens": audio_tokens},
            }
        return body

    # -- faults ----------------------------------------------------------------

    async def send_error(self, state: ConnectionState, fault: Fault) -> None:
        """Send an ``error`` event; abandon the response in progress, which ends ``failed``."""
        link = self._links.get(state.record.index)
        if link is None:
            return
        error = await self._error(
            link,
            None,
            fault.reason or SERVER_ERROR,
            type_="server_error" if fault.code >= 500 else "invalid_request_error",
        )
        response = link.response
        if response is None:
            return
        response.error = {key: error[key] for key in ("type", "code", "message")}
        if response.task is not asyncio.current_task():
            await self._abandon(link, response, "failed", {"type": "failed", "error": response.error})
        # Otherwise the response's own task raises WorkFailed and ends it.

    async def _expire(self, link: _Link, seconds: float) -> None:
        """End the session when its time is up: an error, then a 1001 close (as the real API does)."""
        await asyncio.sleep(seconds)
        message = self.session_expired_message
        logger.debug(f"{self.name}: connection {link.index}: session expired")
        try:
            await self._error(link, "session_expired", message)
        except (_Faulted, ConnectionClosed):
            return
        await link.state.fire(-20_000 - link.index, Fault.close(1001, message))
        await self._signal()
