"""Shared fixtures: stock TTS services against their emulators, with zero-wait policies.

The ``provider`` fixture runs a test once per TTS provider kit (ElevenLabs,
Cartesia with each order of word timings against the audio, Deepgram without
word timings): the same fault matrix against every stock service.
"""

from __future__ import annotations

import asyncio
import asyncio.runners
import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from loguru import logger
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService
from pipecat.services.tts_service import TTSService

from pipecat_resilient import ResilientTTS, RetryPolicy, health
from pipecat_resilient.testing import ElevenLabsEmulator, FaultPlan
from pipecat_resilient.testing._server import ConnectionRecord, WebsocketEmulator
from pipecat_resilient.testing.kits import TTSKit, tts_kit

# How long closing a test's event loop waits for its leftover tasks to end.
LEFTOVER_TASKS_S = 10.0


def _cancel_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """``asyncio.runners._cancel_all_tasks``, with a bound on the wait.

    A test that fails with a pipeline still running leaves Pipecat's worker
    tasks behind; one of them can wait forever once cancelled. Closing the
    loop would then hang, after pytest-timeout stopped timing the failed test,
    and hold the run until CI's own limit. Tasks still running after the
    bound are left (the loop closes anyway) and the test's failure is reported.
    """
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    _, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=LEFTOVER_TASKS_S))
    if pending:
        print(
            f"\n{len(pending)} task(s) still running {LEFTOVER_TASKS_S:g} s after cancel; left",
            file=sys.stderr,
        )
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception while closing the loop",
                    "exception": task.exception(),
                    "task": task,
                }
            )


asyncio.runners._cancel_all_tasks = _cancel_leftover_tasks  # type: ignore[attr-defined]

# Every timeout in the suite scales from this, like websockets' MS.
UNIT = 0.1

# Retry without waiting, so recovery costs only the local connect.
NO_WAIT = RetryPolicy(attempts=4, wait_initial=0.0, wait_max=0.0, timeout=20 * UNIT * 10)

SAMPLE_RATE = 24000


@pytest.fixture(autouse=True)
def _short_gc_pauses() -> None:
    """Keep the garbage collector's full passes short: freeze what is alive as each test starts.

    The suite runs over a thousand tests in one process, and what they leave
    alive (imported modules, module fixtures' results) grows the heap to some
    400,000 objects; a full collection then stopped the event loop for up to
    half a second, in the middle of whatever test was running, and a bound on
    a recovery or a turn timed out. Objects alive when a test starts are
    collected once and then left out of later passes (``gc.freeze``), so a
    pass during the test scans only what the test itself made.
    """
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


@pytest.fixture(autouse=True)
def _fresh_health_store() -> None:
    """Each test starts with its own process-wide health store, as a fresh bot process does.

    Processors given no store share one per process: without this, a test that
    left a provider's breaker open (the emulators' providers are named after
    their stock services) made a later test skip that provider, or its standby,
    until the cooldown passed, depending on the order the tests ran in.
    """
    health._default_store = None


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


# ----------------------------------------------------------------------
# Provider kits: the same test against every stock TTS service
# ----------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    """One TTS provider kit as the tests drive it (a :class:`TTSKit` with options).

    Parameters:
        name: The test id (the kit's name, and the variant).
        kit: The provider's kit.
        emulator_options: Options for the emulator.
        tts_options: Options for ResilientTTS.
    """

    name: str
    kit: TTSKit
    emulator_options: dict[str, Any] = field(default_factory=dict)
    tts_options: dict[str, Any] = field(default_factory=dict)

    @property
    def timings(self) -> bool:
        """Whether the provider reports word timings."""
        return self.kit.timings

    def emulator(self, plan: FaultPlan | None = None, **options: Any) -> WebsocketEmulator:
        """A stopped emulator of this provider (use with ``async with``)."""
        return self.kit.emulator(plan, **{**self.emulator_options, **options})

    def stock(self, emulator: Any, *, api_key: str = "test-key", voice: str = "test-voice") -> TTSService:
        """A stock service pointed at ``emulator``."""
        return self.kit.stock(emulator, api_key=api_key, voice=voice)

    def factory(self, emulator: Any, **options: Any) -> Callable[[], TTSService]:
        """A factory of stock services pointed at ``emulator``."""
        return self.kit.factory(emulator, **options)

    def resilient(
        self, emulator: Any, *, retry: RetryPolicy = NO_WAIT, api_key: str = "test-key", **kwargs: Any
    ) -> ResilientTTS:
        """A ResilientTTS around the stock service, with test timeouts."""
        options: dict[str, Any] = {"first_audio_timeout": 3 * UNIT, "stall_timeout": 3 * UNIT}
        options.update(self.tts_options)
        options.update(kwargs)
        return ResilientTTS(self.factory(emulator, api_key=api_key), retry=retry, **options)

    def voice(self, record: ConnectionRecord) -> str | None:
        """The voice a connection was opened with (or its first request asked for)."""
        return self.kit.voice(record)

    def __str__(self) -> str:
        return self.name


ELEVENLABS = Provider("elevenlabs", tts_kit("elevenlabs"))
CARTESIA = tts_kit("cartesia")
PROVIDERS = [
    ELEVENLABS,
    Provider("cartesia-after", CARTESIA, emulator_options={"timestamps": "after"}),
    # Timings grouped after their audio: a drop before the session's first
    # group came has no timing at all to go by, only the speaking rate the bot
    # was told (without one, such a drop replays the cut sentence: see
    # test_a_first_cut_before_any_timing_is_replayed_never_lost).
    Provider(
        "cartesia-grouped",
        CARTESIA,
        emulator_options={"timestamps": "grouped", "words_per_timestamps": 3},
        tts_options={"speaking_rate": 100.0},
    ),
    Provider("cartesia-ahead", CARTESIA, emulator_options={"timestamps": "ahead", "words_per_timestamps": 2}),
    Provider("cartesia-shuffled", CARTESIA, emulator_options={"timestamps": "shuffled", "seed": 3}),
    # Deepgram speaks the complete sentences of a long enough buffer before the
    # turn's flush, as its docs describe. Without word timings, what was heard
    # is estimated from the speaking rate: the bot is told the emulator's
    # (10 ms a character); tests/test_tts.py also covers a session with none.
    Provider(
        "deepgram",
        tts_kit("deepgram"),
        emulator_options={"auto_generate_chars": 30},
        tts_options={"speaking_rate": 100.0},
    ),
]


@pytest.fixture(params=PROVIDERS, ids=str)
def provider(request: pytest.FixtureRequest) -> Provider:
    """Each TTS provider kit in turn."""
    return request.param  # type: ignore[no-any-return]


def alignment(heard: list[str], expected: list[str]) -> tuple[int, int]:
    """How far ``heard`` is from ``expected``: ``(missing, repeated)`` words.

    Matched greedily in order: an expected word not found later is missing; a
    heard word that does not match the next expected one is a repeat.
    """
    index = 0
    repeated = 0
    for word in heard:
        if index < len(expected) and word == expected[index]:
            index += 1
        else:
            repeated += 1
    return len(expected) - index, repeated
