"""Which provider failures are worth retrying: close codes, HTTP statuses, exceptions.

Pure functions from what the socket or the handshake reported to a
:class:`Failure`: a :class:`Verdict` (retry, never retry, or retry once and
call it poison if it repeats), Pipecat's error category as a string, and a
short description that never contains user text or credentials.

The rules follow RFC 6455 section 7.4 for close codes, the IANA registry for
3000-3003, and what the providers are observed to send (see PROVIDERS.md):
ElevenLabs restarts with 1012 and closes with 1008 plus a reason for a bad key,
an unknown voice or an idle socket; Gemini Live closes with 1007 and 1011.
"""

from __future__ import annotations

import dataclasses
import email.utils
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

__all__ = [
    "Failure",
    "Verdict",
    "classify_close",
    "classify_exception",
    "classify_status",
    "parse_retry_after",
]


class Verdict(Enum):
    """What to do about a failure.

    Parameters:
        TRANSIENT: Retry on a fresh connection.
        PERMANENT: Never retry; the same request would fail the same way
            (bad credentials, unknown voice or model, malformed request).
        SUSPECT: Retry once. If the same failure comes back before the fresh
            connection made any progress, the input is poison: stop.
    """

    TRANSIENT = "transient"
    PERMANENT = "permanent"
    SUSPECT = "suspect"


@dataclass(frozen=True, slots=True)
class Failure:
    """One classified failure.

    Parameters:
        verdict: Whether to retry.
        category: The matching ``pipecat.utils.errors.ErrorCategory`` value
            (``"authentication"``, ``"connectivity"``, ...).
        description: Short text for logs and error frames. Holds the close
            code or status and the provider's reason, never user text.
        code: The websocket close code or HTTP status, when there was one.
        retry_after: Seconds the provider asked us to wait, when it said.
        trace_id: The provider's trace or request id, when its reason gave one.
    """

    verdict: Verdict
    category: str
    description: str
    code: int | None = None
    retry_after: float | None = None
    trace_id: str | None = None

    @property
    def is_permanent(self) -> bool:
        """Whether retrying is pointless."""
        return self.verdict is Verdict.PERMANENT

    def same_as(self, other: Failure | None) -> bool:
        """Whether ``other`` is the same failure again (for poison detection)."""
        return (
            other is not None
            and other.code == self.code
            and other.category == self.category
            and other.description == self.description
        )


# Words in a close reason that say retrying cannot help.
_AUTH_WORDS = ("api key", "api_key", "apikey", "unauthorized", "unauthorised", "authenticat", "credential")
_FORBIDDEN_WORDS = ("forbidden", "permission", "not allowed", "access denied")
_INVALID_WORDS = (
    "does not exist",
    "not found",
    "invalid_voice",
    "voice_not_found",
    "model_not_found",
    "invalid model",
    "invalid voice",
    "unknown voice",
    "unknown model",
    "unsupported",
)
_QUOTA_WORDS = ("quota", "credits", "insufficient", "payment", "billing")
# ...and words that say it was a passing condition.
_TRANSIENT_WORDS = ("timeout", "timed out", "idle", "inactiv", "restart", "overload", "try again", "busy")

_CLOSE_TRANSIENT: dict[int, tuple[str, str]] = {
    1000: ("connectivity", "closed normally by the provider"),
    1001: ("connectivity", "provider going away"),
    1005: ("connectivity", "closed without a status"),
    1006: ("connectivity", "connection lost without a close frame"),
    1011: ("server", "provider internal error"),
    1012: ("server", "provider restarting"),
    1013: ("rate_limit", "provider asked to try again later"),
    1014: ("server", "bad gateway"),
    1015: ("connectivity", "TLS handshake failure"),
}
_CLOSE_SUSPECT: dict[int, str] = {
    1002: "protocol error",
    1003: "unsupported data",
    1007: "invalid payload",
    1009: "message too big",
    1010: "mandatory extension",
}


def classify_close(code: int | None, reason: str = "") -> Failure:
    """Classify a websocket close.

    Args:
        code: The close code received (``None`` or 1006 when the connection
            died without a close frame).
        reason: The close reason the provider sent.

    Returns:
        The classified failure.
    """
    reason = (reason or "").strip()
    failure = _classify_close(code, reason)
    match = _TRACE_ID.search(reason)
    if match:
        failure = dataclasses.replace(failure, trace_id=match.group(1))
    return failure


_TRACE_ID = re.compile(r"(?i)\b(?:trace|request)[ _-]?id\W{0,3}([A-Za-z0-9][\w.:/-]{3,})")


def _classify_close(code: int | None, reason: str) -> Failure:
    label = f"close {code}" if code is not None else "connection lost"
    detail = f"{label} ({reason})" if reason else label
    if code is None:
        return Failure(Verdict.TRANSIENT, "connectivity", f"{detail}: connection lost", code)
    if code in (3000,):
        return Failure(Verdict.PERMANENT, "authentication", f"{detail}: unauthorized", code)
    if code in (3003,):
        return Failure(Verdict.PERMANENT, "authorization", f"{detail}: forbidden", code)
    by_reason = _classify_reason(reason, code, detail)
    if code in _CLOSE_TRANSIENT:
        # A provider may still explain a normal-looking close (ElevenLabs sends
        # its auth failures as 1008, but a 1000 with "invalid api key" would be
        # just as final).
        if by_reason is not None and by_reason.verdict is Verdict.PERMANENT:
            return by_reason
        category, what = _CLOSE_TRANSIENT[code]
        return Failure(Verdict.TRANSIENT, category, f"{detail}: {what}", code)
    if by_reason is not None:
        return by_reason
    if code in _CLOSE_SUSPECT:
        return Failure(Verdict.SUSPECT, "invalid_request", f"{detail}: {_CLOSE_SUSPECT[code]}", code)
    if code == 1008 or 3000 <= code <= 4999:
        return Failure(Verdict.SUSPECT, "unknown", f"{detail}: policy violation", code)
    return Failure(Verdict.TRANSIENT, "connectivity", f"{detail}: unexpected close", code)


