"""An ElevenLabs emulator in a child process, armed with faults from this one.

A real provider does not share the bot's event loop. An emulator in the same
process does: its reading, closing and sending compete with the pipeline for
turns of the loop, and a recovery measured against it includes that work.
Here the emulator runs in a child process, so a time measured is the
pipeline's own. Faults are armed over the child's stdin (acknowledged before
the call returns); the connection records come back as JSON at the end.
``time.monotonic`` is one system-wide clock on Linux and macOS, so the
child's timestamps compare with this process's.

Run as a script, this module is the child.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import Any


@dataclass
class Record:
    """What the child's emulator saw on one connection (the fields the benchmarks read)."""

    index: int
    fault_at: float | None
    first_audio_at: float | None


class RemoteEmulator:
    """Drive an ElevenLabs emulator running in a child process.

    Args:
        **options: ``ElevenLabsEmulator`` keyword arguments (numbers only).
    """

    def __init__(self, **options: float) -> None:
        self._options = options
        self._process: asyncio.subprocess.Process | None = None
        self.url = ""

    async def __aenter__(self) -> RemoteEmulator:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            json.dumps(self._options),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self.url = (await self._reply())["url"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._process is not None
        self._process.terminate()
        await self._process.wait()

    async def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write((json.dumps(request) + "\n").encode())
        await self._process.stdin.drain()
        return await self._reply()

    async def _reply(self) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        line = await asyncio.wait_for(self._process.stdout.readline(), 30)
        if not line:
            raise RuntimeError("the emulator's process ended")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def arm(self, fault: str, *args: Any, on: str = "open", **kwargs: Any) -> None:
        """Arm ``Fault.<fault>(*args, **kwargs)`` in the child; returns once it is armed."""
        await self._call({"arm": [fault, list(args), kwargs, on]})

    async def records(self) -> list[Record]:
        """Every connection the child's emulator has seen, in order."""
        reply = await self._call({"records": True})
        return [Record(**record) for record in reply["records"]]


async def _child(options: dict[str, float]) -> None:
    from loguru import logger

    from pipecat_resilient.testing import ElevenLabsEmulator, Fault

    logger.remove()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async with ElevenLabsEmulator(**options) as emulator:  # type: ignore[arg-type]
        reply({"url": emulator.url})
        while line := await reader.readline():
            request = json.loads(line)
            if "arm" in request:
                name, args, kwargs, on = request["arm"]
                emulator.arm(getattr(Fault, name)(*args, **kwargs), on=on)
                reply({})
            elif "records" in request:
                records = [
                    {
                        "index": c.index,
                        "fault_at": c.fault_at,
                        "first_audio_at": c.first_audio_at,
                    }
                    for c in emulator.connections
                ]
                reply({"records": records})


if __name__ == "__main__":
    asyncio.run(_child(json.loads(sys.argv[1])))
