"""RedisHealthStore against a real redis-server: shared trips, one probe fleet-wide, Redis outages."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from pipecat_resilient.health import BreakerPolicy, Health, HealthStore
from pipecat_resilient.redis_health import RedisHealthStore

redis = pytest.importorskip("redis", reason="redis-py is not installed")

REDIS_SERVER = shutil.which("redis-server") or shutil.which("/usr/bin/redis-server")
needs_server = pytest.mark.skipif(REDIS_SERVER is None, reason="the redis-server binary is not installed")

REPO = Path(__file__).resolve().parent.parent
CLOSED, OPEN, HALF_OPEN = Health.CLOSED, Health.OPEN, Health.HALF_OPEN

# Tenths of a second, so the file runs in seconds; the cooldown ends by real (server) time.
FAST = BreakerPolicy(failures=3, window=5.0, cooldown=0.2, cooldown_max=0.5, probe_timeout=0.2)
TIMEOUT = 0.2  # the store's Redis timeout, in seconds
SLACK = 0.1  # scheduling slack allowed on top of it


class RedisServer:
    """A throwaway redis-server on a free port, without persistence."""

    def __init__(self, directory: Path, *, password: str | None = None) -> None:
        self.directory = directory
        self.password = password
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
            + ["--save", "", "--appendonly", "no", "--loglevel", "warning"]
            + (["--requirepass", self.password] if self.password else []),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, password=self.password, socket_timeout=1.0)
        deadline = time.monotonic() + 10.0
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                    time.sleep(0.01)
        finally:
            client.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if self.paused:
            self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the module; tests keep apart by key prefix."""
    if REDIS_SERVER is None:
        pytest.skip("the redis-server binary is not installed")
    instance = RedisServer(tmp_path_factory.mktemp("redis"))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that kill or freeze it."""
    if REDIS_SERVER is None:
        pytest.skip("the redis-server binary is not installed")
    instance = RedisServer(tmp_path)
    instance.start()
    yield instance
    instance.stop()


StoreFactory = Callable[..., RedisHealthStore]


@pytest.fixture
async def stores() -> AsyncIterator[StoreFactory]:
    """Make stores sharing one fresh key prefix; all are closed at the end."""
    made: list[RedisHealthStore] = []
    prefix = f"test:{uuid.uuid4().hex[:8]}:"

    def make(url: str, **kwargs: Any) -> RedisHealthStore:
        kwargs.setdefault("policy", FAST)
        kwargs.setdefault("prefix", prefix)
        kwargs.setdefault("timeout", TIMEOUT)
        store = RedisHealthStore(url, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


@pytest.fixture
def logs() -> Iterator[list[tuple[str, str]]]:
    """(level, message) of everything logged at INFO or above while the test runs."""
    records: list[tuple[str, str]] = []
    sink = logger.add(lambda m: records.append((m.record["level"].name, m.record["message"])), level="INFO")
    yield records
    logger.remove(sink)


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll ``condition`` every 10 ms until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def raw(server: RedisServer) -> Any:
    """A plain synchronous client, to look at the keys."""
    return redis.Redis(port=server.port, decode_responses=True)


def warnings(logs: list[tuple[str, str]]) -> list[str]:
    return [message for level, message in logs if level == "WARNING"]


# Sharing


@needs_server
async def test_two_stores_share_a_trip(server: RedisServer, stores: StoreFactory) -> None:
    """What one client records, another client reads; the change is reported once, by the one that made it."""
    seen_a: list[tuple[str, Health, Health]] = []
    seen_b: list[tuple[str, Health, Health]] = []
    a = stores(server.url, on_change=lambda *c: seen_a.append(c))
    b = stores(server.url, on_change=lambda *c: seen_b.append(c))
    assert await a.record_failure("tts") is CLOSED
    assert await b.record_failure("tts") is CLOSED
    assert await a.record_failure("tts") is OPEN  # failures from both clients add up
    assert await b.state("tts") is OPEN
    assert await b.state("llm") is CLOSED
    assert await b.record_failure("tts") is OPEN
    assert await b.record_success("tts") is OPEN  # a late success does not cut the cooldown
    assert seen_a == [("tts", CLOSED, OPEN)]
    assert seen_b == []
    assert a.is_shared and b.is_shared


@needs_server
async def test_permanent_failure_opens_for_everyone(server: RedisServer, stores: StoreFactory) -> None:
    """One bad-key failure in one process opens the provider for all."""
    a, b = stores(server.url), stores(server.url)
    assert await a.record_failure("tts", permanent=True) is OPEN
    assert await b.state("tts") is OPEN


@needs_server
async def test_success_resets_the_shared_count(server: RedisServer, stores: StoreFactory) -> None:
    """A success anywhere clears the failures counted so far."""
    a, b = stores(server.url), stores(server.url)
    await a.record_failure("tts")
    await a.record_failure("tts")
    assert await b.record_success("tts") is CLOSED
    assert await a.record_failure("tts") is CLOSED
    assert await a.record_failure("tts") is CLOSED
    assert await a.record_failure("tts") is OPEN


@needs_server
async def test_failures_outside_the_window_do_not_trip(server: RedisServer, stores: StoreFactory) -> None:
    """Only failures within the window count, measured on the server's clock."""
    store = stores(server.url, policy=BreakerPolicy(failures=3, window=0.15, cooldown=0.2, cooldown_max=0.5))
    await store.record_failure("tts")
    await store.record_failure("tts")
    await asyncio.sleep(0.2)
    assert await store.record_failure("tts") is CLOSED
    assert raw(server).zcard(f"{store._key('tts')}:failures") == 1


