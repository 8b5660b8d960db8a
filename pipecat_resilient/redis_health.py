"""Provider health shared across a fleet through Redis.

:class:`RedisHealthStore` is a :class:`~pipecat_resilient.health.HealthStore`
whose breakers live in Redis, so when one bot finds a provider down every bot
skips it, and when it recovers exactly one bot of the fleet probes it. Needs
``redis`` (``pip install "pipecat-resilient[redis]"``), imported only when a
store is created.

Each transition of a breaker is one Lua script, so it is atomic whatever the
number of processes: a burst of failures opens the breaker once, and one probe
lease is granted at a time. The scripts read the time with Redis ``TIME``, so
bots whose clocks disagree still agree on when a cooldown ends.

Keys of a provider ``p`` under the prefix ``P`` (default
``pipecat-resilient:health:``); the braces are a cluster hash tag, so the
three keys of one provider live on one shard::

    P{p}           hash   opened_until  end of the cooldown, ms of server time; absent while closed
                          failed_probes probes failed in a row since the breaker opened from closed
                          trips         times the breaker opened from closed (lifetime count)
                          seq           counter that makes failure entries unique
    P{p}:failures  zset   one entry per transient failure while closed, scored by server ms;
                          trimmed to the window and expiring with it
    P{p}:probe     string the probe lease: SET NX PX probe_timeout, value names the holder

When Redis cannot be reached or answers with an error, the call is answered
by an embedded :class:`~pipecat_resilient.health.LocalHealthStore` instead,
within ``timeout``; every result is recorded there too, so that fallback holds
what this process has seen. One warning is logged when Redis is lost and one
info line when it is back; in between, Redis is tried again at most once per
``retry_interval``, so calls do not wait on it. The URL's password is never
logged.

Two consequences of answering locally: while Redis is away each process
trips and probes on its own (a few more probes fleet-wide, never fewer
breakers), and a write that timed out may still reach Redis later, which is
harmless because every script is a valid step from whatever state it finds.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from loguru import logger

from pipecat_resilient.health import (
    DEFAULT_BREAKER,
    BreakerPolicy,
    Health,
    HealthListener,
    LocalHealthStore,
)
from pipecat_resilient.policy import check_seconds

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["DEFAULT_PREFIX", "RedisHealthStore"]

DEFAULT_PREFIX = "pipecat-resilient:health:"
"""Prefix of every key the store writes."""

# The longest time handed to Redis, in ms (about 31 years): keeps every
# timestamp the scripts compute an exact integer in a Lua double.
_MAX_MS = 10**12

# The states as the scripts return them.
_CODES = (Health.CLOSED, Health.OPEN, Health.HALF_OPEN)

_PRELUDE = """
local CLOSED, OPEN, HALF_OPEN = 0, 1, 2
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local opened_until = tonumber(redis.call('HGET', KEYS[1], 'opened_until'))
local before = CLOSED
if opened_until then
  if now < opened_until then before = OPEN else before = HALF_OPEN end
end
"""

_STATE = _PRELUDE + "return before\n"

# KEYS: hash, failures, probe. ARGV: permanent (0/1), failures, window_ms, cooldown_ms, cooldown_max_ms.
# Returns {before, after}. Mirrors Breaker.failure.
_FAILURE = (
    _PRELUDE
    + """
local function open(failed_probes)
  local cooldown = math.min(tonumber(ARGV[5]), tonumber(ARGV[4]) * 2 ^ failed_probes)
  redis.call('HSET', KEYS[1], 'opened_until', string.format('%d', now + cooldown),
             'failed_probes', failed_probes)
  redis.call('DEL', KEYS[2], KEYS[3])
end
if before == OPEN then return {before, OPEN} end
if before == HALF_OPEN then
  open((tonumber(redis.call('HGET', KEYS[1], 'failed_probes')) or 0) + 1)
  return {before, OPEN}
