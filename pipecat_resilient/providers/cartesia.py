"""Cartesia (websocket TTS): word timings with start and end, error messages, quiet reconnects.

Cartesia sends ``timestamps`` messages with several words each (start and end
in seconds from the context's start), before or after the ``chunk`` messages
carrying their audio - the order is not fixed. The adapter reports each
timing as it arrives; the ledger counts it once the audio reaches it. An
``error`` message (the socket stays open; the stock service marks the
context stopped, which would put its unheard text into the context) fails the
connection at once. A normal close from Cartesia makes the stock service
reconnect inline, with no error and no event: it is reported as a failure too.
Failures: the error's ``status_code`` is an HTTP status: 400 (an unknown voice
or model), 401, 402, 403 are permanent; 429 and 5xx are transient.
"""

from __future__ import annotations

import json
from typing import Any

from pipecat_resilient.providers._base import (
    AdapterSink,
    TTSAdapter,
    failure_from_status,
    provider_closed,
    tap_messages,
)

__all__ = ["CartesiaAdapter"]

_KEYS = ('"timestamps"', '"error"')


class CartesiaAdapter(TTSAdapter):
    """Cartesia's websocket TTS: word timings with end times, whatever their order against the audio."""

    name = "Cartesia"

    def hook(self, service: Any, sink: AdapterSink) -> None:
        """Read each message before the stock service does."""

        async def on_message(raw: str | bytes) -> None:
            if not isinstance(raw, str) or not any(key in raw for key in _KEYS):
                return
            message = json.loads(raw)
            kind = message.get("type")
            context_id = message.get("context_id")
            if kind == "error":
                failure = failure_from_status(message.get("status_code"), self.name, "error message")
                await sink.provider_failed(failure, context_id)
            elif kind == "timestamps":
                timestamps = message.get("word_timestamps") or {}
                words = timestamps.get("words") or []
                starts = timestamps.get("start") or []
                ends = timestamps.get("end") or [None] * len(words)
                timed = [
                    (str(word), float(start), float(end) if end is not None else None)
                    for word, start, end in zip(words, starts, ends, strict=False)
                ]
                await sink.words_timed(context_id, timed, last_partial=False)

        tap_messages(service, on_message, lambda closed: provider_closed(closed, self.name, sink))