# Cooldown, probe, backoff


@needs_server
async def test_one_probe_after_the_cooldown_then_close(server: RedisServer, stores: StoreFactory) -> None:
    """After the cooldown one client of many gets the probe; its success closes the provider for all."""
    clients = [stores(server.url) for _ in range(5)]
    await clients[0].record_failure("tts", permanent=True)
    await wait_until(lambda: _is(clients[1].state("tts"), HALF_OPEN))
    granted = await asyncio.gather(*(c.try_acquire_probe("tts") for c in clients))
    assert granted.count(True) == 1
    winner = clients[granted.index(True)]
    assert not await winner.try_acquire_probe("tts")  # not even the holder twice
    assert await winner.record_success("tts") is CLOSED
    assert {await c.state("tts") for c in clients} == {CLOSED}
    assert raw(server).hget(winner._key("tts"), "trips") == "1"


@needs_server
async def test_probe_lease_expires(server: RedisServer, stores: StoreFactory) -> None:
    """A probe that never reports frees the lease after probe_timeout (0.2 s), for one other caller."""
    a, b = stores(server.url), stores(server.url)
    await a.record_failure("tts", permanent=True)
    await wait_until(lambda: _is(a.state("tts"), HALF_OPEN))
    assert await a.try_acquire_probe("tts")
    assert not await b.try_acquire_probe("tts")
    started = time.monotonic()
    await wait_until(lambda: b.try_acquire_probe("tts"))
    assert 0.1 <= time.monotonic() - started < 0.2 + 5 * SLACK


@needs_server
async def test_failed_probe_doubles_the_cooldown(server: RedisServer, stores: StoreFactory) -> None:
    """0.2 s, then 0.4 s after a failed probe, then the 0.5 s cap; time counted by the server."""
    store = stores(server.url)
    client = raw(server)
    await store.record_failure("tts", permanent=True)
    remaining = []
    for _ in range(3):
        remaining.append(_remaining_ms(client, store._key("tts")))
        await wait_until(lambda: _is(store.state("tts"), HALF_OPEN))
        assert await store.try_acquire_probe("tts")
        assert await store.record_failure("tts") is OPEN
    remaining.append(_remaining_ms(client, store._key("tts")))
    assert [round(ms, -2) for ms in remaining] == [200, 400, 500, 500]
    assert client.hget(store._key("tts"), "failed_probes") == "3"


@needs_server
async def test_server_time_decides_not_the_client_clock(server: RedisServer, stores: StoreFactory) -> None:
    """Stores whose clocks are frozen or a day apart agree on when the cooldown ends."""
    frozen = stores(server.url, clock=lambda: 0.0)
    ahead = stores(server.url, clock=lambda: time.monotonic() + 86_400.0)
    await frozen.record_failure("tts", permanent=True)
    assert await ahead.state("tts") is OPEN
    await wait_until(lambda: _is(frozen.state("tts"), HALF_OPEN))
    assert await ahead.state("tts") is HALF_OPEN


