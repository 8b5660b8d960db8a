"""One process of a bot fleet, for tests/test_fleet.py: pipelines sharing a RedisHealthStore.

Run as ``python -m tests.fleet_worker CONFIG`` from the repository root, CONFIG
being a JSON object (see :func:`main`). Each pipeline is a real Pipecat
pipeline (``Scenario``: ``recorder -> ResilientTTS -> listener -> context``)
whose ResilientTTS speaks ElevenLabs (the primary) and falls back on Cartesia,
both emulators run by the test process. The pipelines of the process share one
:class:`~pipecat_resilient.redis_health.RedisHealthStore`, as the bots of one
server would.

The test drives it with one JSON command a line on stdin; the worker answers
and reports what happens with one JSON event a line on stdout:

* ``{"cmd": "speak", "pipeline": p, "text": ..., "tag": ...}`` -> ``spoke``,
  once the listener heard as many more words as the text has and the
  utterance stopped: the words heard, the seconds it took, the provider;
* ``{"cmd": "wait_local", "timeout": s}`` -> ``local``, once the store
  answers from this process's own view (Redis lost);
* ``{"cmd": "report"}`` -> ``report``: per pipeline everything heard, the
  words the LLM context received, the errors; the store's warnings;
* ``{"cmd": "quit"}`` -> ``bye``, after ending the pipelines.

Events the worker sends on its own: ``ready``; ``switched`` (a pipeline's
``on_provider_switched``, with the state of the primary it last read from the
store); ``health`` (the store's ``on_change``: a state change this process
made fleet-wide); ``probe`` (each ``try_acquire_probe`` and its answer).
Times are ``time.monotonic()``, one clock for every process of the machine.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from types import SimpleNamespace
from typing import Any

from loguru import logger
from pipecat.frames.frames import TTSSpeakFrame

from pipecat_resilient import BreakerPolicy, Health, ResilientTTS, RetryPolicy
from pipecat_resilient.redis_health import RedisHealthStore
from pipecat_resilient.testing import Scenario
from pipecat_resilient.testing.kits import tts_kit

ELEVENLABS = tts_kit("elevenlabs")
CARTESIA = tts_kit("cartesia")
PRIMARY = "ElevenLabsTTSService"

# Retry without waiting (tests/conftest.py's NO_WAIT).
NO_WAIT = RetryPolicy(attempts=4, wait_initial=0.0, wait_max=0.0, timeout=20.0)
# Several processes share two cores with other test runs: timeouts that a busy
# machine cannot trip, and fixed (learned ones may shrink to 0.25 s). The drops
# the tests make are aborted sockets, seen at once.
TIMEOUT = 1.5


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Watched:
    """One pipeline's view of the shared store: reports probes and remembers what it read."""

    def __init__(self, store: RedisHealthStore, pipeline: int) -> None:
        self.store = store
        self.pipeline = pipeline
        self.seen: dict[str, Health] = {}

    async def state(self, provider: str) -> Health:
        health = await self.store.state(provider)
        self.seen[provider] = health
        return health

    async def record_failure(self, provider: str, *, permanent: bool = False) -> Health:
        return await self.store.record_failure(provider, permanent=permanent)

    async def record_success(self, provider: str) -> Health:
        return await self.store.record_success(provider)

    async def try_acquire_probe(self, provider: str) -> bool:
        granted = await self.store.try_acquire_probe(provider)
        emit(event="probe", pipeline=self.pipeline, provider=provider, granted=granted, at=time.monotonic())
        return granted


