"""A fleet sharing provider health through Redis: 8 real pipelines in 4 processes.

The test process runs redis-server, the ElevenLabs emulator (the primary) and
the Cartesia emulator (the fallback); each of 4 worker processes
(``tests/fleet_worker.py``) runs 2 Pipecat pipelines whose ResilientTTS speaks
ElevenLabs, falls back on Cartesia and keeps provider health in one
RedisHealthStore on the shared server. The workers are driven, and report, by
JSON lines on their stdin and stdout; every wait is on a condition with a
timeout. What a pipeline heard is decoded from the audio at its end.

The issue's requirement: "8 pipelines in 4 processes; one discovers the
outage, all others skip the dead provider from their next utterance; exactly
one half-open probe fleet-wide; killing redis-server mid-run loses no word and
blocks nothing."
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipecat_resilient.testing import Fault, FaultPlan
from pipecat_resilient.testing.kits import tts_kit

from .test_redis_health import REDIS_SERVER, REPO, RedisServer, redis

needs_server = pytest.mark.skipif(REDIS_SERVER is None, reason="the redis-server binary is not installed")

ELEVENLABS = tts_kit("elevenlabs")
CARTESIA = tts_kit("cartesia")
PRIMARY, BACKUP = "ElevenLabsTTSService", "CartesiaTTSService"

WORKERS, PIPELINES = 4, 2
SAMPLE_RATE = 24000
# Two failures open the primary's breaker (a dropped socket alone is not an
# outage; the refused reconnect after it is). The cooldown never ends by
# itself during a test: the probe test ends it when it brings the primary back.
POLICY = {"failures": 2, "window": 30.0, "cooldown": 60.0, "cooldown_max": 60.0, "probe_timeout": 5.0}
# Longest an utterance (a sentence of about 50 characters) may take, from the
# command to its last word heard, with 9 processes on two busy cores.
UTTERANCE_BOUND = 3.0
# The pipelines look at the store every HEALTH_POLL_S (1 s) while idle, on a
# watchdog tick of 0.3 s: the fleet must have moved within one look, plus slack.
LOOK_BOUND = 1.3 + 2.0
# How long the relay holds the probe's connection back: longer than a look, so
# every other bot looks at the half-open breaker while the probe is under way.
PROBE_HOLD = 1.5


def text(voice: str, n: int) -> str:
    """Utterance ``n`` of the bot with ``voice``: unique, one sentence."""
    return f"Bot {voice} now says sentence {'abcdefgh'[n]} to its caller today."


def words(*texts: str) -> list[str]:
    return " ".join(texts).split()


class Fleet:
    """Worker processes, the events they report, and waits on them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: list[asyncio.subprocess.Process] = []
        self.events: list[dict[str, Any]] = []
        self.voices: dict[str, tuple[int, int]] = {}  # voice -> (worker, pipeline)
        self._changed = asyncio.Condition()
        self._readers: list[asyncio.Task[None]] = []
        self._quitting = False

    async def start(
        self,
        redis_url: str,
        prefix: str,
        primary: Any,
        backup: Any,
        *,
        primary_url: str | None = None,
        **store: Any,
    ) -> None:
        """Start the workers at once, and wait until every pipeline runs.

        ``primary_url`` is where the bots reach the primary (a relay in front of it); its own URL when None.
        """
        for worker in range(WORKERS):
            config = {
                "worker": worker,
                "pipelines": PIPELINES,
                "redis": redis_url,
                "prefix": prefix,
                "policy": POLICY,
                "store": store,
                "primary": primary_url or primary.url,
                "backup": backup.url,
                "spc": primary.samples_per_char(SAMPLE_RATE),
            }
            log = (self.directory / f"worker{worker}.log").open("wb")
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.fleet_worker",
                json.dumps(config),
                cwd=REPO,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
            log.close()
            self.processes.append(process)
            self._readers.append(asyncio.create_task(self._read(worker, process)))
        await self.wait(lambda: len(self.of("ready")) == WORKERS, 60.0)
        for event in self.of("ready"):
            for pipeline, voice in enumerate(event["voices"]):
                self.voices[voice] = (event["worker"], pipeline)

    async def _read(self, worker: int, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["worker"] = worker
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        code = await process.wait()
        async with self._changed:
            self.events.append({"event": "exit", "worker": worker, "code": code})
            self._changed.notify_all()

    def of(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        """The events of one kind whose fields have the values given."""
        return [e for e in self.events if e["event"] == kind and all(e.get(k) == v for k, v in match.items())]

    def _crashed(self) -> bool:
        return not self._quitting and bool(self.of("exit"))

    def logs(self) -> str:
        return "\n".join(
            f"--- worker {n} ---\n" + (self.directory / f"worker{n}.log").read_text()[-3000:]
            for n in range(len(self.processes))
        )

    async def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds (checked on every event); fail if a worker died."""
        try:
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: predicate() or self._crashed()), timeout
                )
        except TimeoutError:
            raise AssertionError(f"fleet condition not reached in {timeout} s\n{self.logs()}") from None
        assert not self._crashed(), f"a worker exited\n{self.logs()}"

    async def send(self, worker: int, **command: Any) -> None:
        stdin = self.processes[worker].stdin
        assert stdin is not None
        stdin.write((json.dumps(command) + "\n").encode())
        await stdin.drain()

    async def speak(self, voice: str, utterance: str, tag: str) -> dict[str, Any]:
        """Have the bot with ``voice`` say ``utterance``; its ``spoke`` event."""
        worker, pipeline = self.voices[voice]
        await self.send(worker, cmd="speak", pipeline=pipeline, text=utterance, tag=tag)
        await self.wait(lambda: bool(self.of("spoke", worker=worker, pipeline=pipeline, tag=tag)), 20.0)
        [spoke] = self.of("spoke", worker=worker, pipeline=pipeline, tag=tag)
        return spoke

    async def ask(self, kind: str, reply: str, **command: Any) -> list[dict[str, Any]]:
        """Send a command to every worker; their replies, by worker."""
        seen = len(self.of(reply))
        for worker in range(len(self.processes)):
            await self.send(worker, cmd=kind, **command)
        await self.wait(lambda: len(self.of(reply)) == seen + len(self.processes), 20.0)
        return sorted(self.of(reply)[seen:], key=lambda e: e["worker"])

    async def stop(self) -> None:
        """Quit every worker (ending its pipelines), killing one that does not exit in time."""
        self._quitting = True
        for worker, process in enumerate(self.processes):
            if process.returncode is None:
                with contextlib.suppress(Exception):
                    await self.send(worker, cmd="quit")
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 20.0)
            except TimeoutError:
                process.kill()
                await process.wait()
        for reader in self._readers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, 5.0)


class SlowDoor:
    """A TCP relay in front of an emulator that can hold a connection back a while before passing it on
    (a provider's edge slow to take a handshake). Bytes and drops go through as they are."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.holds: list[float] = []  # hold the next connections this long, in order
        self.held = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> SlowDoor:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_writer: asyncio.StreamWriter | None = None
        try:
            if self.holds:
                # The provider's latency, not a synchronization.
                await asyncio.sleep(self.holds.pop(0))
                self.held += 1
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target.port)
            pipes = {
                asyncio.create_task(_pipe(reader, up_writer)),
                asyncio.create_task(_pipe(up_reader, writer)),
            }
            try:
                # When one side ends (closed, or dropped), the connection is over.
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
        except OSError:
            pass
        finally:
            writer.transport.abort()
            if up_writer is not None:
                up_writer.transport.abort()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until the end of the stream (or an error)."""
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (one test kills it)."""
    if REDIS_SERVER is None:
        pytest.skip("the redis-server binary is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def voice_of(kit: Any, record: Any) -> str:
    """The voice (so the bot) a connection record belongs to."""
    return str(kit.voice(record))


def said_on(emulator: Any, kit: Any, voice: str) -> list[str]:
    """Every text the bot with ``voice`` sent to ``emulator``."""
    return [t.strip() for c in emulator.connections if voice_of(kit, c) == voice for _, t in c.texts]


def end_cooldown(server: RedisServer, prefix: str, provider: str) -> None:
    """Let the cooldown of ``provider``'s breaker end now (as if it had run out), by Redis's clock."""
    client = redis.Redis(port=server.port, decode_responses=True)
    try:
        key = f"{prefix}{{{provider}}}"
        seconds, micros = client.time()
        now_ms = seconds * 1000 + micros // 1000
        assert int(client.hget(key, "opened_until")) > now_ms  # open until now
        client.hset(key, "opened_until", str(now_ms))
    finally:
        client.close()


@needs_server
async def test_one_bot_finds_the_outage_the_fleet_skips_it_and_one_probe_brings_it_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """One bot's dropped socket and refused reconnect open the primary's breaker in Redis; the 7 others
    move to the fallback before their next utterance and speak it there without a handshake to the
    primary; back up, the primary is probed by exactly one bot of the fleet, then all go back to it.
    Every bot hears every word of every utterance, and its LLM context gets exactly those words."""
    prefix = f"fleet:{uuid.uuid4().hex[:8]}:"
    # The bot that opened the first connection finds the outage: its socket is
    # dropped as its second utterance reaches the primary, before any audio.
    drop = FaultPlan(Fault.abort(after_text_messages=2, connection=0))
    async with (
        ELEVENLABS.emulator(drop) as primary,
        CARTESIA.emulator(timestamps="after") as backup,
        SlowDoor(primary) as door,
    ):
        fleet = Fleet(tmp_path)
        try:
            await fleet.start(redis_server.url, prefix, primary, backup, primary_url=door.url, timeout=2.0)
            await primary.wait_for_connections(WORKERS * PIPELINES)
            everyone = sorted(fleet.voices)
            assert len(everyone) == WORKERS * PIPELINES

            # 1. Every bot speaks on the primary.
            spoken = await asyncio.gather(*(fleet.speak(v, text(v, 1), "u1") for v in everyone))
            assert [s["heard"] for s in spoken] == [words(text(v, 1)) for v in everyone]
            assert {s["provider"] for s in spoken} == {PRIMARY}
            assert len(primary.connections) == WORKERS * PIPELINES and not backup.connections
            # Each utterance is one text message (the fault below counts them).
            assert all(len(c.texts) == 1 for c in primary.connections)

            # 2. The primary goes down: new handshakes are refused, open sockets
            # stay up (and would still work). The bot of the first connection
            # speaks: its socket is dropped, its reconnect refused, and it says
            # the whole utterance on Cartesia.
            primary.outage("refuse", status=503, drop_existing=False)
            first = primary.connections[0]
            discoverer = voice_of(ELEVENLABS, first)
            assert discoverer in everyone
            others = [v for v in everyone if v != discoverer]
            spoke = await fleet.speak(discoverer, text(discoverer, 2), "u2")
            assert spoke["heard"] == words(text(discoverer, 2)) and spoke["provider"] == BACKUP
            assert first.fault is not None and first.fault.kind.value == "abort"
            await fleet.wait(lambda: bool(fleet.of("health", provider=PRIMARY, new="open")), 10.0)
            [opened] = fleet.of("health", provider=PRIMARY, new="open")
            assert opened["worker"] == fleet.voices[discoverer][0] and opened["old"] == "closed"
            # One handshake was refused, the discoverer's; no other bot tried.
            refused = [voice_of(ELEVENLABS, c) for c in primary.connections if c.refused]
            assert refused == [discoverer]

            # 3. The 7 others leave the primary on their own, at their next look at the store.
            def moved(voice: str) -> list[dict[str, Any]]:
                worker, pipeline = fleet.voices[voice]
                return fleet.of("switched", worker=worker, pipeline=pipeline, old=PRIMARY, new=BACKUP)

            await fleet.wait(lambda: all(moved(v) for v in others), 10.0)
            skip_delay = max(moved(v)[0]["at"] for v in others) - opened["at"]
            assert all("health store" in moved(v)[0]["reason"] for v in others)
            assert skip_delay < LOOK_BOUND
            handshakes = len(primary.connections)
            spoken = await asyncio.gather(*(fleet.speak(v, text(v, 2), "u2") for v in others))
            assert [s["heard"] for s in spoken] == [words(text(v, 2)) for v in others]
            assert {s["provider"] for s in spoken} == {BACKUP}
            assert len(primary.connections) == handshakes  # not one handshake to the dead primary
            for voice in others:
                assert text(voice, 2) in said_on(backup, CARTESIA, voice)
                assert text(voice, 2) not in said_on(primary, ELEVENLABS, voice)

            # 4. The primary is back, and its cooldown ends: exactly one bot of
            # the fleet gets the probe lease and connects (the probe: its
            # handshake held back a while, during which the others look at the
            # half-open breaker and are refused the lease); the others go back
            # once the store says closed.
            primary.restore()
            door.holds.append(PROBE_HOLD)
            before = len(primary.connections)
            cooldown_ended = time.monotonic()
            end_cooldown(redis_server, prefix, PRIMARY)

            def back(voice: str) -> list[dict[str, Any]]:
                worker, pipeline = fleet.voices[voice]
                return fleet.of("switched", worker=worker, pipeline=pipeline, old=BACKUP, new=PRIMARY)

            await fleet.wait(lambda: all(back(v) for v in everyone), 3 * LOOK_BOUND)
            all_back = max(back(v)[0]["at"] for v in everyone) - cooldown_ended
            leases = fleet.of("probe", provider=PRIMARY, granted=True)
            assert len(leases) == 1, f"probe leases granted fleet-wide: {leases}"
            [granted] = leases
            winner = next(
                v for v, where in fleet.voices.items() if where == (granted["worker"], granted["pipeline"])
            )
            assert door.held == 1
            refused_leases = fleet.of("probe", provider=PRIMARY, granted=False)
            denied = len(refused_leases)
            assert denied >= 1  # others did ask while the probe was under way
            [closed] = fleet.of("health", provider=PRIMARY, new="closed")
            assert closed["old"] == "half_open" and closed["worker"] == granted["worker"]
            handshakes_back = [voice_of(ELEVENLABS, c) for c in primary.connections[before:]]
            assert handshakes_back[0] == winner  # the probe came first...
            assert sorted(handshakes_back) == everyone  # ...and each bot connected once to go back
            assert not any(c.refused for c in primary.connections[before:])
            assert back(winner)[0]["seen"] == "half_open"
            assert {back(v)[0]["seen"] for v in everyone if v != winner} == {"closed"}

            # 5. Every bot speaks its next utterance on the primary.
            spoken = await asyncio.gather(*(fleet.speak(v, text(v, 3), "u3") for v in everyone))
            assert [s["heard"] for s in spoken] == [words(text(v, 3)) for v in everyone]
            assert {s["provider"] for s in spoken} == {PRIMARY}
            for voice in everyone:
                assert text(voice, 3) in said_on(primary, ELEVENLABS, voice)

            reports = await fleet.ask("report", "report")
            bots = {p["voice"]: p for r in reports for p in r["pipelines"]}
            for voice in everyone:
                assert bots[voice]["heard"] == words(*(text(voice, n) for n in (1, 2, 3)))
                assert bots[voice]["context"] == bots[voice]["heard"]
                assert bots[voice]["errors"] == []
            print(
                f"\nfleet skipped the dead primary {skip_delay:.2f} s after the breaker opened; "
                f"probe leases: 1 granted, {denied} refused; all 8 back on the primary "
                f"{all_back:.2f} s after the cooldown ended"
            )
        finally:
            await fleet.stop()


@needs_server
async def test_killing_redis_mid_run_loses_no_word_and_blocks_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """redis-server is SIGKILLed while the 8 bots speak, and the primary goes down too, one bot's socket
    dropping mid-utterance: every bot hears every word, no utterance takes longer than a bound, each
    process's store warns once that Redis is unreachable and goes on with the process's own view
    (so the dropped bot's process-mate leaves the primary, and the other processes do not know)."""
    prefix = f"fleet:{uuid.uuid4().hex[:8]}:"
    async with ELEVENLABS.emulator() as primary, CARTESIA.emulator(timestamps="after") as backup:
        fleet = Fleet(tmp_path)
        try:
            await fleet.start(redis_server.url, prefix, primary, backup, timeout=0.2, retry_interval=0.5)
            await primary.wait_for_connections(WORKERS * PIPELINES)
            everyone = sorted(fleet.voices)
            killed_at: list[float] = []

            async def talk(voice: str, numbers: range, tag: str) -> None:
                for n in numbers:
                    await fleet.speak(voice, text(voice, n), f"{tag}{n}")

            async def kill_when_under_way() -> None:
                # Mid-run: once 8 of the first round's 24 utterances were heard.
                await fleet.wait(lambda: len(fleet.of("spoke")) >= len(everyone), 30.0)
                redis_server.kill()
                killed_at.append(time.monotonic())
                # And the primary goes down while Redis is gone: new handshakes
                # refused, open sockets kept. The newest open socket to it drops
                # three audio messages into its next utterance: that bot's
                # reconnect is refused and it finishes on Cartesia, recording
                # both failures where Redis no longer answers.
                primary.outage("refuse", status=503, drop_existing=False)
                primary.arm(Fault.abort(after_audio_chunks=3))

            await asyncio.gather(kill_when_under_way(), *(talk(v, range(1, 4), "a") for v in everyone))
            # A second round, so the armed drop surely meets an utterance.
            await asyncio.gather(*(talk(v, range(4, 6), "b") for v in everyone))
            dropped = [c for c in primary.connections if c.fault is not None]
            assert len(dropped) == 1 and dropped[0].audio_chunks >= 3
            unlucky = voice_of(ELEVENLABS, dropped[0])
            assert unlucky in everyone
            worker, pipeline = fleet.voices[unlucky]
            mate = 1 - pipeline  # the other bot of the same process
            # The process's own view opened the primary's breaker: the other bot
            # of that process leaves the primary at its next look; the other
            # processes, which have not seen the failures, keep it (their open
            # sockets still work). A store that just failed without Redis would
            # leave the mate on the primary.
            await fleet.wait(
                lambda: bool(fleet.of("switched", worker=worker, pipeline=mate, new=BACKUP)), 10.0
            )
            switched = fleet.of("switched")
            assert sorted((e["worker"], e["pipeline"], e["new"]) for e in switched) == sorted(
                [(worker, pipeline, BACKUP), (worker, mate, BACKUP)]
            )
            assert "health store" in fleet.of("switched", worker=worker, pipeline=mate)[0]["reason"]
            refused = [voice_of(ELEVENLABS, c) for c in primary.connections if c.refused]
            assert refused == [unlucky]  # the mate moved without a handshake

            local = await fleet.ask("wait_local", "local", timeout=10.0)
            assert [r["shared"] for r in local] == [False] * WORKERS
            spoke = fleet.of("spoke")
            assert len(spoke) == 5 * len(everyone)
            assert not any(s["timed_out"] for s in spoke)
            reports = await fleet.ask("report", "report")
            bots = {p["voice"]: p for r in reports for p in r["pipelines"]}
            for voice in everyone:
                assert bots[voice]["heard"] == words(*(text(voice, n) for n in range(1, 6)))
                assert bots[voice]["context"] == bots[voice]["heard"]
                assert bots[voice]["errors"] == []
            for report in reports:
                [warning] = report["warnings"]
                assert "unreachable" in warning
            before = [s["seconds"] for s in spoke if s["at"] < killed_at[0]]
            after = [s["seconds"] for s in spoke if s["at"] >= killed_at[0]]
            assert before and after
            assert max(after) < UTTERANCE_BOUND
            print(
                f"\nRedis killed after {len(before)} utterances: with Redis up they took "
                f"{min(before):.3f}-{max(before):.3f} s, after the kill {min(after):.3f}-{max(after):.3f} s "
                f"({len(after)} utterances); one warning per process; the mate left the primary "
                f"{fleet.of('switched', worker=worker, pipeline=mate)[0]['at'] - killed_at[0]:.2f} s "
                "after the kill"
            )
        finally:
            await fleet.stop()
