"""Classifying close codes, HTTP statuses and exceptions."""

from __future__ import annotations

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus
from websockets.frames import Close
from websockets.http11 import Response

from pipecat_resilient.failures import (
    Failure,
    Verdict,
    classify_close,
    classify_exception,
    classify_status,
    parse_retry_after,
)


@pytest.mark.parametrize("code", [1000, 1001, 1006, 1011, 1012, 1013, 1014])
def test_restart_and_network_closes_are_transient(code: int) -> None:
    """Provider restarts, internal errors and lost connections are retried."""
    assert classify_close(code).verdict is Verdict.TRANSIENT


@pytest.mark.parametrize("code", [1002, 1003, 1007, 1009])
def test_payload_closes_are_suspect(code: int) -> None:
    """A close that may be caused by what we sent is retried once, then called poison."""
    assert classify_close(code).verdict is Verdict.SUSPECT


@pytest.mark.parametrize(
    ("reason", "category"),
    [
        ("Invalid API key", "authentication"),
        ("unauthorized", "authentication"),
        ("voice_id abc does not exist", "invalid_request"),
        ("quota_exceeded: insufficient credits", "quota"),
        ("permission denied for model", "authorization"),
    ],
)
def test_policy_closes_that_say_why_are_permanent(reason: str, category: str) -> None:
    """ElevenLabs-style 1008 closes naming a bad key, voice or quota are never retried."""
    failure = classify_close(1008, reason)
    assert failure.verdict is Verdict.PERMANENT
    assert failure.category == category
    assert reason in failure.description


def test_idle_timeout_policy_close_is_transient() -> None:
    """ElevenLabs closes an idle socket with 1008 input_timeout_exceeded: just reconnect."""
    assert classify_close(1008, "input_timeout_exceeded").verdict is Verdict.TRANSIENT


def test_unexplained_policy_close_is_suspect() -> None:
    """A 1008 with no telling reason is retried once."""
    assert classify_close(1008, "").verdict is Verdict.SUSPECT


def test_normal_close_explained_as_bad_key_is_permanent() -> None:
    """A reason that says retrying cannot help wins over a benign code."""
    assert classify_close(1000, "invalid api key").verdict is Verdict.PERMANENT


@pytest.mark.parametrize(
    ("status", "verdict", "category"),
    [
        (401, Verdict.PERMANENT, "authentication"),
        (403, Verdict.PERMANENT, "authorization"),
        (404, Verdict.PERMANENT, "invalid_request"),
        (400, Verdict.PERMANENT, "invalid_request"),
        (402, Verdict.PERMANENT, "quota"),
        (429, Verdict.TRANSIENT, "rate_limit"),
        (408, Verdict.TRANSIENT, "connectivity"),
        (500, Verdict.TRANSIENT, "server"),
        (503, Verdict.TRANSIENT, "server"),
    ],
)
def test_http_statuses(status: int, verdict: Verdict, category: str) -> None:
    """Auth and invalid-request statuses are permanent; rate limits and 5xx are not."""
    failure = classify_status(status)
    assert (failure.verdict, failure.category, failure.code) == (verdict, category, status)


def test_retry_after_is_read_in_seconds_and_as_a_date() -> None:
    """Retry-After comes as seconds or an HTTP date."""
    assert classify_status(429, {"Retry-After": "2"}).retry_after == 2.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-3") == 0.0


def test_exceptions_from_websockets_are_classified() -> None:
    """ConnectionClosed carries its code; InvalidStatus carries its status and headers."""
    closed = ConnectionClosedError(Close(1012, "restart"), None)
    assert classify_exception(closed).code == 1012
    aborted = ConnectionClosedError(None, None)
    assert classify_exception(aborted).code == 1006
    assert classify_exception(ConnectionClosedOK(Close(1000, ""), None)).verdict is Verdict.TRANSIENT
    refused = InvalidStatus(Response(401, "Unauthorized", Headers()))
    assert classify_exception(refused).verdict is Verdict.PERMANENT
    limited = InvalidStatus(Response(429, "Too Many", Headers({"Retry-After": "1"})))
    assert classify_exception(limited).retry_after == 1.0


def test_network_errors_are_transient_and_others_are_not_connection_failures() -> None:
    """OSError and timeouts are retried; an application error is not a connection failure."""
    assert classify_exception(ConnectionRefusedError()).verdict is Verdict.TRANSIENT
    assert classify_exception(TimeoutError()).verdict is Verdict.TRANSIENT
    assert classify_exception(ValueError("bad transform")) is None
    assert classify_exception(None) is None


def test_same_failure_is_recognised() -> None:
    """Poison detection compares code, category and description."""
    a = classify_close(1007, "invalid payload")
    assert a.same_as(classify_close(1007, "invalid payload"))
    assert not a.same_as(classify_close(1007, "other"))
    assert not a.same_as(None)
    assert isinstance(a, Failure)