class Bot:
    """One pipeline of the process."""

    def __init__(self, config: dict[str, Any], store: RedisHealthStore, pipeline: int) -> None:
        self.pipeline = pipeline
        self.voice = f"w{config['worker']}p{pipeline}"
        self.view = Watched(store, pipeline)
        primary = SimpleNamespace(url=config["primary"])
        backup = SimpleNamespace(url=config["backup"])
        self.tts = ResilientTTS(
            ELEVENLABS.factory(primary, voice=self.voice),
            fallbacks=[CARTESIA.factory(backup, voice=self.voice)],
            health=self.view,
            retry=NO_WAIT,
            first_audio_timeout=TIMEOUT,
            stall_timeout=TIMEOUT,
            adaptive_timeouts=False,
            switch_back="boundary",
            switch_after=1,
        )
        self.run = Scenario(self.tts, spc=config["spc"])

        @self.tts.event_handler("on_provider_switched")
        async def switched(processor: Any, old: str, new: str, reason: str) -> None:
            seen = self.view.seen.get(PRIMARY)
            emit(
                event="switched",
                pipeline=pipeline,
                old=old,
                new=new,
                reason=reason,
                seen=seen.value if seen is not None else None,
                at=time.monotonic(),
            )

    async def speak(self, text: str, tag: str) -> None:
        run = self.run
        before, stopped = len(run.heard), run.listener.stopped
        expected = before + len(text.split())
        started = time.monotonic()
        timed_out = False
        await run.send(TTSSpeakFrame(text))
        try:
            await run.wait_until(lambda: len(run.heard) >= expected and run.listener.stopped > stopped, 10.0)
        except TimeoutError:
            timed_out = True
        emit(
            event="spoke",
            pipeline=self.pipeline,
            tag=tag,
            heard=run.heard[before:],
            seconds=time.monotonic() - started,
            at=time.monotonic(),
            provider=self.tts.provider_name,
            timed_out=timed_out,
        )

    def report(self) -> dict[str, Any]:
        return {
            "voice": self.voice,
            "heard": self.run.heard,
            "context": self.run.context_words,
            "errors": [str(error.error) for error in self.run.errors],
            "provider": self.tts.provider_name,
        }


async def main(config: dict[str, Any]) -> None:
    """Run the worker.

    CONFIG keys: ``worker`` (its number), ``pipelines`` (how many), ``redis``
    (URL), ``prefix`` (the store's key prefix), ``policy`` (BreakerPolicy
    keywords), ``store`` (more RedisHealthStore keywords), ``primary`` and
    ``backup`` (the emulators' base URLs), ``spc`` (samples per character of
    the speech code).
    """
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    store_warnings: list[str] = []
    logger.add(
        lambda message: store_warnings.append(message.record["message"]),
        level="WARNING",
        filter=lambda record: record["name"] == "pipecat_resilient.redis_health",
    )

    def changed(provider: str, old: Health, new: Health) -> None:
        emit(event="health", provider=provider, old=old.value, new=new.value, at=time.monotonic())

    store = RedisHealthStore(
        config["redis"],
        policy=BreakerPolicy(**config["policy"]),
        prefix=config["prefix"],
        on_change=changed,
        **config.get("store", {}),
    )
    bots = [Bot(config, store, pipeline) for pipeline in range(config["pipelines"])]
    for bot in bots:
        await bot.run.start()
    emit(event="ready", voices=[bot.voice for bot in bots])

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        command = json.loads(line)
        kind = command["cmd"]
        if kind == "speak":
            task = asyncio.create_task(bots[command["pipeline"]].speak(command["text"], command["tag"]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif kind == "wait_local":
            deadline = time.monotonic() + command["timeout"]
            # The pipelines' own health polls (every HEALTH_POLL_S while idle) reach the store.
            while store.is_shared and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            emit(event="local", shared=store.is_shared)
        elif kind == "report":
            emit(event="report", pipelines=[bot.report() for bot in bots], warnings=store_warnings)
        elif kind == "quit":
            break
    if tasks:
        await asyncio.wait(tasks, timeout=10.0)
    for bot in bots:
        try:
            await bot.run.end(timeout=5.0)
        except Exception:
            await bot.run.cancel()
    await store.aclose()
    emit(event="bye")


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
