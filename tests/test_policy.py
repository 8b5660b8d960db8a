"""RetryPolicy validation and the backoff it produces."""

from __future__ import annotations

import math
import random

import pytest

from pipecat_resilient.policy import DEFAULT_RETRY, RetryPolicy, backoff


def test_defaults_start_well_under_a_second() -> None:
    """The first waits are tens of milliseconds, not Pipecat's 4 s floor."""
    assert DEFAULT_RETRY.wait_bound(1) <= 0.1
    assert DEFAULT_RETRY.wait_bound(3) < 1.0
    assert DEFAULT_RETRY.attempts >= 3


def test_bounds_grow_exponentially_and_are_capped() -> None:
    """wait_initial * base ** (n - 1), never above wait_max."""
    policy = RetryPolicy(attempts=10, wait_initial=0.1, wait_max=1.0, wait_exp_base=2.0)
    assert [policy.wait_bound(n) for n in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])
    assert policy.wait_bound(10_000) == 1.0


def test_full_jitter_draws_between_zero_and_the_bound() -> None:
    """Each wait lies in [0, bound]; the same seed gives the same waits."""
    policy = RetryPolicy(attempts=6, wait_initial=0.1, wait_max=1.0)
    waits = list(backoff(policy, random.Random(7)))
    assert len(waits) == 5
    for n, wait in enumerate(waits, start=1):
        assert 0.0 <= wait <= policy.wait_bound(n)
    assert waits == list(backoff(policy, random.Random(7)))
    assert len(set(waits)) > 1


def test_without_jitter_waits_are_the_bounds() -> None:
    """jitter=False waits exactly the capped exponential value."""
    policy = RetryPolicy(attempts=4, wait_initial=0.5, wait_max=1.0, jitter=False)
    assert list(backoff(policy)) == [0.5, 1.0, 1.0]


def test_zero_wait_policy_for_tests() -> None:
    """A zero-wait policy retries at once."""
    assert list(backoff(RetryPolicy(attempts=3, wait_initial=0, wait_max=0))) == [0.0, 0.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempts": 0}, "attempts must be at least 1"),
        ({"attempts": 2.5}, "attempts must be an int"),
        ({"attempts": True}, "attempts must be an int"),
        ({"wait_initial": -0.1}, "wait_initial must be a non-negative"),
        ({"wait_max": -1.0}, "wait_max must be a non-negative"),
        ({"wait_initial": 2.0, "wait_max": 1.0}, "must not be smaller than wait_initial"),
        ({"wait_initial": math.nan}, "wait_initial must be a non-negative"),
        ({"timeout": 0}, "timeout must be a positive"),
        ({"timeout": -5}, "timeout must be a positive"),
        ({"attempt_timeout": math.inf}, "attempt_timeout must be a positive"),
        ({"wait_exp_base": 0.5}, "wait_exp_base must be at least 1"),
    ],
)
def test_bad_values_fail_at_construction(kwargs: dict, message: str) -> None:
    """Invalid values raise a clear error when the policy is made, not during a call."""
    with pytest.raises((ValueError, TypeError), match=message):
        RetryPolicy(**kwargs)


def test_none_means_no_limit() -> None:
    """timeout=None and attempt_timeout=None are accepted."""
    policy = RetryPolicy(timeout=None, attempt_timeout=None)
    assert policy.timeout is None and policy.attempt_timeout is None


def test_policy_is_frozen() -> None:
    """Policies are values: shared safely, changed with dataclasses.replace."""
    with pytest.raises(AttributeError):
        DEFAULT_RETRY.attempts = 9  # type: ignore[misc]
