"""Shared fixtures: the stock ElevenLabs service against the emulator, with zero-wait policies."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
from loguru import logger
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

from pipecat_resilient import ResilientTTS, RetryPolicy
from pipecat_resilient.testing import ElevenLabsEmulator, FaultPlan

# Every timeout in the suite scales from this, like websockets' MS.
UNIT = 0.1

# Retry without waiting, so recovery costs only the local connect.
NO_WAIT = RetryPolicy(attempts=4, wait_initial=0.0, wait_max=0.0, timeout=20 * UNIT * 10)

SAMPLE_RATE = 24000


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def stock_factory(
    emulator: ElevenLabsEmulator, *, api_key: str = "test-key", **kwargs: object
) -> Callable[[], ElevenLabsTTSService]:
    """A factory of stock ElevenLabs services pointed at ``emulator``."""

    def make() -> ElevenLabsTTSService:
        return ElevenLabsTTSService(
            api_key=api_key,
            url=emulator.url,
            settings=ElevenLabsTTSService.Settings(voice="test-voice"),
            **kwargs,  # type: ignore[arg-type]
        )

    return make


def resilient(
    emulator: ElevenLabsEmulator, *, retry: RetryPolicy = NO_WAIT, **kwargs: object
) -> ResilientTTS:
    """A ResilientTTS around the stock service, with test timeouts."""
    options: dict[str, object] = {"first_audio_timeout": 3 * UNIT, "stall_timeout": 3 * UNIT}
    options.update(kwargs)
    api_key = options.pop("api_key", "test-key")
    return ResilientTTS(stock_factory(emulator, api_key=str(api_key)), retry=retry, **options)  # type: ignore[arg-type]


@pytest.fixture
def plan() -> FaultPlan:
    return FaultPlan()