end
if ARGV[1] ~= '1' then
  -- A failure at t counts while now - t < window: drop scores <= now - window.
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
  redis.call('ZADD', KEYS[2], now, redis.call('HINCRBY', KEYS[1], 'seq', 1))
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  if redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[2]) then return {before, CLOSED} end
end
redis.call('HINCRBY', KEYS[1], 'trips', 1)
open(0)
return {before, OPEN}
"""
)

# KEYS: hash, failures, probe. Returns {before, after}. Mirrors Breaker.success.
_SUCCESS = (
    _PRELUDE
    + """
if before == OPEN then return {before, OPEN} end
if before == HALF_OPEN then
  redis.call('HDEL', KEYS[1], 'opened_until')
  redis.call('HSET', KEYS[1], 'failed_probes', 0)
end
redis.call('DEL', KEYS[2], KEYS[3])
return {before, CLOSED}
"""
)

# KEYS: hash, probe. ARGV: probe_timeout_ms, holder. Returns 1 if the lease was granted.
# The lease key expires on the server's clock, the same one TIME reads.
_PROBE = (
    _PRELUDE
    + """
if before ~= HALF_OPEN then return 0 end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[1]) then return 1 end
return 0
"""
)


class RedisHealthStore:
    """Provider health kept in Redis and shared by every process that uses the same keys.

    Example::

        store = RedisHealthStore("redis://:secret@redis.internal:6379/0")
        ...
        await store.aclose()

    Use one store per event loop; it is also an async context manager.
    """

    def __init__(
        self,
        url_or_client: str | Redis,
        *,
        policy: BreakerPolicy = DEFAULT_BREAKER,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 0.2,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: HealthListener | None = None,
    ) -> None:
        """Create the store; nothing is sent to Redis until the first call.

        Args:
            url_or_client: A Redis URL (``redis://``, ``rediss://``,
                ``unix://``), for which the store makes and owns a client with
                ``timeout`` as its socket timeouts and no retries, or a
                ``redis.asyncio.Redis`` client the caller owns and closes.
            policy: The breaker policy. Every process sharing the keys should
                use the same one.
            prefix: Prefix of every key (see the module docstring).
            timeout: Longest a call waits for Redis before it answers from
                this process's own view, in seconds.
            retry_interval: After Redis failed, how long calls answer locally
                before Redis is tried again, in seconds.
            clock: Seconds on a clock that does not step back, for the local
                fallback and ``retry_interval``. Redis keeps its own time.
            on_change: Called with ``(provider, old, new)`` when a result
                recorded through this store changed a provider's state; with
                Redis reachable it fires in the one process that made the
                change, fleet-wide.

        Raises:
            ValueError: ``timeout`` or ``retry_interval`` is not a positive number of seconds.
        """
        check_seconds(timeout=timeout, retry_interval=retry_interval)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {prefix!r}")
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        # What "Redis is not answering now" looks like: refused or dropped
        # connections, the timeout, and any error reply.
        self._errors: tuple[type[Exception], ...] = (RedisError, OSError, TimeoutError)

        self._password: str | None = None
        if isinstance(url_or_client, str):
            self._client = Redis.from_url(
                url_or_client,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
            )
            self._owns_client = True
            self._where = _describe_url(url_or_client)
            self._password = urlsplit(url_or_client).password
        else:
            self._client = url_or_client
            self._owns_client = False
            self._where = _describe_client(url_or_client)
        self._policy = policy
        self._prefix = prefix
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._clock = clock
        self._on_change = on_change
        self._local = LocalHealthStore(policy=policy, clock=clock)
        self._holder = f"{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._state_script = self._client.register_script(_STATE)
        self._failure_script = self._client.register_script(_FAILURE)
        self._success_script = self._client.register_script(_SUCCESS)
        self._probe_script = self._client.register_script(_PROBE)
        self._failure_args = (
            policy.failures,
            _ms(policy.window),
            _ms(policy.cooldown),
            _ms(policy.cooldown_max),
        )

    @property
    def policy(self) -> BreakerPolicy:
        """The breaker policy."""
        return self._policy

    @property
    def is_shared(self) -> bool:
        """Whether the last call reached Redis (False while calls are answered locally)."""
        return self._down_since is None

    async def state(self, provider: str) -> Health:
        """The provider's state now, as Redis has it (or as this process saw it, without Redis)."""
        code = await self._run(self._state_script, [self._key(provider)], [])
        if code is None:
            return await self._local.state(provider)
        return _CODES[int(code)]

    async def record_failure(self, provider: str, *, permanent: bool = False) -> Health:
        """Record a failed call and return the state after it."""
        old = await self._local.state(provider)
        local = await self._local.record_failure(provider, permanent=permanent)
        answer = await self._run(
            self._failure_script,
            self._keys(provider),
            [int(permanent), *self._failure_args],
        )
        return self._settle(provider, answer, old, local)

    async def record_success(self, provider: str) -> Health:
        """Record a successful call and return the state after it."""
        old = await self._local.state(provider)
        local = await self._local.record_success(provider)
        answer = await self._run(self._success_script, self._keys(provider), [])
        return self._settle(provider, answer, old, local)

    async def try_acquire_probe(self, provider: str) -> bool:
        """Take the provider's probe lease: True for one caller fleet-wide at a time while half-open."""
        key = self._key(provider)
        granted = await self._run(
            self._probe_script, [key, f"{key}:probe"], [_ms(self._policy.probe_timeout), self._holder]
        )
        if granted is None:
            return await self._local.try_acquire_probe(provider)
        return bool(int(granted))

    async def aclose(self) -> None:
        """Close the client if the store made it from a URL."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> RedisHealthStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"RedisHealthStore({self._where}, prefix={self._prefix!r})"

    def _key(self, provider: str) -> str:
        return f"{self._prefix}{{{provider}}}"

    def _keys(self, provider: str) -> list[str]:
        key = self._key(provider)
        return [key, f"{key}:failures", f"{key}:probe"]

    def _settle(self, provider: str, answer: Any, old: Health, local: Health) -> Health:
        """Pick Redis's answer, or the local one without it, and report a change."""
        if answer is not None:
            old, new = _CODES[int(answer[0])], _CODES[int(answer[1])]
        else:
            new = local
        if old is not new and self._on_change is not None:
            self._on_change(provider, old, new)
        return new

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """Run one script within the timeout; None when Redis is down or failed."""
        if self._down_since is not None and self._clock() < self._retry_at:
            return None
        try:
            async with asyncio.timeout(self._timeout):
                result = await script(keys=keys, args=args)
        except self._errors as exc:
            self._lost(exc)
            return None
        if self._down_since is not None:
            downtime = self._clock() - self._down_since
            self._down_since = None
            logger.info(
                f"Provider health store {self._where} is reachable again after {downtime:.1f} s; "
                "sharing provider health again"
            )
        return result

    def _lost(self, exc: Exception) -> None:
        now = self._clock()
        self._retry_at = now + self._retry_interval
        if self._down_since is not None:
            return
        self._down_since = now
        reason = type(exc).__name__
        detail = str(exc)
        if self._password:
            detail = detail.replace(self._password, "***")
        if detail:
            reason = f"{reason}: {detail}"
        logger.warning(
            f"Provider health store {self._where} is unreachable ({reason}); "
            "each process uses its own view of provider health until it is back"
        )


def _ms(seconds: float) -> int:
    return max(1, min(_MAX_MS, math.ceil(seconds * 1000)))


def _describe_url(url: str) -> str:
    """Where the URL points, without credentials or query (which may hold a password)."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return f"unix://{parts.path}"
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"
    except ValueError:
        return "redis (unparsable URL)"


def _describe_client(client: Redis) -> str:
    kwargs: dict[str, Any] = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