@needs_server
async def test_key_layout(server: RedisServer, stores: StoreFactory) -> None:
    """One hash, one expiring failure set and one lease key per provider, under one hash tag."""
    store = stores(server.url)
    client = raw(server)
    key = store._key("tts")
    assert key.endswith("{tts}")
    await store.record_failure("tts")
    await store.record_failure("tts")
    assert client.zcard(f"{key}:failures") == 2
    assert 0 < client.pttl(f"{key}:failures") <= 5000
    await store.record_failure("tts")
    assert not client.exists(f"{key}:failures")  # the trip clears the count
    fields = client.hgetall(key)
    assert fields["trips"] == "1" and fields["failed_probes"] == "0"
    await wait_until(lambda: store.try_acquire_probe("tts"))
    assert client.get(f"{key}:probe").startswith(f"{os.getpid()}:")
    assert 0 < client.pttl(f"{key}:probe") <= 200
    await store.record_success("tts")
    assert "opened_until" not in client.hgetall(key)
    assert not client.exists(f"{key}:probe")
    assert sorted(client.keys(f"{store._prefix}*")) == [key]


# A fleet: separate OS processes

WORKER = """
import asyncio, json, sys

import redis.asyncio as aioredis

from pipecat_resilient.health import BreakerPolicy, Health
from pipecat_resilient.redis_health import RedisHealthStore


async def main(url: str, prefix: str, failures: int) -> None:
    policy = BreakerPolicy(failures=3, window=5.0, cooldown=0.3, cooldown_max=0.6, probe_timeout=5.0)
    changes = []
    store = RedisHealthStore(
        url, policy=policy, prefix=prefix, timeout=2.0,
        on_change=lambda provider, old, new: changes.append([old.value, new.value]),
    )
    control = aioredis.from_url(url)

    async def barrier(name: str) -> None:
        await control.incr(f"{prefix}{name}:ready")
        assert await control.blpop([f"{prefix}{name}:go"], timeout=30)

    await barrier("hammer")
    results = [(await store.record_failure("tts")).value for _ in range(failures)]
    while await store.state("tts") is not Health.HALF_OPEN:
        await asyncio.sleep(0.01)
    await barrier("probe")
    probe = await store.try_acquire_probe("tts")
    print(json.dumps({"changes": changes, "results": results, "probe": probe, "shared": store.is_shared}))
    await store.aclose()
    await control.aclose()


asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def _release(client: Any, prefix: str, name: str, processes: list[subprocess.Popen[str]]) -> None:
    """Wait until every process reached barrier ``name``, then let them all go at once."""
    deadline = time.monotonic() + 30.0
    while int(client.get(f"{prefix}{name}:ready") or 0) < len(processes):
        for process in processes:
            assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"workers did not reach {name}"
        time.sleep(0.01)
    client.rpush(f"{prefix}{name}:go", *["go"] * len(processes))


@needs_server
def test_four_processes_trip_once_and_probe_once(server: RedisServer, tmp_path: Path) -> None:
    """Four processes record 25 failures each at once: one trip, two CLOSED answers in all, one probe."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    prefix = f"fleet:{uuid.uuid4().hex[:8]}:"
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), server.url, prefix, "25"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    client = raw(server)
    try:
        _release(client, prefix, "hammer", processes)
        _release(client, prefix, "probe", processes)
        outputs = [process.communicate(timeout=30) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [process.returncode for process in processes] == [0] * 4, [err for _, err in outputs]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert all(report["shared"] for report in reports)
    results = [result for report in reports for result in report["results"]]
    assert len(results) == 100
    assert results.count("closed") == 2  # the 3rd failure fleet-wide tripped; every later one saw OPEN
    trips = [change for report in reports for change in report["changes"] if change == ["closed", "open"]]
    assert len(trips) == 1
    assert client.hget(f"{prefix}{{tts}}", "trips") == "1"
    assert [report["probe"] for report in reports].count(True) == 1


# Redis itself failing


@needs_server
async def test_redis_killed_then_restarted(
    own_server: RedisServer, stores: StoreFactory, logs: list[tuple[str, str]]
) -> None:
    """Redis killed: calls answer at once from this process's own view, one warning; back: shared again."""
    store = stores(own_server.url, retry_interval=0.05)
    for _ in range(3):
        await store.record_failure("tts")
    assert await store.state("tts") is OPEN and store.is_shared

    own_server.kill()
    elapsed = []
    answers = []
    for _ in range(10):
        for call in (store.state("tts"), store.record_failure("llm"), store.try_acquire_probe("stt")):
            started = time.monotonic()
            answers.append(await call)
            elapsed.append(time.monotonic() - started)
        await asyncio.sleep(0.02)  # several retries of Redis fall in this loop
    assert max(elapsed) < TIMEOUT + SLACK
    assert not store.is_shared
    assert answers[0] is OPEN  # the trip recorded through Redis is known locally too
    assert answers[1::3][:3] == [CLOSED, CLOSED, OPEN]  # the local breaker counts on its own
    assert len(warnings(logs)) == 1
    assert "unreachable" in warnings(logs)[0]

    own_server.start()  # empty: no persistence
    await wait_until(lambda: _is(store.state("llm"), CLOSED))  # Redis's view again, not the local OPEN
    assert store.is_shared
    assert [m for level, m in logs if level == "INFO" and "reachable again" in m]
    other = stores(own_server.url)
    await store.record_failure("llm", permanent=True)
    assert await other.state("llm") is OPEN
    assert len(warnings(logs)) == 1


@needs_server
async def test_frozen_redis_costs_at_most_the_timeout(
    own_server: RedisServer, stores: StoreFactory, logs: list[tuple[str, str]]
) -> None:
    """Redis stopped (SIGSTOP: connections hang): no call waits past the timeout; resumed: shared again."""
    store = stores(own_server.url, retry_interval=0.15, policy=BreakerPolicy(cooldown=10.0))
    await store.record_failure("tts", permanent=True)
    own_server.pause()
    elapsed = []
    for _ in range(12):
        started = time.monotonic()
        assert await store.state("tts") is OPEN
        elapsed.append(time.monotonic() - started)
        await asyncio.sleep(0.03)
    assert max(elapsed) < TIMEOUT + SLACK
    assert max(elapsed) >= TIMEOUT * 0.9  # it did wait on Redis, then gave up
    assert sum(e >= TIMEOUT * 0.9 for e in elapsed) < len(elapsed) / 2  # retry_interval skips most
    assert len(warnings(logs)) == 1
    own_server.resume()
    await wait_until(lambda: _shared_after(store))
    assert await store.state("tts") is OPEN


@needs_server
async def test_unreachable_url_falls_back_at_once(stores: StoreFactory, logs: list[tuple[str, str]]) -> None:
    """Nothing listening: the store works locally from the first call, warns once, and hides the password."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = stores(f"redis://user:hunter2@127.0.0.1:{port}/0?password=hunter2")
    started = time.monotonic()
    for _ in range(3):
        await store.record_failure("tts")
    assert await store.state("tts") is OPEN
    assert time.monotonic() - started < TIMEOUT + SLACK
    assert len(warnings(logs)) == 1
    assert f"127.0.0.1:{port}" in warnings(logs)[0]
    assert "hunter2" not in " ".join(m for _, m in logs) + repr(store)


@needs_server
async def test_error_replies_fall_back_without_the_password(
    tmp_path: Path, stores: StoreFactory, logs: list[tuple[str, str]]
) -> None:
    """An error answer (a wrong password) is handled like an outage, and no password reaches the log."""
    locked = RedisServer(tmp_path, password="s3cret")
    locked.start()
    try:
        wrong = stores(f"redis://:hunter2@127.0.0.1:{locked.port}/0")
        assert await wrong.record_failure("tts", permanent=True) is OPEN
        assert not wrong.is_shared
        assert len(warnings(logs)) == 1
        right = stores(f"redis://:s3cret@127.0.0.1:{locked.port}/0")
        assert await right.record_failure("tts", permanent=True) is OPEN
        assert right.is_shared
        assert not any(secret in message for _, message in logs for secret in ("hunter2", "s3cret"))
    finally:
        locked.stop()


def test_redis_store_is_a_health_store() -> None:
    """RedisHealthStore satisfies the HealthStore protocol (checked by mypy); making one sends nothing."""
    store: HealthStore = RedisHealthStore("redis://:secret@localhost:1/0")
    assert "secret" not in repr(store)


def test_timeout_must_be_positive() -> None:
    """The store validates its own numbers like a policy."""
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        RedisHealthStore("redis://localhost", timeout=0)
    with pytest.raises(ValueError, match="retry_interval must be a positive number of seconds"):
        RedisHealthStore("redis://localhost", retry_interval=-1)


def test_package_imports_without_redis() -> None:
    """Without redis-py the package and this module import; only making a store needs it."""
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import pipecat_resilient, pipecat_resilient.health, pipecat_resilient.redis_health as m\n"
        "try:\n    m.RedisHealthStore('redis://localhost')\n"
        "except ImportError:\n    print('import error as expected')\n"
    )
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "import error as expected" in result.stdout


async def _is(state: Awaitable[Health], expected: Health) -> bool:
    return await state is expected


async def _shared_after(store: RedisHealthStore) -> bool:
    await store.state("tts")
    return store.is_shared


def _remaining_ms(client: Any, key: str) -> float:
    """Milliseconds of server time until the breaker at ``key`` turns half-open."""
    seconds, micros = client.time()
    return float(int(client.hget(key, "opened_until")) - (seconds * 1000 + micros / 1000))