def _classify_reason(reason: str, code: int | None, detail: str) -> Failure | None:
    """Read a provider's close reason; None when it says nothing decisive."""
    text = reason.lower()
    if not text:
        return None
    if any(word in text for word in _TRANSIENT_WORDS):
        return Failure(Verdict.TRANSIENT, "connectivity", f"{detail}: transient", code)
    if any(word in text for word in _AUTH_WORDS):
        return Failure(Verdict.PERMANENT, "authentication", f"{detail}: authentication failed", code)
    if any(word in text for word in _FORBIDDEN_WORDS):
        return Failure(Verdict.PERMANENT, "authorization", f"{detail}: not authorized", code)
    if any(word in text for word in _QUOTA_WORDS):
        return Failure(Verdict.PERMANENT, "quota", f"{detail}: quota exhausted", code)
    if any(word in text for word in _INVALID_WORDS):
        return Failure(Verdict.PERMANENT, "invalid_request", f"{detail}: invalid request", code)
    return None


def classify_status(
    status: int, headers: Mapping[str, str] | None = None, *, now: float | None = None
) -> Failure:
    """Classify an HTTP status that refused a websocket handshake or a request.

    Args:
        status: The HTTP status code.
        headers: Response headers, read for ``Retry-After``.
        now: The current wall-clock time, for an HTTP-date ``Retry-After``.

    Returns:
        The classified failure.
    """
    retry_after = parse_retry_after(_header(headers, "Retry-After"), now=now)
    detail = f"HTTP {status}"
    if status == 401:
        return Failure(Verdict.PERMANENT, "authentication", f"{detail}: authentication failed", status)
    if status == 403:
        return Failure(Verdict.PERMANENT, "authorization", f"{detail}: not authorized", status)
    if status == 402:
        return Failure(Verdict.PERMANENT, "quota", f"{detail}: payment required", status)
    if status in (408, 425):
        return Failure(Verdict.TRANSIENT, "connectivity", f"{detail}: try again", status, retry_after)
    if status == 429:
        return Failure(Verdict.TRANSIENT, "rate_limit", f"{detail}: rate limited", status, retry_after)
    if 400 <= status < 500:
        return Failure(Verdict.PERMANENT, "invalid_request", f"{detail}: invalid request", status)
    if 500 <= status < 600:
        return Failure(Verdict.TRANSIENT, "server", f"{detail}: provider error", status, retry_after)
    return Failure(Verdict.SUSPECT, "unknown", f"{detail}: unexpected status", status)


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """A header value, looked up without regard to case."""
    if not headers:
        return None
    name = name.lower()
    return next((value for key, value in headers.items() if key.lower() == name), None)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Parse a ``Retry-After`` header (seconds or an HTTP date) into seconds.

    Args:
        value: The header value.
        now: Current wall-clock time for the HTTP-date form; ``time.time()`` when omitted.

    Returns:
        Non-negative seconds to wait, or None when absent or unreadable.
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# Provider SDKs (openai, httpx, google-genai) raise their own classes for a
# broken or timed-out connection; they are matched by name so that none of
# those SDKs needs to be installed.
_SDK_TIMEOUTS = frozenset({"APITimeoutError", "ReadTimeout", "ConnectTimeout", "WriteTimeout", "PoolTimeout"})
_SDK_CONNECTION_ERRORS = frozenset(
    {"APIConnectionError", "ConnectError", "ReadError", "WriteError", "RemoteProtocolError", "ProtocolError"}
)


def classify_exception(exc: BaseException | None) -> Failure | None:
    """Classify an exception raised by a provider connection.

    Args:
        exc: The exception, as carried by an ``ErrorFrame`` or raised.

    Returns:
        The classified failure, or None when the exception does not describe a
        connection failure (an application error, say).
    """
    if exc is None:
        return None
    if isinstance(exc, ConnectionClosed):
        frame = exc.rcvd or exc.sent
        code = frame.code if frame is not None else 1006
        reason = exc.rcvd.reason if exc.rcvd is not None else ""
        return classify_close(code, reason)
    close_code = getattr(exc, "code", None)
    if isinstance(close_code, int) and not isinstance(close_code, bool) and 1000 <= close_code <= 4999:
        # google-genai raises APIError(code=close code, details=close reason)
        # when the Live API closes the socket.
        details = getattr(exc, "details", None) or getattr(exc, "message", None) or ""
        return classify_close(close_code, details if isinstance(details, str) else str(details))
    if isinstance(exc, InvalidStatus):
        response = exc.response
        return classify_status(response.status_code, response.headers)
    if isinstance(exc, InvalidHandshake):
        return Failure(Verdict.TRANSIENT, "connectivity", f"handshake failed: {type(exc).__name__}")
    if isinstance(exc, TimeoutError) or type(exc).__name__ in _SDK_TIMEOUTS:
        return Failure(Verdict.TRANSIENT, "connectivity", "timed out")
    if type(exc).__name__ in _SDK_CONNECTION_ERRORS:
        return Failure(Verdict.TRANSIENT, "connectivity", f"connection failed: {type(exc).__name__}")
    if isinstance(exc, OSError):
        return Failure(Verdict.TRANSIENT, "connectivity", f"network error: {type(exc).__name__}")
    status = getattr(exc, "status_code", None) or getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int) and not isinstance(status, bool):
        headers = getattr(getattr(exc, "response", None), "headers", None)
        return classify_status(status, dict(headers) if headers else None)
    return None
