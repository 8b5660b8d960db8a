"""A local emulator of the Gemini Live API (``BidiGenerateContent``), served over TLS.

Point the stock ``GeminiLiveLLMService`` at it with
``http_options=emulator.http_options()`` and it talks to a scripted model that
answers in speech-code audio (:mod:`pipecat_resilient.testing.speech`), with
output transcriptions that match the audio chunk for chunk, tool calls,
session resumption handles and GoAway. Faults come from a
:class:`~pipecat_resilient.testing.faults.FaultPlan`.

Protocol (``wss://HOST/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent``,
header ``x-goog-api-key``), as google-genai 2.34 and Pipecat 1.14 speak it:

* client: ``setup`` first (``sessionResumption: {handle?, transparent?}``,
  ``inputAudioTranscription``, ``outputAudioTranscription``,
  ``realtimeInputConfig.automaticActivityDetection.disabled``, ``tools``,
  ...), then ``client_content {turns, turnComplete}``, ``realtime_input``
  carrying ``text``, ``audio {data, mimeType}``, ``activityStart``,
  ``activityEnd`` or ``audioStreamEnd`` (``video`` and ``mediaChunks`` are
  only recorded), and ``tool_response {functionResponses: [{id, name,
  response}]}``. Keys are accepted in either casing, at every level;
* server: ``setupComplete {}``; ``serverContent`` with
  ``modelTurn.parts[].inlineData {mimeType: "audio/pcm;rate=24000", data}``,
  ``outputTranscription {text}``, ``inputTranscription {text}``,
  ``interrupted``, ``generationComplete`` and ``turnComplete`` (sent with
  ``usageMetadata``); ``toolCall {functionCalls: [{id, name, args}]}``;
  ``toolCallCancellation {ids}``; ``sessionResumptionUpdate {newHandle,
  resumable, lastConsumedClientMessageIndex?}``; ``goAway {timeLeft}``.

The model:

* Answers each user input with the reply its ``script`` gives for the input's
  text (stripped), by default ``"You said: <text>."``. Blank input (the stock
  service's ``realtime_input{text: " "}`` nudge, a blank seed turn) gets no
  reply unless the script maps ``""``. A ``systemInstruction`` is recorded
  with the setup and not read.
* Asked to go on with a reply that a drop cut short, it does what
  ``continuation`` says, as real models variously do: ``"continue"`` (the
  default) says the rest of the reply after the words heard, ``"restart"``
  the whole reply again, ``"repeat"`` the last ``repeat_words`` heard words
  again, then the rest. It is asked in one of two ways:

  - by a ``client_content`` whose ``turnComplete`` is true, when the
    conversation (the session's history, then the content's turns) ends with
    a model turn whose words are a proper prefix of the scripted reply to the
    last non-blank user turn: the caller's record of what it heard of the
    model's own turn. Trailing blank user turns are passed over (the stock
    service pads a Gemini 2.5 seed that ends with a model turn with one). The
    turns go into the history as sent, and no user turn is made up. A model
    turn that is no such prefix (a whole reply, other words) is not
    continued: the content is answered as any other;
  - by a user input worded as :class:`~pipecat_resilient.llm.ResilientLLM`
    worded it before it gave the model its own partial turn (``... last
    message was: "Q". Of your answer the user heard only: "H". ...``): the
    continuation of Q's reply after the words of H (the whole reply when H
    is missing). Kept to test clients that still ask that way.
* User input is a ``client_content`` whose ``turnComplete`` is true (its last
  user turn, or the last one sent before it), a non-blank realtime ``text``,
  or an audio utterance. Audio is decoded as speech code: an utterance ends at
  ``activityEnd``, at ``audioStreamEnd``, or, with automatic activity
  detection on, at the end of a speech-code message. It is then sent back as
  ``inputTranscription`` when the setup asked for one.
* New user input while a reply is being spoken interrupts it: the rest is
  dropped and ``serverContent.interrupted`` is sent (``activityStart``, and
  speech while automatic activity detection is on, interrupt too). Tool calls
  still waiting for a response are cancelled with ``toolCallCancellation``.
* A script entry may be a :class:`ToolCall`: the model sends a ``toolCall``
  instead of speaking, and speaks the call's reply once a ``tool_response``
  with that id arrives, on whatever connection.
* With ``sessionResumption`` in the setup, a handle (``handle-1``,
  ``handle-2``, ...) is issued after ``setupComplete`` and after every
  ``turnComplete``; ``{resumable: false}`` goes out while the model speaks or
  waits for a tool. A setup carrying a handle resumes the session as it was
  when the handle was issued. An unknown handle, an expired one
  (:meth:`GeminiLiveEmulator.expire_handles`) or any handle while
  ``refuse_resumption`` is set is refused: the socket is closed, before
  ``setupComplete``, with ``resumption_refusal`` (code, reason).
* A planned GO_AWAY fault sends ``goAway {timeLeft: "<seconds>s"}`` (right
  after ``setupComplete`` when planned for the connection's opening) and, as
  the real service does, closes the connection when the time is up (with
  ``go_away_close``; never when it is None).
* A message the real service would not parse (an unknown top-level key, an
  unknown ``realtime_input`` field such as ``turnComplete``) closes the socket
  with 1007 :data:`INVALID_ARGUMENT`, as the real service does (Pipecat PR
  #2341).

How it fails without closing the socket, as users of the real service report:

* Output transcription need not match the audio chunk for chunk
  (``transcription``): ``"with_audio"`` (the default) sends each audio
  chunk's transcription right after it (in the same message with
  ``bundle_transcription``); ``"before_audio"`` sends it
  ``transcription_skew`` chunks ahead of its audio (Vertex AI does this,
  says the stock service); ``"after_audio"`` ``transcription_skew`` chunks
  behind it; ``"grouped"`` sends ``words_per_transcription`` words at a time,
  each group once the audio of its last word went out. The pieces always add
  up to the reply's text, and ``generationComplete`` and ``turnComplete``
  follow all of the audio and all of the transcription. A fault that cuts a
  reply loses whatever was not sent yet, so a drop leaves a transcription
  that runs past, or stops short of, what was heard.
* A reply may come as output transcription with no audio at all, as about
  6.5 % of real replies do: a script entry wrapped in :class:`Silent` (every
  answer to that input, continuations included), the replies numbered in
  ``silent_replies``, or the next one
  (:meth:`GeminiLiveEmulator.silence_next_reply`). The turn ends as usual,
  and the history holds the reply as if it had been spoken.
* A reply numbered in ``quiet_replies`` goes quiet after the given number of
  audio chunks (and the transcription due by then): nothing more comes for
  it, no ``turnComplete`` either, and the socket stays open. New input
  interrupts it as it would any reply (``interrupted``) and is answered; the
  history keeps what it got to say.
* A muted session (:meth:`GeminiLiveEmulator.mute`, or ``mute_after_replies``
  ``{connection: replies}``) stops answering with the socket open: it still
  reads, records and counts client messages (faults trigger on them), and
  the websocket still answers pings, but nothing at all is sent (no reply,
  transcription, tool call, handle or ``interrupted``); a reply in progress
  stops where it is. Input that arrives while muted is never answered;
  :meth:`GeminiLiveEmulator.unmute` has later input answered again.

Replies are numbered from 0 in the order the model begins them, over all
connections: each answer spoken (or sent silent), cut ones included; a tool
call is not a reply, the answer after its response is.
:meth:`GeminiLiveEmulator.replies` lists their texts.

The Live API has no in-band error message: google-genai's
``LiveServerMessage`` has ``setupComplete``, ``serverContent``,
``toolCall``, ``toolCallCancellation``, ``usageMetadata``, ``goAway``,
``sessionResumptionUpdate``, ``voiceActivityDetectionSignal`` and
``voiceActivity``, and no error (nor does ``BidiGenerateContentServerMessage``
in the API reference); the service reports errors by closing the socket
(1007, 1008, 1011). So this emulator does not support ERROR faults: one in
the plan raises ``ValueError`` when the emulator is created or started, as
does arming or injecting one. Plan a ``Fault.close(...)`` instead.

A 1011 close from the server and a stall tell apart on the client. A STALL
fault leaves the socket half-open: the emulator reads nothing, so it answers
no ping. google-genai 2.34 connects with websockets' keepalive defaults
(:data:`CLIENT_PING_INTERVAL_S`, :data:`CLIENT_PING_TIMEOUT_S`,
:data:`CLIENT_CLOSE_TIMEOUT_S`; it passes none of its own, nor does the stock
service): the client pings within 20 s of the stall, gives up 20 s later
with ``keepalive ping timeout`` (it sends a 1011 close frame and receives
none), waits 10 s for a TCP close that never comes, and drops the
connection. Its receive then raises ``APIError`` 1006 ("abnormal closure"),
30 to 50 s after the stall, and the stock service reconnects. A 1011 close
raises ``APIError`` 1011 at once, an abort ``APIError`` 1006 at once. The
``APIError``'s ``__context__`` is websockets' ``ConnectionClosedError``:
``rcvd.code`` 1011 for the server's close; ``rcvd`` None and ``sent`` 1011
``"keepalive ping timeout"`` for a stall; both None for an abort.
``http_options(keepalive=..., close_timeout=...)`` shortens the client's
timings for tests.

Fault triggers: ``after_audio_chunks`` counts ``modelTurn`` messages (one per
audio chunk); ``after_text_messages`` counts user inputs: each
``client_content``, each realtime ``text`` (blank nudges included), each
audio utterance and each ``tool_response``. The input is recorded before the
count, and answered after it, so a fault on the Nth input leaves it unanswered.

Each connection's :class:`~pipecat_resilient.testing._server.ConnectionRecord`
holds every parsed client message in ``messages`` (the setup first), and in
``texts`` each non-blank user text as ``(channel, text)``, the channel being
``"client_content"``, ``"realtime_input"`` or ``"audio"``.

Protocol facts checked on 127.0.0.1 against the stock service, google-genai
2.34 and websockets 17.4, that PROVIDERS.md does not state or states otherwise:

* The casing is mixed below the top level too: ``setup`` has camelCase keys
  (``generationConfig``, ``sessionResumption``, ``historyConfig``,
  ``tools[].functionDeclarations``) whose own fields are snake_case
  (``response_modalities``, ``speech_config``,
  ``initial_history_in_client_content``, ``realtimeInputConfig:
  {automatic_activity_detection: {disabled}}``); ``client_content`` carries
  ``turnComplete``; an audio blob is ``{data, mime_type}``.
* Blob data (user audio) is base64 in the URL-safe alphabet (pydantic's bytes
  serialization), so a server that decodes it with the standard alphabet
  silently loses bytes. Standard base64 is fine in the other direction.
* google-genai takes the websocket's SSL context from
  ``HttpOptions.async_client_args["ssl"]`` (``_ensure_websocket_ssl_ctx``)
  and leaves the ``ssl`` key out of the args it gives httpx, so one dict
  serves every client it builds.
  It also hands the websocket every other key of that dict that websockets'
  ``connect()`` takes (``ping_interval``, ``ping_timeout``,
  ``close_timeout``), and drops those keys from the args of httpx and
  aiohttp.
* ``connect()`` waits for the first server message before it yields the
  session. A parsed server message with none of the known top-level keys
  raises ``APIError`` in ``_receive``: an emulator must never send an empty or
  unknown message.
* A connection closed before ``setupComplete`` (a refused resumption, a
  handshake answered with an HTTP error) raises out of ``connect()``, which
  Pipecat's connection task does not catch: it logs ``"... unexpected
  exception"``, pushes no ErrorFrame, does not count a failure and never
  reconnects. The service is left without a session, and later input is
  dropped silently.
* ``setup.sessionResumption`` is ``{}`` on a first connection and
  ``{"handle": H}`` on a reconnect; the stock service never sets
  ``transparent`` and never sends ``audioStreamEnd``.
* With Gemini 3 models the stock service seeds the context with
  ``client_content{turns, turnComplete: true}`` and then
  ``realtime_input{text: " "}``; with 2.5 models, without the nudge.
* A 1007 close mid-reply is handled like a 1011 or an abort: an immediate
  reconnect with the last handle, no ErrorFrame, the reply left open.
* The real service's close reasons are cut at the 123-byte limit of a close
  frame, hence "Last chunk before turn_complete must have r" (Pipecat issue
  #1495); :data:`LAST_CHUNK_BEFORE_TURN_COMPLETE` is that whole reason.

Not verifiable here, so chosen: the close code for a refused resumption
(1007, :data:`INVALID_ARGUMENT`), the close after a GoAway (1008,
:data:`GO_AWAY_EXPIRED`, as users of the real service report it), the handle
format (the real ones are UUIDs), and what ``lastConsumedClientMessageIndex``
counts (client messages on the connection, the setup being 0).
"""

