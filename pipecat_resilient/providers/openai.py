"""OpenAI (HTTP text-to-speech, ``POST /v1/audio/speech``): failures of one request per sentence.

The stock ``OpenAITTSService`` makes one streamed HTTP request per sentence
and yields its body as audio from ``run_tts``; there are no word timings, so
what a listener heard of a cut sentence is estimated from the audio duration
and the speaking rate the ledger learned in this session, rounded down to a
word (as for Deepgram). The adapter wraps the instance's ``run_tts`` and reads
each request as it streams:

* **A request that fails.** An exception out of the request (a connection
  reset or a protocol error in the middle of the body or before the headers,
  an HTTP error status) is classified at once and reported before the stock
  service turns it into an ``ErrorFrame`` (which the wrapper then drops, as
  for any failed instance); the exception goes on as it would. 429 and 5xx
  are transient (a ``Retry-After`` or ``retry-after-ms`` header is honoured by
  the retry policy); 400, 401, 403 and 404 are permanent: no retry, one
  ``ErrorFrame`` from the wrapper. The errors the stock service catches
  itself (a 400, and a voice it does not know, refused without a request)
  come out as an ``ErrorFrame`` without their exception: they are reported
  by the status in the message (permanent without one), and the sentence is
  abandoned as on a reset (the stock service would go on and write it into
  the context as spoken).
* **A body cut short that ends cleanly** (a truncating proxy: the chunked body
  simply ends early, and HTTP has nothing to say against it). An empty body
  for text with letters in it is always a cut. Otherwise the adapter measures
  the session's speaking rate on complete responses (seconds of audio per
  letter or digit, at speed 1: ``speed`` is factored out) and takes a
  response as cut when its audio is shorter than :data:`TRUNCATED_BELOW`
  times what its letters take at the *fastest* plausible rate measured
  (the mean less two deviations, never faster than twice the mean), for a
  sentence of at least :data:`MIN_JUDGED_LETTERS` letters.

  Why so conservative. A false cut (a complete response taken for a cut
  one) is audible: the fresh instance says again the end of a sentence the
  listener heard whole, and an extra request is paid for. A missed cut is
  what the stock service does anyway: the rest of the sentence is never
  heard, and Pipecat writes it into the context as spoken. Speech varies from
  sentence to sentence (emphasis, numbers read out, symbols that are not
  spoken, which is why only letters and digits count), and very short
  sentences carry proportionally more silence, so they are not judged; audio
  less than half as long as the fastest pace measured for this voice allows
  is not speech, it is a cut. The price is that a cut in the last part of
  a sentence (past about half, depending on the measured spread) goes
  unnoticed. Until about 40 letters of complete responses were measured
  (one sentence, usually), only an empty body is caught. A pace up to twice
  the one measured is never taken for a cut; a pace faster still can be:
  voice instructions such as "speak very fast", or a session that goes from
  CJK to Latin script (where a character says much less).
* **A body that stalls** after its first audio: the wrapper's stall watchdog
  does not see it (without word timings, the ledger expects more audio of an
  utterance only once the stock service has finished processing it, which
  for an HTTP service is after the body ended), and the SDK would wait out
  its 600 s read timeout. The adapter bounds each wait for the next audio of
  the body by the wrapper's ``stall_timeout``, plus the time one read of the
  stock service (0.5 s of audio) takes to fill at real-time pace. A request
  that never answers, or answers without audio, is the wrapper's
  ``first_audio_timeout`` watchdog's (the first audio is pushed only once
  0.5 s of it arrived: keep that timeout well above it).

An instance the adapter saw fail makes no further request: it is being
retired, and what it would have said is replayed by its successor.

The SDK's own retries (``max_retries=2`` by default: a connection error, a
timeout, a 408, 409, 429 or 5xx is retried after about 0.4 s, then 0.9 s, or
after what ``Retry-After`` says, up to 60 s) are turned off on each
instance. They would hide a failure behind seconds of silence the wrapper
cannot see, race its watchdog (which would retire the instance in the middle
of the SDK's wait and, not knowing about a 429, retry without honouring its
``Retry-After``), and spend attempts outside the wrapper's ``RetryPolicy``:
one owner of retries, as for the websocket providers. A factory that wants
them anyway gives the instance its own client with a count other than the
SDK's default, which is kept as it is::

    def make() -> OpenAITTSService:
        service = OpenAITTSService(api_key=KEY)
        service._client = service._client.with_options(max_retries=3)
        return service

The wrapper then sees a failure only once the SDK gave up on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, NoReturn

from loguru import logger
from pipecat.frames.frames import ErrorFrame, Frame, TTSAudioRawFrame

from pipecat_resilient._timeline import SpeakingRate
from pipecat_resilient.failures import Failure, Verdict, classify_exception, classify_status
from pipecat_resilient.providers._base import AdapterSink, TTSAdapter

__all__ = ["MIN_JUDGED_LETTERS", "TRUNCATED_BELOW", "OpenAITTSAdapter", "ResponseFailed"]

TRUNCATED_BELOW = 0.5
"""A complete response is taken for a cut one when its audio is shorter than
this fraction of what its letters take at the fastest plausible rate measured
in the session (see the module docstring for the trade-off)."""

MIN_JUDGED_LETTERS = 20
"""Responses for fewer letters and digits than this are neither judged nor
measured (an empty body excepted): short sentences are mostly silence."""

# The openai SDK's default ``max_retries`` (openai._constants.DEFAULT_MAX_RETRIES).
SDK_DEFAULT_MAX_RETRIES = 2

# Letters and digits: what takes time to say (punctuation, markup and emoji mostly do not).
_SPOKEN = re.compile(r"[^\W_]")
# The status in the stock service's own error messages: the SDK's "Error code: 400 - ..."
# (a BadRequestError it caught) and its "Error getting audio (status: 500, ...".
_STATUS = re.compile(r"(?:Error code: |status: )([1-5]\d\d)\b")


class ResponseFailed(ConnectionError):
    """Raised out of ``run_tts`` for a response the stock service would take for a good one.

    A body that ended early or stalled, or an error the stock service caught
    itself: the adapter has reported it to the wrapper, and the stock service
    abandons the sentence as it does on a connection reset. A ``ConnectionError``,
    so that anything that sees it takes it for what it is.
    """


@dataclass
class _Request:
    """One request for one sentence, as its body arrives."""

    letters: int
    speed: float
    audio_s: float = 0.0
    frames: int = 0

    def audio(self, frame: TTSAudioRawFrame) -> None:
        self.frames += 1
        self.audio_s += len(frame.audio) / (2 * max(1, frame.sample_rate) * max(1, frame.num_channels))

    @property
    def spoken_s(self) -> float:
        """Audio seconds at speed 1 (a response at speed 2 takes half the time)."""
        return self.audio_s * self.speed


class OpenAITTSAdapter(TTSAdapter):
    """OpenAI's HTTP TTS: request failures at once, cut bodies by their length, stalled bodies.

    One adapter serves every instance a ``ResilientTTS`` hosts, so the speaking
    rate it measured carries over a recovery.
    """

    name = "OpenAI"
    word_timings = False

    def __init__(self) -> None:
        """Start with no speaking rate measured."""
        self._rate = SpeakingRate()  # seconds per letter at speed 1, in this session

    def cut_short(self, letters: int, spoken_s: float) -> bool:
        """Whether a response for ``letters`` letters and digits, ``spoken_s`` long at speed 1, was cut.

        An empty response for text with letters is always cut; otherwise see
        :data:`TRUNCATED_BELOW` (before the session's rate is known, nothing else is).
        """
        if letters <= 0:
            return False
        if spoken_s <= 0:
            return True
        fast = self._rate.fast()
        if letters < MIN_JUDGED_LETTERS or fast is None:
            return False
        return spoken_s < TRUNCATED_BELOW * letters * fast

    def measured(self, letters: int, spoken_s: float) -> None:
        """Learn the speaking rate from a complete response."""
        if letters >= MIN_JUDGED_LETTERS and spoken_s > 0:
            self._rate.add(spoken_s, letters)

    def hook(self, service: Any, sink: AdapterSink) -> None:
        """Turn the SDK's retries off and read every request ``run_tts`` makes."""
        _leave_retries_to_the_wrapper(service)
        run_tts = getattr(service, "run_tts", None)
        if run_tts is None:
            return
        adapter = self
        failed = False  # this instance failed: it makes no more requests

        async def report(failure: Failure, context_id: str) -> None:
            nonlocal failed
            failed = True
            try:
                await sink.provider_failed(failure, context_id)
            except Exception as exc:  # the stock service must go on
                logger.debug(f"{service}: could not report a failure ({type(exc).__name__}: {exc})")

        async def abandon(failure: Failure, context_id: str) -> NoReturn:
            """Report a failure the stock service cannot see, then end the sentence as a reset would."""
            await report(failure, context_id)
            # The stock service abandons the sentence (it pushes an ErrorFrame,
            # which the wrapper drops for a failed instance) and leaves its
            # audio context open, so the wrapper can drain what was received.
            raise ResponseFailed(failure.description)

        async def run_tts_read(
            text: str, context_id: str, *args: Any, **kwargs: Any
        ) -> AsyncGenerator[Frame, None]:
            if failed:
                logger.debug(f"{service}: failed; not requesting {len(text)} characters")
                return
            request = _Request(letters=len(_SPOKEN.findall(text)), speed=_speed(service))
            stall_limit = _stall_limit(service, getattr(sink, "stall_timeout", None))
            body = run_tts(text, context_id, *args, **kwargs)
            try:
                while True:
                    # The first audio is the first_audio_timeout watchdog's; after
                    # it, the body must keep coming.
                    limit = stall_limit if request.frames else None
                    timer = asyncio.timeout(limit)
                    try:
                        async with timer:
                            frame = await anext(body)
                    except StopAsyncIteration:
                        break
                    except Exception as exc:
                        if isinstance(exc, TimeoutError) and timer.expired() and limit is not None:
                            logger.debug(f"{service}: response stalled after {request.audio_s:.2f}s of audio")
                            await abandon(_stalled(limit), context_id)
                        failure = _failure_from(exc, mid_body=request.frames > 0)
                        if failure is not None:
                            logger.debug(f"{service}: request failed ({type(exc).__name__}: {exc})")
                            await report(failure, context_id)
                        raise
                    if isinstance(frame, TTSAudioRawFrame):
                        request.audio(frame)
                    elif isinstance(frame, ErrorFrame):
                        logger.debug(f"{service}: request refused ({frame.error})")
                        await abandon(_failure_from_error(frame.error), context_id)
                    yield frame
            finally:
                await body.aclose()
            if adapter.cut_short(request.letters, request.spoken_s):
                logger.debug(
                    f"{service}: response ended early: {request.audio_s:.2f}s of audio "
                    f"for {request.letters} letters (speed {request.speed:g})"
                )
                await abandon(_ended_early(request), context_id)
            adapter.measured(request.letters, request.spoken_s)

        service.run_tts = run_tts_read


def _leave_retries_to_the_wrapper(service: Any) -> None:
    """Give the instance a client that does not retry, unless its factory chose a retry count."""
    client = getattr(service, "_client", None)
    with_options = getattr(client, "with_options", None)
    if with_options is None or getattr(client, "max_retries", None) != SDK_DEFAULT_MAX_RETRIES:
        return
    try:
        service._client = with_options(max_retries=0)
    except Exception as exc:
        logger.debug(f"{service}: left the SDK's retries on ({type(exc).__name__}: {exc})")


def _stall_limit(service: Any, stall_timeout: object) -> float | None:
    """How long to wait for the next audio of a body: ``stall_timeout`` past one read at real-time pace.

    The stock service pushes audio one read at a time (its ``chunk_size``:
    0.5 s of audio), so a provider streaming at real-time pace leaves that
    long between pushes without stalling.
    """
    if not isinstance(stall_timeout, int | float) or isinstance(stall_timeout, bool) or stall_timeout <= 0:
        return None
    try:
        read_s = float(service.chunk_size) / (2 * float(service.sample_rate))
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        read_s = 0.0
    return float(stall_timeout) + max(0.0, read_s)


def _speed(service: Any) -> float:
    """The speed the instance asks for (1 when it asks for none)."""
    speed = getattr(getattr(service, "_settings", None), "speed", None)
    if isinstance(speed, int | float) and not isinstance(speed, bool) and speed > 0:
        return float(speed)
    return 1.0


def _failure_from(exc: BaseException, *, mid_body: bool) -> Failure | None:
    """Classify what a request raised (None: not a provider failure, left to the stock service)."""
    failure = classify_exception(exc)
    if failure is None:
        return None
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    retry_after = failure.retry_after
    if headers is not None:
        # OpenAI's own header, in milliseconds: the SDK reads it before Retry-After.
        try:
            retry_after = max(0.0, float(headers.get("retry-after-ms")) / 1000)
        except (TypeError, ValueError):
            pass
    request_id = getattr(exc, "request_id", None)
    what = "response cut off" if mid_body else "request failed"
    return dataclasses.replace(
        failure,
        description=f"OpenAI TTS {what}: {failure.description}",
        retry_after=retry_after,
        trace_id=request_id if isinstance(request_id, str) else failure.trace_id,
    )


def _failure_from_error(message: str) -> Failure:
    """Classify an error the stock service caught itself (a 400, an unknown voice)."""
    found = _STATUS.search(message or "")
    if found is None:
        return Failure(Verdict.PERMANENT, "invalid_request", "OpenAI TTS refused the request")
    failure = classify_status(int(found.group(1)))
    return dataclasses.replace(failure, description=f"OpenAI TTS request failed: {failure.description}")


def _stalled(seconds: float) -> Failure:
    description = f"OpenAI TTS response stalled for more than {seconds:g}s"
    return Failure(Verdict.TRANSIENT, "connectivity", description)


def _ended_early(request: _Request) -> Failure:
    # Retried once when nothing at all came; the same empty answer again, with
    # no audio in between, is poison (the description is the same each time).
    if request.audio_s <= 0:
        return Failure(Verdict.SUSPECT, "connectivity", "OpenAI TTS response had no audio")
    return Failure(Verdict.TRANSIENT, "connectivity", "OpenAI TTS response ended early")
