"""What differs between speech-to-text providers, for :class:`~pipecat_resilient.stt.ResilientSTT`.

One adapter per provider hooks into a stock service instance before it is set
up, and reports to the shell, in provider-neutral terms, what the provider
says: that a message arrived (it is alive), a transcript result with its word
timings in that connection's stream seconds, that speech started, that the
instance opened a connection, or that the connection failed (a provider error
message with the socket still open included, classified here: which errors are
permanent is the provider's business). It also applies the shell's answer: a
result whose leading words repeat what an earlier connection finalized is
trimmed, or dropped whole, *before* the stock service turns it into frames, so
nothing repeated reaches the pipeline (no transcript, no turn event).

* Deepgram (``DeepgramSTTService``, deepgram-sdk): the instance's ``_on_message``
  and ``_on_error`` callbacks and its SDK client's ``listen.v1.connect`` are
  wrapped. Pipecat's own reconnect loop never runs: every end of a connection
  the service did not ask for is reported at once, 1000 included (the stock
  service reconnects from a clean close after 4 s without a word).
* AssemblyAI (``AssemblyAISTTService``, streaming v3): the instance's
  ``_handle_message`` and ``_connect_websocket`` are wrapped; closes and
  aborts reach the shell as Pipecat's own error frames.
* Deepgram Flux (``DeepgramFluxSTTService``, ``/v2/listen``): the instance's
  ``_handle_message``, ``_connect_websocket`` and ``_end_turn_cut_short`` are
  wrapped. Flux owns the turns and never answers a finalize: its
  ``EndOfTurn`` (``audio_window_end``) is the finalized position, and a turn
  cut by a drop is not ended early with the words heard so far (the stock
  service's ``_end_turn_cut_short``): the replay gives it whole to the fresh
  connection.
* Any other ``STTService``: recovered and replayed from the last acknowledged
  finalize, without time-based deduplication or a stall watchdog (no word
  timings or messages are observed).

Private hooks of the stock services live here and nowhere else.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from websockets.protocol import State as SocketState

from pipecat_resilient._hosting import Hosted
from pipecat_resilient.failures import Failure, Verdict, classify_close, classify_exception, classify_status

__all__ = [
    "AssemblyAIAdapter",
    "DeepgramAdapter",
    "DeepgramFluxAdapter",
    "STTAdapter",
    "Shell",
    "adapter_for",
]


class Shell(Protocol):
    """What an adapter reports to (the shell's side of the hooks)."""

    def provider_message(self, hosted: Hosted[Any]) -> None:
        """Any message arrived from the provider on ``hosted``'s connection."""

    def transcript(
        self, hosted: Hosted[Any], words: Sequence[tuple[float, float]], *, end: float | None, final: bool
    ) -> int:
        """A transcript result; returns how many leading words to drop."""

    def speech_started(self, hosted: Hosted[Any], at: float) -> bool:
        """The provider detected speech at stream time ``at``; returns whether to pass it on."""

    def stream_opened(self, hosted: Hosted[Any]) -> None:
        """``hosted`` opened a connection (its stream clock starts at 0)."""

    def failed(self, hosted: Hosted[Any], failure: Failure) -> None:
        """``hosted``'s connection failed (or its handshake did)."""


class STTAdapter:
    """The adapter for a service nobody wrote one for: it observes nothing of the provider."""

    name = "generic"
    replay_margin_s = 0.2
    """How far before the end of the finalized audio a replay starts."""
    observes_messages = False
    """Whether every provider message is reported (a quiet provider can be told from a stalled one)."""
    covers_audio = False
    """Whether every result says how far into the audio it reaches (see ``AudioJournal``'s
    ``covers_audio``)."""
    direct_audio = ""
    """The qualified name of the stock ``process_frame`` known to do nothing with
    caller audio but call ``process_audio_frame`` (which the shell may then
    call directly); empty for none."""

    @staticmethod
    def applies_to(service: object) -> bool:
        """Whether this adapter knows ``service``."""
        return True

    def install(self, hosted: Hosted[Any], shell: Shell) -> None:
        """Hook into ``hosted``'s instance before it is set up."""

    def held_back_s(self, service: Any) -> float:
        """Seconds of audio handed to ``service`` that it has not sent yet."""
        return 0.0

    def takes_audio_directly(self, service: object) -> bool:
        """Whether the shell may hand ``service`` audio through ``process_audio_frame``.

        Only when its ``process_frame`` is the stock one this adapter was
        written against (a subclass that overrides it gets every frame through
        it, as it expects).
        """
        method = getattr(type(service), "process_frame", None)
        return bool(self.direct_audio) and getattr(method, "__qualname__", None) == self.direct_audio

    def abort(self, service: Any) -> None:
        """Drop ``service``'s socket at once (retiring it), if the shell's hosting cannot find it."""


def _is(service: object, class_name: str, module_prefix: str) -> bool:
    """Whether ``service`` is (a subclass of) a Pipecat class, told by name (its SDK may be missing)."""
    return any(
        cls.__name__ == class_name and cls.__module__.startswith(module_prefix)
        for cls in type(service).__mro__
    )


# ----------------------------------------------------------------------
# Deepgram
# ----------------------------------------------------------------------


def deepgram_error(message: Any) -> Failure:
    """Classify Deepgram's ``Error`` message (``variant``, ``description``, ``code``).

    A ``SchemaError`` means Deepgram could not read what the client sent: the
    same client would send it again, so it is retried once (poison if it
    repeats). A code that reads as an HTTP status is classified as one (401,
    403 and 402 are permanent). Anything else is Deepgram's own trouble
    (``InternalServerError`` and the like) and is retried.
    """
    variant = str(getattr(message, "variant", "") or "")
    description = str(getattr(message, "description", "") or "")[:160]
    code = str(getattr(message, "code", "") or "")
    detail = f"Deepgram Error {variant or 'message'}" + (f" {code}" if code else "")
    if description:
        detail += f" ({description})"
    text = f"{variant} {description}".lower()
    if "schema" in text:
        return Failure(Verdict.SUSPECT, "invalid_request", f"{detail}: unreadable request")
    if code.isdigit() and 400 <= int(code) < 600:
        status = classify_status(int(code))
        return Failure(status.verdict, status.category, f"{detail}: {status.description}", int(code))
    if any(word in text for word in ("unauthorized", "api key", "authenticat", "credential")):
        return Failure(Verdict.PERMANENT, "authentication", f"{detail}: authentication failed")
    if any(word in text for word in ("insufficient", "quota", "credits", "payment")):
        return Failure(Verdict.PERMANENT, "quota", f"{detail}: quota exhausted")
    return Failure(Verdict.TRANSIENT, "server", f"{detail}: provider error")


def _deepgram_trimmed(message: Any, drop: int) -> Any:
    """A copy of a frozen ``ListenV1Results`` without its first ``drop`` words."""
    channel = message.channel
    alternative = channel.alternatives[0]
    words = list(alternative.words or [])[drop:]
    transcript = " ".join(str(getattr(w, "punctuated_word", None) or w.word) for w in words)
    alternative = alternative.model_copy(update={"words": words, "transcript": transcript})
    channel = channel.model_copy(update={"alternatives": [alternative, *channel.alternatives[1:]]})
    return message.model_copy(update={"channel": channel})


class DeepgramAdapter(STTAdapter):
    """``DeepgramSTTService`` (live transcription over deepgram-sdk)."""

    name = "deepgram"
    # Deepgram's results tile the stream; a result's end may reach into the
    # next word, so a replay starts a little before it.
    replay_margin_s = 0.2
    observes_messages = True
    # Every result, empty ones included, carries its start and duration.
    covers_audio = True
    direct_audio = "DeepgramSTTService.process_frame"

    @staticmethod
    def applies_to(service: object) -> bool:
        """Whether ``service`` is Deepgram's live (v1) STT service."""
        return _is(service, "DeepgramSTTService", "pipecat.services.deepgram")

    def install(self, hosted: Hosted[Any], shell: Shell) -> None:
        """Wrap the instance's message and error callbacks and its SDK connect."""
        service: Any = hosted.service
        on_message = service._on_message

        async def on_message_observed(message: Any) -> None:
            shell.provider_message(hosted)
            kind = type(message).__name__
            if kind == "ListenV1Error" or getattr(message, "type", None) == "Error":
                # The stock service drops these; the words in flight are gone.
                shell.failed(hosted, deepgram_error(message))
                return
            if kind == "ListenV1Results":
                channel = getattr(message, "channel", None)
                alternatives = getattr(channel, "alternatives", None)
                if alternatives:
                    words = list(alternatives[0].words or [])
                    final = bool(message.is_final)
                    drop = shell.transcript(
                        hosted,
                        [(float(w.start), float(w.end)) for w in words],
                        end=float(message.start) + float(message.duration),
                        final=final,
                    )
                    if drop >= len(words) and words:
                        # All repeated: nothing for the pipeline. A finalize
                        # acknowledgement still acknowledges, as the stock
                        # service does for an empty one.
                        if final and getattr(message, "from_finalize", False):
                            service.confirm_finalize()
                            await service.stop_ttfb_metrics()
                        return
                    if drop:
                        message = _deepgram_trimmed(message, drop)
            await on_message(message)

        async def on_error_observed(error: Any) -> None:
            failure = classify_exception(error) if isinstance(error, BaseException) else None
            shell.failed(
                hosted,
                failure
                or Failure(Verdict.TRANSIENT, "connectivity", f"connection error: {type(error).__name__}"),
            )

        service._on_message = on_message_observed
        service._on_error = on_error_observed
        v1 = service._client.listen.v1
        connect: Callable[..., Any] = v1.connect

        @contextlib.asynccontextmanager
        async def connect_observed(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            opened = False
            closing = False
            try:
                async with connect(*args, **kwargs) as connection:
                    opened = True
                    send_close_stream = connection.send_close_stream

                    async def send_close_stream_observed(*args: Any, **kwargs: Any) -> Any:
                        nonlocal closing
                        closing = True  # the service is closing it (a stop, new settings)
                        return await send_close_stream(*args, **kwargs)

                    connection.send_close_stream = send_close_stream_observed
                    shell.stream_opened(hosted)
                    yield connection
            except Exception as exc:
                if not opened:
                    shell.failed(
                        hosted,
                        classify_exception(exc)
                        or Failure(
                            Verdict.TRANSIENT, "connectivity", f"connect failed: {type(exc).__name__}"
                        ),
                    )
                    # The stock service would wait for its own retry, seconds
                    # later, before its set-up returns: this attempt is over.
                    settled = getattr(service, "_connection_settled", None)
                    if settled is not None:
                        settled.set()
                raise
            # The connection ended without the service closing it: a 1000
            # close included.
            if not closing:
                websocket = getattr(connection, "_websocket", None)
                code = getattr(websocket, "close_code", None)
                reason = getattr(websocket, "close_reason", None) or ""
                shell.failed(hosted, classify_close(code if code is not None else 1006, reason))

        v1.connect = connect_observed

    def abort(self, service: Any) -> None:
        """Drop the SDK connection's socket (a half-open one would hold the teardown)."""
        connection = getattr(service, "_connection", None)
        transport = getattr(getattr(connection, "_websocket", None), "transport", None)
        if transport is not None:
            transport.abort()
        # Its teardown would otherwise send CloseStream into the dead socket,
        # fail, and never cancel the loop that reconnects in 4 s.
        service._connection = None


# ----------------------------------------------------------------------
# AssemblyAI
# ----------------------------------------------------------------------

# AssemblyAI's close and error codes (streaming v3, and the v2 codes still
# documented): what retrying can fix.
_ASSEMBLYAI_CODES: dict[int, tuple[Verdict, str, str]] = {
    3005: (Verdict.TRANSIENT, "server", "session cancelled by a server error"),
    3006: (Verdict.SUSPECT, "invalid_request", "invalid message"),
    3007: (Verdict.SUSPECT, "invalid_request", "audio chunk size or rate refused"),
    3008: (Verdict.TRANSIENT, "connectivity", "session expired"),
    3009: (Verdict.TRANSIENT, "rate_limit", "too many concurrent sessions"),
    4000: (Verdict.PERMANENT, "invalid_request", "bad sample rate"),
    4001: (Verdict.PERMANENT, "authentication", "not authorized"),
    4002: (Verdict.PERMANENT, "quota", "insufficient funds"),
    4003: (Verdict.PERMANENT, "quota", "paid feature"),
    4008: (Verdict.TRANSIENT, "connectivity", "session expired"),
    4029: (Verdict.TRANSIENT, "rate_limit", "rate limited"),
    4031: (Verdict.TRANSIENT, "connectivity", "session idle for too long"),
    4101: (Verdict.SUSPECT, "invalid_request", "bad schema"),
    4102: (Verdict.TRANSIENT, "rate_limit", "too many streams"),
}


def assemblyai_error(data: dict[str, Any]) -> Failure:
    """Classify AssemblyAI's ``Error`` message (``error_code``, ``error``).

    Permanent: authentication and account problems (1008 "Unauthorized
    connection" for a missing or bad key or an account issue, 4001-4003), a bad
    sample rate (4000). Retried once, poison if repeated: an invalid message
    (3006), an audio chunk size or rate refused (3007), a bad schema (4101).
    Retried: a server error (3005), an expired session (3008, 4008), too many
    sessions or a rate limit (3009, 1008 "Too many concurrent sessions", 4029,
    4102), an idle session (4031).
    """
    code_value = data.get("error_code")
    code = code_value if isinstance(code_value, int) and not isinstance(code_value, bool) else None
    text = str(data.get("error") or "")[:160]
    detail = f"AssemblyAI Error {code if code is not None else ''}".rstrip() + (f" ({text})" if text else "")
    lowered = text.lower()
    if "too many concurrent" in lowered or "too many streams" in lowered:
        return Failure(Verdict.TRANSIENT, "rate_limit", f"{detail}: too many sessions", code)
    if code in _ASSEMBLYAI_CODES:
        verdict, category, what = _ASSEMBLYAI_CODES[code]
        return Failure(verdict, category, f"{detail}: {what}", code)
    if code == 1008 or "unauthorized" in lowered:
        return Failure(Verdict.PERMANENT, "authentication", f"{detail}: not authorized", code)
    if code is not None and 1000 <= code <= 4999:
        failure = classify_close(code, text)
        return Failure(failure.verdict, failure.category, f"{detail}: {failure.description}", code)
    return Failure(Verdict.TRANSIENT, "server", f"{detail}: provider error", code)


def _assemblyai_trimmed(data: dict[str, Any], drop: int) -> dict[str, Any]:
    """A copy of a ``Turn`` message without its first ``drop`` words."""
    words = list(data.get("words") or [])[drop:]
    transcript = " ".join(str(w.get("text", "")) for w in words)
    trimmed = dict(data, words=words, transcript=transcript)
    if data.get("utterance"):
        trimmed["utterance"] = transcript
    return trimmed


class AssemblyAIAdapter(STTAdapter):
    """``AssemblyAISTTService`` (streaming v3 websocket)."""

    name = "assemblyai"
    # Turns end after silence (or a forced endpoint): the audio after a final's
    # last word is silence, and a margin would only replay the word's tail.
    replay_margin_s = 0.0
    observes_messages = True
    direct_audio = "AssemblyAISTTService.process_frame"

    @staticmethod
    def applies_to(service: object) -> bool:
        """Whether ``service`` is AssemblyAI's streaming STT service."""
        return _is(service, "AssemblyAISTTService", "pipecat.services.assemblyai")

    def install(self, hosted: Hosted[Any], shell: Shell) -> None:
        """Wrap the instance's message handler and its websocket connect."""
        service: Any = hosted.service
        handle = service._handle_message

        async def handle_observed(data: Any) -> None:
            shell.provider_message(hosted)
            kind = data.get("type") if isinstance(data, dict) else None
            if kind == "Error":
                # The stock service cannot parse it ("Unknown message type");
                # the turn in flight is gone and the socket closes next.
                shell.failed(hosted, assemblyai_error(data))
                return
            if kind == "Turn":
                words = list(data.get("words") or [])
                formatted = bool(data.get("turn_is_formatted"))
                final = bool(data.get("end_of_turn")) and (not _format_turns(service) or formatted)
                drop = shell.transcript(
                    hosted,
                    [(float(w.get("start", 0)) / 1000, float(w.get("end", 0)) / 1000) for w in words],
                    end=None,
                    final=final,
                )
                if drop >= len(words) and words:
                    if final and formatted and getattr(service, "_vad_force_turn_endpoint", True):
                        service.confirm_finalize()
                    return
                if drop:
                    data = _assemblyai_trimmed(data, drop)
            elif kind == "SpeechStarted":
                if not shell.speech_started(hosted, float(data.get("timestamp", 0)) / 1000):
                    return
            await handle(data)

        connect = service._connect_websocket

        async def connect_observed() -> None:
            websocket = service._websocket
            await connect()
            opened = service._websocket
            if opened is not None and opened is not websocket and opened.state is SocketState.OPEN:
                shell.stream_opened(hosted)

        service._handle_message = handle_observed
        service._connect_websocket = connect_observed

    def held_back_s(self, service: Any) -> float:
        """Audio the service buffers until it has a 50 ms chunk to send."""
        buffered = getattr(service, "_audio_buffer", None)
        rate = getattr(service, "sample_rate", 0)
        if not buffered or not rate:
            return 0.0
        return len(buffered) / (2 * rate)


# ----------------------------------------------------------------------
# Deepgram Flux
# ----------------------------------------------------------------------


class DeepgramFluxAdapter(STTAdapter):
    """``DeepgramFluxSTTService`` (Flux turn-taking websocket, ``/v2/listen``)."""

    name = "deepgram-flux"
    # A turn ends after silence: the audio after its EndOfTurn is silence or
    # the next turn, which the replay must give whole.
    replay_margin_s = 0.0

    @staticmethod
    def applies_to(service: object) -> bool:
        """Whether ``service`` is Deepgram's Flux STT service (websocket transport)."""
        return _is(service, "DeepgramFluxSTTService", "pipecat.services.deepgram.flux")

    def install(self, hosted: Hosted[Any], shell: Shell) -> None:
        """Wrap the instance's message handler, its websocket connect, and its cut-short turn end."""
        service: Any = hosted.service
        handle = service._handle_message

        async def handle_observed(data: Any) -> None:
            if isinstance(data, dict) and data.get("type") == "TurnInfo" and data.get("event") == "EndOfTurn":
                # Flux committed the turn: the audio up to the end of its
                # window is final (Flux gives no word timings).
                end = data.get("audio_window_end")
                if isinstance(end, (int, float)) and not isinstance(end, bool):
                    shell.transcript(hosted, [], end=float(end), final=True)
            await handle(data)

        connect = service._connect_websocket

        async def connect_observed() -> None:
            websocket = service._websocket
            await connect()
            opened = service._websocket
            if opened is not None and opened is not websocket and opened.state is SocketState.OPEN:
                shell.stream_opened(hosted)

        async def end_turn_cut_short_observed() -> None:
            # The stock service ends a turn whose connection closed with the
            # words of its last Update, unfinalized, and a turn stop; the
            # shell replays the turn's audio into a fresh connection instead,
            # which ends it whole. Only its state is reset here.
            service._user_is_speaking = False
            service._turn_transcript = ""
            service._clear_eager_end_of_turn()

        service._handle_message = handle_observed
        service._connect_websocket = connect_observed
        service._end_turn_cut_short = end_turn_cut_short_observed


def _format_turns(service: Any) -> bool:
    settings = getattr(service, "_settings", None)
    return bool(getattr(settings, "format_turns", False) is True)


_ADAPTERS: tuple[type[STTAdapter], ...] = (DeepgramAdapter, AssemblyAIAdapter, DeepgramFluxAdapter)


def adapter_for(service: object) -> STTAdapter:
    """The adapter for ``service`` (the generic one when no provider adapter knows it)."""
    for adapter in _ADAPTERS:
        if adapter.applies_to(service):
            return adapter()
    return STTAdapter()