from __future__ import annotations

import array
import asyncio
import base64
import itertools
import json
import re
import ssl
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from loguru import logger
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from pipecat_resilient.testing._server import ConnectionState, WebsocketEmulator, _Faulted
from pipecat_resilient.testing.faults import Fault, FaultKind, FaultPlan
from pipecat_resilient.testing.speech import MESSAGE_END, SpeechDecoder, encode, samples_per_char

if TYPE_CHECKING:
    from google.genai.types import HttpOptions

__all__ = [
    "CLIENT_CLOSE_TIMEOUT_S",
    "CLIENT_PING_INTERVAL_S",
    "CLIENT_PING_TIMEOUT_S",
    "GO_AWAY_EXPIRED",
    "INVALID_ARGUMENT",
    "LAST_CHUNK_BEFORE_TURN_COMPLETE",
    "PATH",
    "Continuation",
    "GeminiLiveEmulator",
    "Silent",
    "ToolCall",
    "TranscriptionTiming",
]

PATH = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
"""The websocket path google-genai connects to with an API key (v1beta)."""

INVALID_ARGUMENT = "Request contains an invalid argument."
"""The reason of the real service's 1007 close for a message it rejects."""

LAST_CHUNK_BEFORE_TURN_COMPLETE = (
    "Request trace id: ec5c82417d1848ee, [ORIGINAL ERROR] generic::invalid_argument: "
    "Last chunk before turn_complete must have r"
)
"""A real 1007 close reason (Pipecat issue #1495), cut at 123 bytes by the close frame."""

