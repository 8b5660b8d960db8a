"""The provider adapter interface, the generic adapter, and the message tap adapters share.

A :class:`TTSAdapter` tells :class:`~pipecat_resilient.tts.ResilientTTS` what the
stock service does not: the provider's word timings (with end times, when the
protocol has them), its error messages on a socket left open, and a clean
close after which the stock service would quietly reconnect on its own. It
reports them to an :class:`AdapterSink` in provider-neutral terms; the ledger
never sees a provider's message.

The generic adapter works with any stock TTS service: it listens to the word
timings the service reports to Pipecat (start times only) and nothing else.
A provider module overrides what its protocol can say better, usually by
reading every message the socket receives before the stock service does
(:func:`tap_messages`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from loguru import logger
from websockets.exceptions import ConnectionClosedOK
from websockets.frames import Close

from pipecat_resilient._close_watch import CloseWatch
from pipecat_resilient.failures import Failure, Verdict, classify_close, classify_status

__all__ = ["AdapterSink", "TTSAdapter", "WordTiming", "failure_from_status", "tap_messages"]

WordTiming = tuple[str, float, float | None]
"""``(word, start, end)``: seconds from the start of its context's audio; ``end`` may be unknown."""


class AdapterSink(Protocol):
    """Where an adapter reports what it learned (the shell)."""

    @property
    def stall_timeout(self) -> float:
        """Seconds audio may pause while the provider still owes some (for a read Pipecat cannot see)."""

    async def words_timed(
        self, context_id: str | None, words: list[WordTiming], *, last_partial: bool
    ) -> None:
        """The provider timed ``words`` of ``context_id`` (see :meth:`Ledger.words_timed`)."""

    async def provider_failed(self, failure: Failure, context_id: str | None) -> None:
        """The provider reported a failure (``context_id``: the context it concerns, None for all)."""


class TTSAdapter:
    """What differs between TTS providers; this base is the generic adapter.

    Subclass it in one small module per provider and register the stock class
    name in :mod:`pipecat_resilient.providers`.

    Attributes:
        name: The provider's name, for logs.
        word_timings: Whether the provider reports word timings at all
            (without them, what was heard of a cut sentence is estimated from
            the speaking rate).
        audio_before_flush: Whether the provider may start speaking text
            before the end of the turn flushes it (the wait for first audio
            starts at the text, else at the flush).
    """

    name = "generic"
    word_timings = True
    audio_before_flush = True

    def hook(self, service: Any, sink: AdapterSink) -> None:
        """Hook into a fresh stock instance, before it is set up.

        The generic adapter hears the word timings the stock service reports
        to Pipecat (their start times) through ``add_word_timestamps``.
        """
        add_word_timestamps = getattr(service, "add_word_timestamps", None)
        if add_word_timestamps is None:
            return

        async def observed(word_times: Any, context_id: str | None = None, *args: Any, **kwargs: Any) -> Any:
            try:
                words: list[WordTiming] = [(str(word), float(start), None) for word, start in word_times]
                await sink.words_timed(context_id, words, last_partial=False)
            except Exception as exc:  # evidence only: the stock service must go on
                logger.debug(f"{service}: could not read word timings ({type(exc).__name__}: {exc})")
            return await add_word_timestamps(word_times, context_id, *args, **kwargs)

        service.add_word_timestamps = observed


def tap_messages(
    service: Any,
    on_message: Callable[[str | bytes], Awaitable[None]],
    on_closed: Callable[[Close], Awaitable[None]] | None = None,
) -> None:
    """Read every message a stock websocket service receives, before the service does.

    Wraps the service's ``_websocket_connect`` (every Pipecat websocket
    service opens its sockets through it) so that each socket's ``recv`` -
    which the socket's own message iterator calls - hands the message to
    ``on_message`` first. A failing callback is logged at DEBUG and never
    disturbs the stock service.

    A close the provider started (normal or not) goes to ``on_closed`` as
    soon as its close frame is in and the stock service has handled every
    message that came before it (:class:`~pipecat_resilient._close_watch.CloseWatch`):
    a round trip sooner than the service hears of it (and on a normal close,
    the service hears nothing: it would quietly reconnect). Told once per
    socket; a close the client started (a shutdown, a settings reconnect) is
    not told.

    Args:
        service: A stock websocket service, before it connects.
        on_message: Called with each message received.
        on_closed: Called with the close frame when the provider closes the socket.
    """
    connect = getattr(service, "_websocket_connect", None)
    if connect is None:
        return

    async def connect_tapped(*args: Any, **kwargs: Any) -> Any:
        websocket = await connect(*args, **kwargs)
        recv = websocket.recv
        watch = CloseWatch(websocket, on_closed or _nothing, service)

        async def recv_tapped(*recv_args: Any, **recv_kwargs: Any) -> Any:
            if watch.pending is not None and not watch.told:
                await watch.before_recv()
            try:
                message = await recv(*recv_args, **recv_kwargs)
            except ConnectionClosedOK as closed:
                if closed.rcvd is not None and not _we_closed(closed):
                    await watch.tell(closed.rcvd)
                raise
            try:  # (not through a helper: one coroutine less for every message)
                await on_message(message)
            except Exception as exc:
                _tap_failed(service, exc)
            return message

        websocket.recv = recv_tapped
        return websocket

    service._websocket_connect = connect_tapped


def _we_closed(closed: ConnectionClosedOK) -> bool:
    """Whether the client started the closing handshake (a shutdown or a settings reconnect)."""
    return closed.sent is not None and not closed.rcvd_then_sent


async def _nothing(close: Close) -> None:
    return None


def _tap_failed(service: Any, exc: Exception) -> None:
    logger.debug(f"{service}: message tap failed ({type(exc).__name__}: {exc})")


def failure_from_status(status: object, provider: str, what: str) -> Failure:
    """Classify a provider error message carrying an HTTP-like status (or a close code).

    The description names the provider and the status, never the provider's
    message text (which may quote user text).
    """
    if isinstance(status, int) and not isinstance(status, bool):
        if 1000 <= status <= 4999:
            failure = classify_close(status)
        else:
            failure = classify_status(status)
        return Failure(
            failure.verdict,
            failure.category,
            f"{provider} {what} (status {status}): {failure.description.split(': ', 1)[-1]}",
            failure.code,
            failure.retry_after,
        )
    return Failure(Verdict.TRANSIENT, "server", f"{provider} {what} without a status")


async def provider_closed(close: Close, provider: str, sink: AdapterSink) -> None:
    """Report a close the provider started.

    (After a normal one, the stock service would reconnect and lose the rest.)
    """
    await sink.provider_failed(classify_close(close.code, close.reason), None)
