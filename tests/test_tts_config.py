"""Bad configuration fails at construction with a clear error, never later in a call."""

from __future__ import annotations

import math

import pytest
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

from pipecat_resilient import ResilientTTS, RetryPolicy


def make_stock(**kwargs: object) -> ElevenLabsTTSService:
    return ElevenLabsTTSService(
        api_key="test-key",
        url="ws://127.0.0.1:9",
        settings=ElevenLabsTTSService.Settings(voice="v"),
        **kwargs,  # type: ignore[arg-type]
    )


def test_defaults_work() -> None:
    """ResilientTTS(factory) with nothing else is a complete configuration."""
    tts = ResilientTTS(make_stock)
    assert tts.is_usable
    assert tts.service is None  # not live until the pipeline starts


def test_factory_must_be_callable() -> None:
    """Passing a service instead of a factory is the classic mistake."""
    with pytest.raises(TypeError, match="factory must be a zero-argument callable"):
        ResilientTTS(make_stock())  # type: ignore[arg-type]


def test_factory_that_raises_fails_at_construction() -> None:
    """The factory is called at construction, so its error surfaces there."""

    def broken() -> ElevenLabsTTSService:
        raise RuntimeError("no key configured")

    with pytest.raises(ValueError, match="factory raised RuntimeError: no key configured"):
        ResilientTTS(broken)


def test_factory_must_return_a_tts_service() -> None:
    """Anything but a TTSService is refused."""
    with pytest.raises(TypeError, match="factory must return a TTSService, got FrameProcessor"):
        ResilientTTS(lambda: FrameProcessor())  # type: ignore[arg-type,return-value]


def test_factory_must_return_a_new_instance_each_time() -> None:
    """A factory returning one shared instance could never replace a dead one."""
    shared = make_stock()
    with pytest.raises(ValueError, match="returned the same ElevenLabsTTSService twice"):
        ResilientTTS(lambda: shared)


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, "2", True])
@pytest.mark.parametrize("name", ["first_audio_timeout", "stall_timeout"])
def test_timeouts_must_be_positive_numbers(name: str, value: object) -> None:
    """Watchdog timeouts are positive, finite seconds."""
    with pytest.raises(ValueError, match=f"{name} must be a positive number"):
        ResilientTTS(make_stock, **{name: value})  # type: ignore[arg-type]


def test_watchdog_must_fire_before_pipecat_forces_text_as_spoken() -> None:
    """A watchdog slower than stop_frame_timeout_s would let unheard text into the context."""
    with pytest.raises(ValueError, match="stop_frame_timeout_s"):
        ResilientTTS(make_stock, stall_timeout=3.5)
    # A service configured with a longer timeout allows a longer watchdog.
    ResilientTTS(lambda: make_stock(stop_frame_timeout_s=6.0), stall_timeout=3.5)


def test_retry_must_be_a_policy() -> None:
    """A dict of options is not a policy."""
    with pytest.raises(TypeError, match="retry must be a RetryPolicy"):
        ResilientTTS(make_stock, retry={"attempts": 3})  # type: ignore[arg-type]


def test_invalid_policy_fails_before_the_processor_exists() -> None:
    """Negative waits are refused by the policy itself."""
    with pytest.raises(ValueError, match="wait_initial must be a non-negative"):
        ResilientTTS(make_stock, retry=RetryPolicy(wait_initial=-1))


def test_reconnection_is_taken_over_from_the_stock_service() -> None:
    """The hosted instance must not reconnect on its own (two owners would race)."""
    tts = ResilientTTS(make_stock)
    assert tts._host.first.service._reconnect_on_error is False