GO_AWAY_EXPIRED = (
    "Connection aborted because the client failed to close the connection after receiving a GoAway signal"
)
"""The reason of the real service's 1008 close once a GoAway's time is up (shortened to fit)."""

CLIENT_PING_INTERVAL_S = 20.0
"""Seconds between google-genai's keepalive pings (websockets' default; google-genai sets none)."""

CLIENT_PING_TIMEOUT_S = 20.0
"""Seconds google-genai waits for a pong before it fails the connection (websockets' default)."""

CLIENT_CLOSE_TIMEOUT_S = 10.0
"""Seconds google-genai then waits for the server to close TCP before dropping it (websockets' default)."""

Continuation = Literal["continue", "restart", "repeat"]
"""How the model goes on with a cut reply: the rest, all of it again, or the last heard words again."""

TranscriptionTiming = Literal["with_audio", "before_audio", "after_audio", "grouped"]
"""When output transcription goes out, relative to the audio it covers."""

OUTPUT_SAMPLE_RATE = 24000  # Hz; Gemini Live always answers with 24 kHz PCM.
INPUT_SAMPLE_RATE = 16000  # Hz; assumed when an audio mimeType names no rate.
_CLOSE_REASON_BYTES = 123  # RFC 6455 5.5: control frame payload <= 125, minus the code.

# Client message kinds and realtime_input fields, in snake case; either casing is accepted.
_CLIENT_KINDS = frozenset({"setup", "client_content", "realtime_input", "tool_response"})
_REALTIME_FIELDS = frozenset(
    {"text", "audio", "video", "media_chunks", "activity_start", "activity_end", "audio_stream_end"}
)
_CONTINUATIONS = ("continue", "restart", "repeat")
_TIMINGS = ("with_audio", "before_audio", "after_audio", "grouped")
_WORD = re.compile(r"\s*\S+")
_NO_ERROR_MESSAGE = (
    "GeminiLiveEmulator cannot carry out an ERROR fault: the Live API has no error message "
    "(google-genai's LiveServerMessage has none); the real service reports errors by closing "
    "the socket, so plan Fault.close(1011, ...) or Fault.close(1007, ...) instead"
)
_CAMEL_HUMP = re.compile(r"(?<!^)(?=[A-Z])")
_RATE = re.compile(r"rate=(\d+)")


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A scripted function call, as a script's reply to a user input.

    The model sends ``toolCall`` with this name and arguments, then speaks
    ``reply`` once the tool response arrives.

    Parameters:
        name: The function's name.
        args: Its arguments.
        reply: What to say once the response arrives: a text, a callable of
            the ``response`` dict, or None for ``"The <name> result is <k> <v>, ..."``.
    """

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    reply: str | Callable[[Mapping[str, Any]], str] | None = None

    def reply_to(self, response: Mapping[str, Any]) -> str:
        """The text the model speaks once ``response`` arrived."""
        if callable(self.reply):
            return self.reply(response)
        if self.reply is not None:
            return self.reply
        values = ", ".join(f"{key} {value}" for key, value in response.items())
        return f"The {self.name} result is {values or 'empty'}."


@dataclass(frozen=True, slots=True)
class Silent:
    """A scripted reply the model transcribes but never voices.

    The model sends the reply's ``outputTranscription`` with no audio at all,
    then ends its turn as usual, as real Gemini Live does for about 6.5 % of
    replies. Every answer to the input is silent, continuations included; to
    silence one reply only, use the emulator's ``silent_replies``.

    Parameters:
        text: The reply's words.
    """

    text: str


Reply = str | Silent | ToolCall
Script = Mapping[str, Reply] | Callable[[str], Reply | None]


@dataclass
class _PendingCall:
    """A tool call the model is waiting on."""

    id: str
    call: ToolCall
    connection: int


@dataclass
class _Connection:
    """One connection's protocol state, with the session it carries."""

    state: ConnectionState
    history: list[tuple[str, str]]
    resumable: bool = False
    transparent: bool = False
    automatic_activity: bool = True
    transcribe_input: bool = False
    transcribe_output: bool = True
    text_modality: bool = False
    client_messages: int = 0
    prompt: str | None = None
    replies: list[asyncio.Task[None]] = field(default_factory=list)
    decoder: SpeechDecoder | None = None
    decoder_rate: int = 0
    end_samples: int = 0
    user_speaking: bool = False
    handles: list[str] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    go_away_at: float | None = None
    timers: list[asyncio.Task[None]] = field(default_factory=list)
    muted: bool = False
    replies_done: int = 0

    @property
    def index(self) -> int:
        return self.state.record.index


def _snake(name: str) -> str:
    """``activityStart`` -> ``activity_start``; snake case is left as it is."""
    return _CAMEL_HUMP.sub("_", name).lower()


def _field(mapping: Any, name: str) -> Any:
    """``mapping[name]`` under its snake or camel case name, or None.

    google-genai mixes the two, even within one setup message.
    """
    if not isinstance(mapping, dict):
        return None
    if name in mapping:
        return mapping[name]
    head, *rest = name.split("_")
    return mapping.get(head + "".join(word.title() for word in rest))


def _duration(seconds: float) -> str:
    """A protobuf Duration in its JSON form (``"10s"``, ``"0.250s"``)."""
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{seconds:.3f}s"


def _parse(raw: str | bytes) -> Any:
    """A client message, or None for one that is not JSON (refused as invalid)."""
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _b64decode(text: str) -> bytes:
    """Decode base64 in either alphabet: google-genai sends blobs URL-safe (pydantic's
    bytes serialization), and the real service takes both, as protobuf JSON does."""
    text = text.strip().replace("+", "-").replace("/", "_")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _echo(text: str) -> str:
    return f"You said: {text.rstrip('.!?')}."


# How ResilientLLM asks a fresh session to answer again; the emulator plays a
# model that follows the instruction.
_CONTINUE = re.compile(
    r'last message was: "(?P<question>.*?)"\.(?: Of your answer the user heard only: "(?P<heard>.*?)"\.)?'
)


def _words_heard(reply: list[str], heard: list[str]) -> int:
    """How many of the reply's first words were heard, up to the first that differs."""
    count = 0
    for spoken, word in zip(heard, reply, strict=False):
        if spoken != word:
            break
        count += 1
    return count


