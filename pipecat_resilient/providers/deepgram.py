"""Deepgram (websocket TTS, ``/v1/speak``): no word timings; error messages and quiet closes.

Deepgram's streaming TTS reports no word timings, and Pipecat pushes each
sentence's text ahead of its audio. What a listener heard of a cut turn is
therefore estimated from the audio duration and the speaking rate measured
on the turns already finished in this session, rounded down to a word (see
:mod:`pipecat_resilient._timeline`): a word may be said twice, none skipped.
Before any turn has finished there is no rate yet, and a cut turn is replayed
from where its audio in that connection began.

Deepgram may hold the text of a turn until Pipecat flushes it at the turn's
end, so the wait for first audio starts at that flush, not at the text.

An ``Error`` message fails the connection at once (the stock service only logs
it at DEBUG); a ``Warning`` does not. A normal close from Deepgram (an idle
timeout) is a failure too. Failures: an error's status (when it carries one)
is an HTTP status: 400, 401, 402, 403 are permanent; 429 and 5xx transient.
"""

from __future__ import annotations

import json
import re
from typing import Any

from loguru import logger

from pipecat_resilient.providers._base import (
    AdapterSink,
    TTSAdapter,
    failure_from_status,
    provider_closed,
    tap_messages,
)

__all__ = ["DeepgramAdapter"]

_STATUS = re.compile(r"\b([1-5]\d\d)\b")


class DeepgramAdapter(TTSAdapter):
    """Deepgram's websocket TTS: errors and closes; what was heard is estimated from audio time."""

    name = "Deepgram"
    word_timings = False
    # Deepgram may hold text until the turn's flush (Pipecat flushes only at
    # the end of a turn): no audio before then is not a stall.
    audio_before_flush = False

    def hook(self, service: Any, sink: AdapterSink) -> None:
        """Read each text message before the stock service does."""

        async def on_message(raw: str | bytes) -> None:
            if not isinstance(raw, str) or '"Error"' not in raw and '"Warning"' not in raw:
                return
            message = json.loads(raw)
            kind = message.get("type")
            if kind == "Warning":
                logger.debug(f"{service}: Deepgram warning {message.get('code')!r} (not a failure)")
            elif kind == "Error":
                status = message.get("status") or message.get("code")
                if not isinstance(status, int):
                    found = _STATUS.search(str(message.get("message") or ""))
                    status = int(found.group(1)) if found else None
                await sink.provider_failed(failure_from_status(status, self.name, "error message"), None)

        tap_messages(service, on_message, lambda closed: provider_closed(closed, self.name, sink))