def _go_on(reply: Reply, heard: str, how: Continuation, repeat_words: int) -> Reply:
    """What the model says when asked to go on with ``reply`` after the user heard ``heard``.

    ``"continue"``: the words after those heard; ``"restart"``: all of them;
    ``"repeat"``: the last ``repeat_words`` heard, then the rest. A tool call
    is made again.
    """
    if isinstance(reply, ToolCall):
        return reply
    words = (reply.text if isinstance(reply, Silent) else reply).split()
    count = _words_heard(words, heard.split())
    start = {"continue": count, "restart": 0, "repeat": max(0, count - repeat_words)}[how]
    text = " ".join(words[start:])
    return Silent(text) if isinstance(reply, Silent) else text


async def _forever() -> NoReturn:
    """Wait until cancelled: a reply that went quiet, or a muted model."""
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")


class GeminiLiveEmulator(WebsocketEmulator):
    """Emulates the Gemini Live API on 127.0.0.1, over TLS with a throwaway CA.

    Example::

        script = {"What's the weather?": ToolCall("get_weather", {"city": "Paris"})}
        plan = FaultPlan(Fault.close(1011, after_audio_chunks=3))
        async with GeminiLiveEmulator(script=script, plan=plan) as emu:
            llm = GeminiLiveLLMService(api_key="test", http_options=emu.http_options())

    Args:
        plan: Faults to inject.
        api_key: Required ``x-goog-api-key`` (HTTP 401 otherwise); any key when None.
        script: The model's replies by user text (stripped), or a callable of
            the text returning a reply, or None for the default echo; a reply
            is a text to speak, a :class:`Silent` text or a :class:`ToolCall`.
        ms_per_char: Duration of the reply audio for one character.
        chars_per_chunk: Characters per audio message (chunks may split words).
        input_ms_per_char: Duration of one character of the user's
            speech-code audio, to decode it.
        first_audio_delay: Seconds before the first audio of each reply.
        realtime: Pace reply audio at its own duration; when False, send it as
            fast as the client reads it.
        bundle_transcription: Send each chunk's ``outputTranscription`` in the
            same ``serverContent`` as its audio; when False, in a message of its
            own right after the audio (so a fault after N audio chunks leaves
            the Nth chunk untranscribed, as a lagging transcription would).
            Only with ``transcription="with_audio"``.
        continuation: How the model goes on with a cut reply it is asked to
            continue: ``"continue"``, ``"restart"`` or ``"repeat"``.
        repeat_words: How many heard words ``"repeat"`` says again.
        transcription: When output transcription goes out relative to the
            audio: ``"with_audio"``, ``"before_audio"``, ``"after_audio"`` or
            ``"grouped"``.
        transcription_skew: Audio chunks by which the transcription runs ahead
            of (``"before_audio"``) or behind (``"after_audio"``) its audio.
        words_per_transcription: Words per transcription message (``"grouped"``).
        silent_replies: Numbers of the replies sent as transcription only,
            with no audio.
        quiet_replies: ``{reply number: audio chunks}``: the reply goes quiet
            after that many chunks, with the socket left open.
        mute_after_replies: ``{connection: replies}``: the connection goes
            mute once it has finished that many replies (0: from the start).
        refuse_resumption: Refuse every setup that carries a handle.
        resumption_refusal: ``(code, reason)`` of the close that refuses one.
        go_away_close: ``(code, reason)`` of the close once a GoAway's time is
            up, or None to keep the connection open.
    """

    name = "GeminiLiveEmulator"
    api_key_header = "x-goog-api-key"
    scheme = "wss"

    def __init__(
        self,
        *,
        plan: FaultPlan | None = None,
        api_key: str | None = None,
        script: Script | None = None,
        ms_per_char: float = 10.0,
        chars_per_chunk: int = 5,
        input_ms_per_char: float = 10.0,
        first_audio_delay: float = 0.0,
        realtime: bool = False,
        bundle_transcription: bool = False,
        refuse_resumption: bool = False,
        resumption_refusal: tuple[int, str] = (1007, INVALID_ARGUMENT),
        go_away_close: tuple[int, str] | None = (1008, GO_AWAY_EXPIRED),
        continuation: Continuation = "continue",
        repeat_words: int = 3,
        transcription: TranscriptionTiming = "with_audio",
        transcription_skew: int = 2,
        words_per_transcription: int = 3,
        silent_replies: Collection[int] = (),
        quiet_replies: Mapping[int, int] | None = None,
        mute_after_replies: Mapping[int, int] | None = None,
    ) -> None:
        """Create a stopped emulator.

        Raises:
            ValueError: For an option out of range, or an ERROR fault in the plan.
        """
        self._check_faults(plan or ())
        if continuation not in _CONTINUATIONS:
            raise ValueError(f"continuation must be one of {', '.join(_CONTINUATIONS)}")
        if transcription not in _TIMINGS:
            raise ValueError(f"transcription must be one of {', '.join(_TIMINGS)}")
        if bundle_transcription and transcription != "with_audio":
            raise ValueError('bundle_transcription needs transcription="with_audio"')
        if repeat_words < 0 or transcription_skew < 0:
            raise ValueError("repeat_words and transcription_skew must not be negative")
        if words_per_transcription < 1:
            raise ValueError("words_per_transcription must be at least 1")
        numbers = list(silent_replies)
        for mapping in (quiet_replies or {}, mute_after_replies or {}):
            numbers += [*mapping.keys(), *mapping.values()]
        if any(number < 0 for number in numbers):
            raise ValueError("reply numbers, connections and counts must not be negative")
        if chars_per_chunk < 1:
            raise ValueError("chars_per_chunk must be at least 1")
        if ms_per_char <= 0 or input_ms_per_char <= 0:
            raise ValueError("ms_per_char and input_ms_per_char must be positive")
        for close in (resumption_refusal, go_away_close):
            if close is not None and len(close[1].encode()) > _CLOSE_REASON_BYTES:
                raise ValueError(f"a close reason takes at most {_CLOSE_REASON_BYTES} bytes")
        super().__init__(plan=plan, api_key=api_key)
        self.script = script
        self.ms_per_char = ms_per_char
        self.chars_per_chunk = chars_per_chunk
        self.input_ms_per_char = input_ms_per_char
        self.first_audio_delay = first_audio_delay
        self.realtime = realtime
        self.bundle_transcription = bundle_transcription
        self.refuse_resumption = refuse_resumption
        self.resumption_refusal = resumption_refusal
        self.go_away_close = go_away_close
        self.continuation: Continuation = continuation
        self.repeat_words = repeat_words
        self.transcription: TranscriptionTiming = transcription
        self.transcription_skew = transcription_skew
        self.words_per_transcription = words_per_transcription
        self.silent_replies = frozenset(silent_replies)
        self.quiet_replies = dict(quiet_replies or {})
        self.mute_after_replies = dict(mute_after_replies or {})
        self._reply_log: list[tuple[int, str]] = []
        self.client_ssl_context: ssl.SSLContext | None = None
        self._links: dict[int, _Connection] = {}
        self._handles: dict[str, tuple[tuple[str, str], ...]] = {}
        self._handle_numbers = itertools.count(1)
        self._call_numbers = itertools.count(1)
        self._pending_calls: dict[str, _PendingCall] = {}
        self._early_go_aways: dict[int, list[Fault]] = {}
        self._changed = asyncio.Condition()

    # -- lifecycle and client configuration ---------------------------------

    async def start(self) -> GeminiLiveEmulator:
        """Make a certificate for 127.0.0.1, then listen on an ephemeral port.

        Raises:
            ValueError: If an ERROR fault was added to the plan (not supported).
        """
        self._check_faults(self.plan)
        if self._ssl is None:
            self._ssl, self.client_ssl_context = _certificate()
        await super().start()
        return self

    async def __aenter__(self) -> GeminiLiveEmulator:
        return await self.start()

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:PORT``; google-genai turns it into ``wss://``."""
        return f"https://127.0.0.1:{self.port}"

    def http_options(
        self, *, keepalive: tuple[float, float] | None = None, close_timeout: float | None = None
    ) -> HttpOptions:
        """What to pass as the stock service's ``http_options=`` (a new object each call).

        Args:
            keepalive: ``(ping_interval, ping_timeout)`` for the client's
                websocket, in seconds, instead of google-genai's 20 s and 20 s;
                short ones let a test see a stall detected quickly.
            close_timeout: How long the client waits for the server to close
                TCP after it closed the websocket (10 s by default).

        Returns:
            ``HttpOptions(base_url=..., async_client_args={"ssl": ctx, ...})``,
            where ``ctx`` trusts this emulator's certificate; google-genai
            hands the keepalive settings to websockets' ``connect()``.

        Raises:
            RuntimeError: If the emulator is not running.
        """
        from google.genai.types import HttpOptions

        if self.client_ssl_context is None:
            raise RuntimeError(f"{self.name} is not running")
        args: dict[str, Any] = {"ssl": self.client_ssl_context}
        if keepalive is not None:
            args["ping_interval"], args["ping_timeout"] = keepalive
        if close_timeout is not None:
            args["close_timeout"] = close_timeout
        return HttpOptions(base_url=self.base_url, async_client_args=args)

    def samples_per_char(self, sample_rate: int | None = None) -> int:
        """Samples per character of the reply audio at ``sample_rate`` (what a decoder needs)."""
        return samples_per_char(sample_rate or OUTPUT_SAMPLE_RATE, self.ms_per_char)

    def expire_handles(self) -> None:
        """Forget every handle issued so far, so resuming with one is refused."""
        self._handles.clear()

    def silence_next_reply(self) -> None:
        """Have the next reply the model begins, on any connection, come as transcription only."""
        self.silent_replies = self.silent_replies | {len(self._reply_log)}

    def mute(self, connection: int = -1) -> None:
        """Make a connection's session stop answering, with its socket left open.

        It still reads and records client messages and answers pings, but
        sends nothing; a reply in progress stops where it is.

        Args:
            connection: The connection's index (negative counts from the last).

        Raises:
            RuntimeError: If the connection has no session (no setup yet, or refused).
        """
        self._session_of(connection).muted = True

    def unmute(self, connection: int = -1) -> None:
        """Have a muted connection answer input again (what came while muted stays unanswered)."""
        self._session_of(connection).muted = False

    def arm(self, fault: Fault, *, on: str = "current") -> None:
        """Plan ``fault`` while running (see the base class); ERROR faults are refused.

        Raises:
            ValueError: For an ERROR fault: the Live API has no error message.
        """
        self._check_faults([fault])
        super().arm(fault, on=on)

    async def inject(self, fault: Fault, connection: int | None = None) -> None:
        """Carry out ``fault`` now (see the base class); ERROR faults are refused.

        Raises:
            ValueError: For an ERROR fault: the Live API has no error message.
        """
        self._check_faults([fault])
        await super().inject(fault, connection)

    async def send_error(self, state: ConnectionState, fault: Fault) -> None:
        """Not supported: the Live API has no error message (reached only by a fault added late)."""
        raise NotImplementedError(_NO_ERROR_MESSAGE)

    @staticmethod
    def _check_faults(faults: Iterable[Fault]) -> None:
        if any(fault.kind is FaultKind.ERROR for fault in faults):
            raise ValueError(_NO_ERROR_MESSAGE)

    def _session_of(self, connection: int) -> _Connection:
        link = self._links.get(self.connections[connection].index)
        if link is None:
            raise RuntimeError(f"{self.name}: connection {connection} has no session")
        return link

    # -- what happened, for tests -------------------------------------------

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; checked after every message in or out.

        Raises:
            TimeoutError: If it does not hold within ``timeout`` seconds.
        """
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    def client_messages(self, kind: str, connection: int = -1) -> list[dict[str, Any]]:
        """The bodies of the client messages of one kind on one connection.

        Args:
            kind: ``"setup"``, ``"client_content"``, ``"realtime_input"`` or
                ``"tool_response"`` (either casing).
            connection: The connection's index (negative counts from the last).
        """
        kind = _snake(kind)
        bodies: list[dict[str, Any]] = []
        for message in self.connections[connection].messages:
            for key, body in message.items() if isinstance(message, dict) else ():
                if _snake(key) == kind and isinstance(body, dict):
                    bodies.append(body)
        return bodies

    def setup(self, connection: int = -1) -> dict[str, Any] | None:
        """The setup a connection opened with, or None before it arrived."""
        setups = self.client_messages("setup", connection)
        return setups[0] if setups else None

    def resumption_handle(self, connection: int = -1) -> str | None:
        """The session resumption handle sent in a connection's setup, if any."""
        handle = _field(_field(self.setup(connection), "session_resumption"), "handle")
        return handle if isinstance(handle, str) else None

    def function_responses(self, connection: int | None = None) -> list[dict[str, Any]]:
        """Every ``functionResponses`` entry received, on one connection or all."""
        indexes = [c.index for c in self.connections] if connection is None else [connection]
        responses: list[dict[str, Any]] = []
        for index in indexes:
            for body in self.client_messages("tool_response", index):
                entries = _field(body, "function_responses") or []
                responses.extend(entry for entry in entries if isinstance(entry, dict))
        return responses

    def user_texts(self, connection: int | None = None) -> list[str]:
        """The user texts the model took in (turns, realtime text, decoded audio)."""
        records = self.connections if connection is None else [self.connections[connection]]
        return [text for record in records for _, text in record.texts]

    def handles_issued(self, connection: int = -1) -> list[str]:
        """The resumption handles issued on a connection, in order."""
        link = self._links.get(self.connections[connection].index)
        return list(link.handles) if link else []

    def sent(self, connection: int = -1) -> list[dict[str, Any]]:
        """Every message sent on a connection, in order."""
        link = self._links.get(self.connections[connection].index)
        return list(link.sent) if link else []

    def sent_kinds(self, connection: int = -1) -> list[str]:
        """A short name per message sent on a connection, in order.

        The name is the message's top-level key, or for ``serverContent`` its
        fields joined by ``+`` (``modelTurn``, ``modelTurn+outputTranscription``).
        """
        kinds = []
        for message in self.sent(connection):
            content = message.get("serverContent")
            kinds.append("+".join(content) if isinstance(content, dict) else next(iter(message)))
        return kinds

    def history(self, connection: int = -1) -> list[tuple[str, str]]:
        """The session's conversation as ``(role, text)`` on a connection, as it stands."""
        link = self._links.get(self.connections[connection].index)
        return list(link.history) if link else []

    def replies(self, connection: int | None = None) -> list[str]:
        """The texts of the replies the model began, in order, on one connection or all.

        Each is the whole text the model set out to say (a continuation's
        text is what it said after the drop), whether or not it got to say it.
        """
        wanted = None if connection is None else self.connections[connection].index
        return [text for index, text in self._reply_log if wanted is None or index == wanted]

    def go_away_sent_at(self, connection: int = -1) -> float | None:
        """``time.monotonic()`` when a GoAway was sent on a connection, if one was."""
        link = self._links.get(self.connections[connection].index)
        return link.go_away_at if link else None

    async def _signal(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- handshake -----------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        response = super()._process_request(connection, request)
        if response is None and not (
            request.path.startswith("/ws/google.ai.generativelanguage.")
            and request.path.split("?")[0].endswith(".GenerativeService.BidiGenerateContent")
        ):
            record = self.connections[-1]
            record.refused = 404
            record.closed = True
            return connection.respond(404, f"{self.name}: no such path\n")
        return response

    # -- protocol ------------------------------------------------------------

    async def serve_connection(self, state: ConnectionState) -> None:
        """Speak the BidiGenerateContent protocol on one connection."""
        link = await self._open(state)
        if link is None:
            return
        try:
            async for raw in state.ws:
                message = _parse(raw)
                state.record.messages.append(message)
                await self._signal()
                if not await self._on_message(link, message):
                    break
                link.client_messages += 1
        finally:
            for task in [*link.replies, *link.timers]:
                task.cancel()

    async def _open(self, state: ConnectionState) -> _Connection | None:
        """Take the setup, refuse or resume the session, and answer ``setupComplete``."""
        message = _parse(await state.ws.recv())
        state.record.messages.append(message)
        await self._signal()
        setup = message.get("setup") if isinstance(message, dict) else None
        if not isinstance(setup, dict):
            await self._reject(state, 1007, INVALID_ARGUMENT)
            return None
        resumption = _field(setup, "session_resumption")
        handle = resumption.get("handle") if isinstance(resumption, dict) else None
        history: list[tuple[str, str]] = []
        if handle:
            if self.refuse_resumption or handle not in self._handles:
                logger.debug(f"{self.name}: connection {state.record.index}: resumption refused")
                await self._reject(state, *self.resumption_refusal)
                return None
            history = list(self._handles[handle])
        link = _Connection(state=state, history=history)
        link.resumable = isinstance(resumption, dict)
        link.transparent = bool(_field(resumption, "transparent"))
        detection = _field(_field(setup, "realtime_input_config"), "automatic_activity_detection")
        link.automatic_activity = not _field(detection, "disabled")
        link.transcribe_input = _field(setup, "input_audio_transcription") is not None
        modalities = _field(_field(setup, "generation_config"), "response_modalities") or ["AUDIO"]
        link.text_modality = "TEXT" in modalities and "AUDIO" not in modalities
        # With TEXT replies there is no audio to transcribe.
        link.transcribe_output = (
            _field(setup, "output_audio_transcription") is not None and not link.text_modality
        )
        link.client_messages = 1  # the setup is the connection's client message 0
        self._links[state.record.index] = link
        await self._send(link, {"setupComplete": {}})
        if link.resumable:
            await self._issue_handle(link)
        for fault in self._early_go_aways.pop(state.record.index, []):
            await self.send_go_away(state, fault)
        if self.mute_after_replies.get(state.record.index) == 0:
            link.muted = True
        return link

    async def _reject(self, state: ConnectionState, code: int, reason: str) -> None:
        """Close the connection for a message the real service would refuse."""
        await state.fire(-10_000 - len(state._fired), Fault.close(code, reason))
        await self._signal()

    async def _on_message(self, link: _Connection, message: Any) -> bool:
        """Handle one client message; False once the connection is being closed."""
        kind = _snake(next(iter(message))) if isinstance(message, dict) and len(message) == 1 else ""
        body = message[next(iter(message))] if kind else None
        if kind not in _CLIENT_KINDS or kind == "setup" or not isinstance(body, dict):
            await self._reject(link.state, 1007, INVALID_ARGUMENT)
            return False
        if kind == "client_content":
            await self._on_client_content(link, body)
        elif kind == "realtime_input":
            if not {_snake(name) for name in body} <= _REALTIME_FIELDS:
                await self._reject(link.state, 1007, INVALID_ARGUMENT)
                return False
            await self._on_realtime_input(link, body)
        else:
            await self._on_tool_response(link, body)
        return True

    async def _on_client_content(self, link: _Connection, body: dict[str, Any]) -> None:
        turns = body.get("turns") or []
        for turn in turns if isinstance(turns, list) else []:
            role = turn.get("role", "user") if isinstance(turn, dict) else "user"
            parts = turn.get("parts", []) if isinstance(turn, dict) else []
            text = "".join(
                p.get("text", "") for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
            link.history.append((role, text))
            if role == "user":
                link.prompt = text
                if text.strip():
                    link.state.record.texts.append(("client_content", text))
        await link.state.text_received()
        if not _field(body, "turn_complete"):
            return
        asked = self._continuation_asked(link.history)
        if asked is not None:
            # The caller seeded what it heard of the model's own cut turn.
            question, reply = asked
            link.prompt = None
            await self._respond(link, reply, prompt=question)
        elif link.prompt is not None:
            prompt, link.prompt = link.prompt, None
            await self._answer(link, prompt)

    async def _on_realtime_input(self, link: _Connection, body: dict[str, Any]) -> None:
        fields = {_snake(name): value for name, value in body.items()}
        if "text" in fields:
            text = str(fields["text"])
            if text.strip():
                link.state.record.texts.append(("realtime_input", text))
                link.history.append(("user", text))
            await link.state.text_received()
            await self._answer(link, text)
        if "audio" in fields and isinstance(fields["audio"], dict):
            await self._on_audio(link, fields["audio"])
        if "activity_start" in fields:
            link.user_speaking = True
            link.decoder = None
            await self._interrupt(link)
        if "activity_end" in fields or "audio_stream_end" in fields:
            await self._end_utterance(link)

    async def _on_audio(self, link: _Connection, blob: dict[str, Any]) -> None:
        match = _RATE.search(str(_field(blob, "mime_type") or ""))
        rate = int(match.group(1)) if match else INPUT_SAMPLE_RATE
        await self._hear(link, _b64decode(str(blob.get("data", ""))), rate)

    async def _hear(self, link: _Connection, data: bytes, rate: int) -> None:
        """Decode user audio; with automatic activity detection, find where utterances end."""
        spc = samples_per_char(rate, self.input_ms_per_char)
        if link.decoder is None or link.decoder_rate != rate:
            link.decoder, link.decoder_rate, link.end_samples = SpeechDecoder(spc), rate, 0
        samples = array.array("h")
        samples.frombytes(data[: len(data) - len(data) % 2])
        if sys.byteorder != "little":
            samples.byteswap()
        if not link.automatic_activity:
            link.decoder.feed(data)
            return
        if not link.user_speaking and any(sample > 0 for sample in samples):
            # Speech over a reply interrupts it.
            link.user_speaking = True
            await self._interrupt(link)
        for index, sample in enumerate(samples):
            if sample > 0 and sample & MESSAGE_END:
                link.end_samples += 1
                if link.end_samples == spc:
                    # The last character of a speech-code message is complete:
                    # the utterance ended here, and the rest is new audio.
                    link.decoder.feed(data[: 2 * (index + 1)])
                    await self._end_utterance(link)
                    if rest := data[2 * (index + 1) :]:
                        await self._hear(link, rest, rate)
                    return
        link.decoder.feed(data)

    async def _end_utterance(self, link: _Connection) -> None:
        """The user stopped speaking: transcribe what they said and answer it."""
        decoder, link.decoder = link.decoder, None
        link.user_speaking = False
        text = " ".join(decoder.heard()) if decoder is not None else ""
        if not text:
            return
        link.state.record.texts.append(("audio", text))
        link.history.append(("user", text))
        if link.transcribe_input:
            await self._send(link, {"serverContent": {"inputTranscription": {"text": text}}})
        await link.state.text_received()
        await self._answer(link, text)

    async def _on_tool_response(self, link: _Connection, body: dict[str, Any]) -> None:
        await link.state.text_received()
        entries = _field(body, "function_responses") or []
        for entry in entries if isinstance(entries, list) else []:
            pending = self._pending_calls.pop(str(entry.get("id")), None) if isinstance(entry, dict) else None
            if pending is None:
                # The model asked for no such call (or it was cancelled): nothing to say.
                logger.debug(f"{self.name}: connection {link.index}: response to an unknown call ignored")
                continue
            response = entry.get("response")
            text = pending.call.reply_to(response if isinstance(response, dict) else {"value": response})
            link.history.append(("tool", json.dumps(response, sort_keys=True)))
            if not link.muted:
                self._speak_after(link, text, prompt=json.dumps(response))

    # -- the model -----------------------------------------------------------

    def _reply_for(self, text: str) -> Reply | None:
        key = text.strip()
        asked = _CONTINUE.search(key)
        if asked is not None:
            # Asked to answer again after a drop (as ResilientLLM asks): go on
            # with the answer to the user's last message, after what was heard.
            original = self._reply_for(asked.group("question"))
            if original is None:
                return None
            return _go_on(original, asked.group("heard") or "", self.continuation, self.repeat_words)
        if callable(self.script):
            reply = self.script(key)
        elif self.script is not None:
            reply = self.script.get(key)
        else:
            reply = None
        if reply is None and key:
            reply = _echo(key)
        return reply

    def _continuation_asked(self, history: list[tuple[str, str]]) -> tuple[str, Reply] | None:
        """``(question, what to say)`` when the conversation ends with a cut model turn, else None.

        The conversation must end (blank user turns aside) with a model turn
        whose words are a proper prefix of the scripted reply to the last
        non-blank user turn.
        """
        turns = list(history)
        while turns and turns[-1][0] == "user" and not turns[-1][1].strip():
            turns.pop()  # the stock service's padding of a 2.5 seed
        if not turns or turns[-1][0] != "model":
            return None
        heard = turns[-1][1].split()
        question = next((text for role, text in reversed(turns) if role == "user" and text.strip()), None)
        reply = self._reply_for(question) if question is not None else None
        if question is None or reply is None or isinstance(reply, ToolCall):
            return None
        words = (reply.text if isinstance(reply, Silent) else reply).split()
        if len(heard) >= len(words) or words[: len(heard)] != heard:
            return None
        return question, _go_on(reply, " ".join(heard), self.continuation, self.repeat_words)

    async def _answer(self, link: _Connection, text: str) -> None:
        """Answer a user input: interrupt any reply, then speak or call a tool."""
        reply = self._reply_for(text)
        if reply is not None:
            await self._respond(link, reply, prompt=text)

    async def _respond(self, link: _Connection, reply: Reply, *, prompt: str) -> None:
        if link.muted:
            return  # the input is recorded, and never answered
        await self._interrupt(link)
        if isinstance(reply, ToolCall):
            await self._call_tool(link, reply)
        else:
            self._speak_after(link, reply, prompt=prompt)

    async def _call_tool(self, link: _Connection, call: ToolCall) -> None:
        call_id = f"function-call-{next(self._call_numbers)}"
        self._pending_calls[call_id] = _PendingCall(call_id, call, link.index)
        if link.resumable:
            # Not resumable while the model waits for a tool (real service docs).
            await self._send(link, {"sessionResumptionUpdate": {"resumable": False}})
        function_call = {"id": call_id, "name": call.name, "args": dict(call.args)}
        await self._send(link, {"toolCall": {"functionCalls": [function_call]}})

    async def _interrupt(self, link: _Connection) -> None:
        """Stop a reply being spoken, and cancel the tool calls waited on."""
        cancelled = [c.id for c in self._pending_calls.values() if c.connection == link.index]
        for call_id in cancelled:
            del self._pending_calls[call_id]
        if cancelled:
            await self._send(link, {"toolCallCancellation": {"ids": cancelled}})
        tasks = [task for task in link.replies if not task.done()]
        link.replies = []
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._send(link, {"serverContent": {"interrupted": True}})

    def _speak_after(self, link: _Connection, reply: str | Silent, *, prompt: str) -> None:
        """Speak ``reply`` once the reply in progress, if any, has been spoken."""
        link.replies = [task for task in link.replies if not task.done()]
        previous = link.replies[-1] if link.replies else None
        task = asyncio.create_task(self._speak(link, reply, prompt=prompt, after=previous))
        self.track(task)
        link.replies.append(task)

    async def _speak(
        self, link: _Connection, reply: str | Silent, *, prompt: str, after: asyncio.Task[None] | None
    ) -> None:
        """Send one reply: model-turn chunks with their transcriptions, then turnComplete.

        Goes quiet (waits to be cancelled) where ``quiet_replies`` says, or
        whenever the session is muted.
        """
        state = link.state
        text = reply.text if isinstance(reply, Silent) else reply
        spoken = 0
        try:
            if after is not None:
                await asyncio.wait({after})
            if link.muted:
                await _forever()
            number = len(self._reply_log)
            self._reply_log.append((link.index, text))
            silent = isinstance(reply, Silent) or number in self.silent_replies
            quiet_after = self.quiet_replies.get(number)
            if link.resumable:
                await self._emit(link, {"sessionResumptionUpdate": {"resumable": False}})
            delay = self.first_audio_delay + state.take_first_audio_delay()
            if delay:
                await asyncio.sleep(delay)
            size = self.chars_per_chunk
            chunks = [text[start : start + size] for start in range(0, len(text), size)]
            bundled = link.transcribe_output and self.bundle_transcription and not silent
            slots = self._transcription_slots(text, len(chunks)) if link.transcribe_output else None
            await self._transcribe(link, slots, 0)
            for index, chunk in enumerate(chunks):
                if index == quiet_after:
                    await _forever()
                if index and self.realtime:
                    await asyncio.sleep(len(chunk) * self.ms_per_char / 1000)
                start = index * size
                if not silent:
                    content: dict[str, Any] = {"modelTurn": {"parts": [self._part(link, chunk, text, start)]}}
                    if bundled:
                        content["outputTranscription"] = {"text": chunk}
                    await self._emit(link, {"serverContent": content})
                    spoken = start + len(chunk)
                    await state.audio_sent()
                else:
                    spoken = start + len(chunk)
                if not bundled:
                    await self._transcribe(link, slots, index + 1)
                # Let the client's messages in between chunks, as a network would.
                await asyncio.sleep(0)
            if quiet_after is not None and quiet_after >= len(chunks):
                await _forever()
            await self._emit(link, {"serverContent": {"generationComplete": True}})
            prompt_tokens, response_tokens = len(prompt.split()), len(text.split())
            usage = {
                "promptTokenCount": prompt_tokens,
                "responseTokenCount": response_tokens,
                "totalTokenCount": prompt_tokens + response_tokens,
            }
            await self._emit(link, {"serverContent": {"turnComplete": True}, "usageMetadata": usage})
            link.history.append(("model", text))
            spoken = 0
            if link.resumable:
                await self._issue_handle(link)
            link.replies_done += 1
            if self.mute_after_replies.get(link.index) == link.replies_done:
                link.muted = True
        except (_Faulted, ConnectionClosed):
            pass
        finally:
            if spoken:
                # Cut off: the model remembers what it got to say.
                link.history.append(("model", text[:spoken]))

    def _transcription_slots(self, text: str, chunks: int) -> list[list[str]]:
        """The output transcription of ``text`` by when it goes out, as ``transcription`` says.

        Slot ``i`` goes out right after audio chunk ``i - 1`` (slot 0 before
        any audio, the last slot after all of it). The pieces add up to ``text``.
        """
        size = self.chars_per_chunk
        slots: list[list[str]] = [[] for _ in range(chunks + 1)]
        if self.transcription == "grouped":
            ends = [match.end() for match in _WORD.finditer(text)]
            bounds = ends[self.words_per_transcription - 1 :: self.words_per_transcription]
            if bounds and bounds[-1] == ends[-1]:
                bounds[-1] = len(text)
            elif text:
                bounds.append(len(text))
            begin = 0
            for end in bounds:
                # A group goes out once the audio of its last character did.
                slots[(end - 1) // size + 1].append(text[begin:end])
                begin = end
            return slots
        for index in range(chunks):
            if self.transcription == "before_audio":
                slot = max(0, index - self.transcription_skew)
            elif self.transcription == "after_audio":
                slot = min(chunks, index + 1 + self.transcription_skew)
            else:
                slot = index + 1
            slots[slot].append(text[index * size : (index + 1) * size])
        return slots

    async def _transcribe(self, link: _Connection, slots: list[list[str]] | None, slot: int) -> None:
        for piece in slots[slot] if slots is not None else []:
            await self._emit(link, {"serverContent": {"outputTranscription": {"text": piece}}})

    def _part(self, link: _Connection, chunk: str, text: str, start: int) -> dict[str, Any]:
        if link.text_modality:
            return {"text": chunk}
        audio = encode(
            chunk,
            sample_rate=OUTPUT_SAMPLE_RATE,
            ms_per_char=self.ms_per_char,
            message_end=start + len(chunk) >= len(text),
            after=text[start - 1] if start else " ",
            then=text[start + len(chunk)] if start + len(chunk) < len(text) else None,
        )
        data = base64.b64encode(audio).decode()
        return {"inlineData": {"mimeType": f"audio/pcm;rate={OUTPUT_SAMPLE_RATE}", "data": data}}

    async def _issue_handle(self, link: _Connection) -> None:
        handle = f"handle-{next(self._handle_numbers)}"
        self._handles[handle] = tuple(link.history)
        link.handles.append(handle)
        update: dict[str, Any] = {"newHandle": handle, "resumable": True}
        if link.transparent:
            # int64 fields are strings in protobuf JSON.
            update["lastConsumedClientMessageIndex"] = str(link.client_messages - 1)
        await self._send(link, {"sessionResumptionUpdate": update})

    async def _send(self, link: _Connection, message: dict[str, Any]) -> None:
        """Send ``message``; a muted session sends nothing (the message is dropped)."""
        if link.muted:
            return
        await link.state.send(json.dumps(message))
        link.sent.append(message)
        await self._signal()

    async def _emit(self, link: _Connection, message: dict[str, Any]) -> None:
        """Send part of a reply; a muted session's reply stops here, for good."""
        if link.muted:
            await _forever()
        await self._send(link, message)

    async def send_go_away(self, state: ConnectionState, fault: Fault) -> None:
        """Send ``goAway``, and close the connection when its time is up."""
        link = self._links.get(state.record.index)
        if link is None:
            # Planned for the moment the connection opened: after setupComplete, then.
            self._early_go_aways.setdefault(state.record.index, []).append(fault)
            return
        await self._send(link, {"goAway": {"timeLeft": _duration(fault.seconds)}})
        link.go_away_at = time.monotonic()
        if self.go_away_close is not None:
            code, reason = self.go_away_close

            async def close_when_time_is_up() -> None:
                await asyncio.sleep(fault.seconds)
                await self._reject(state, code, reason)

            task = asyncio.create_task(close_when_time_is_up())
            self.track(task)
            link.timers.append(task)


def _certificate() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a fresh certificate for 127.0.0.1, and a client context trusting it."""
    import trustme

    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(server)
    client = ssl.create_default_context()
    authority.configure_trust(client)
    return server, client
