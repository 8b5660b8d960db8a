"""Recovery time after a drop, minus the emulator's own connect and first-audio time.

Every utterance is cut by a close (1012, 1011) or an abort (1006) a few audio
chunks in. Recovery is measured from the moment the emulator carried out the
fault to the moment it sent the first audio on the replacement connection.
The emulator's own share is measured in the same run with a bare websocket
client doing what a fresh connection must: connect, open a context, send the
text, wait for the first audio. What remains is ResilientTTS's part: noticing
the drop, draining, making and setting up a fresh instance, replaying.

The bare stock service reconnects too, but never resends the text: it has no
recovery to time (its figure is the count of utterances it left unfinished).

With ``--standby`` the processor keeps a warm standby connected
(``ResilientTTS(standby=True)``): the replay goes to it with no handshake,
so recovery is compared with the emulator's own first audio on a connection
already open (measured the same way, from the text sent to its first audio).
Each fault waits for the standby to be back (a drop every few seconds at most).

The emulator runs in a child process (``_remote.py``), as a real provider runs
elsewhere: in this process its own reading and closing would take turns of
the pipeline's event loop, and count as recovery time. ``--in-process`` runs
it here instead, for comparison.

    python benchmarks/recovery.py [--faults 60] [--first-audio-delay 0.1] [--standby] [--in-process]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from _common import SENTENCES, factory, median, pct, quiet
from _remote import RemoteEmulator
from pipecat.frames.frames import TTSSpeakFrame
from websockets.asyncio.client import connect

from pipecat_resilient import ResilientTTS
from pipecat_resilient.testing import ElevenLabsEmulator, Fault, Scenario
from pipecat_resilient.testing.speech import samples_per_char


async def baseline(url: str, count: int, *, connected: bool = False) -> list[float]:
    """The emulator's own connect + first-audio time, with a bare websocket client.

    With ``connected``, the clock starts once the socket is open (what a warm
    standby has already done): the time from the text to its first audio.
    """
    path = "/v1/text-to-speech/v/multi-stream-input?model_id=m&output_format=pcm_24000&auto_mode=true"
    times = []
    for index in range(count):
        started = time.monotonic()
        async with connect(url + path, additional_headers={"xi-api-key": "k"}) as ws:
            if connected:
                started = time.monotonic()
            await ws.send(json.dumps({"text": " ", "context_id": f"c{index}"}))
            await ws.send(json.dumps({"text": SENTENCES[0], "context_id": f"c{index}"}))
            while "audio" not in json.loads(await ws.recv()):
                pass
            times.append(time.monotonic() - started)
    return times


async def main(
    faults: int, first_audio_delay: float, standby: bool = False, in_process: bool = False
) -> None:
    quiet()
    kinds = [("close", 1012, 3), ("close", 1011, 5), ("abort", None, 4)]
    options = {"ms_per_char": 2.0, "first_audio_delay": first_audio_delay}
    remote = None if in_process else RemoteEmulator(**options)
    async with remote or ElevenLabsEmulator(**options) as emulator:  # type: ignore[attr-defined]
        own = await baseline(emulator.url, 30, connected=standby)
        tts = ResilientTTS(factory(emulator.url), standby=standby)
        run = Scenario(tts, spc=samples_per_char(24000, 2.0))
        await run.start()
        for index in range(faults):
            if standby:
                async with asyncio.timeout(30):
                    while not tts.standby_ready:
                        await asyncio.sleep(0.005)
            # On every open connection: only the one that speaks carries it out.
            kind, code, chunks = kinds[index % len(kinds)]
            args = () if code is None else (code,)
            if remote is not None:
                await remote.arm(kind, *args, after_audio_chunks=chunks)
            else:
                emulator.arm(getattr(Fault, kind)(*args, after_audio_chunks=chunks), on="open")
            await run.send(TTSSpeakFrame(SENTENCES[index % len(SENTENCES)]))
            await run.wait_until(lambda n=index + 1: run.listener.stopped >= n, 30)
        await run.end()
        connections = await remote.records() if remote is not None else emulator.connections
        recoveries = []
        for before in connections:
            if before.fault_at is None:
                continue
            # The replay's first audio: the first audio after the fault on a later connection.
            after = [
                c.first_audio_at
                for c in connections[before.index + 1 :]
                if c.first_audio_at is not None and c.first_audio_at > before.fault_at
            ]
            if after:
                recoveries.append(min(after) - before.fault_at)
        used = tts.standbys_used
    ours = [r - median(own) for r in recoveries]
    print(
        f"{len(recoveries)} drops (close 1012, close 1011, abort), "
        f"emulator first-audio delay {first_audio_delay * 1000:.0f}ms"
        + (f", warm standby (taken over {used} times)" if standby else "")
        + (", emulator in this process" if in_process else ", emulator in its own process")
    )
    print(f"{'':44}{'p50':>10}{'p95':>10}{'max':>10}")
    for label, values in (
        ("recovery: fault to replayed audio", recoveries),
        ("emulator's own first audio" if standby else "emulator's own connect + first audio", own),
        ("ResilientTTS's part (recovery - own p50)", ours),
    ):
        print(f"{label:44}" + "".join(f"{pct(values, q) * 1000:>8.1f}ms" for q in (0.5, 0.95, 1.0)))
    print("bare stock service: reconnects but never resends; every cut utterance stays unfinished")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=60)
    parser.add_argument("--first-audio-delay", type=float, default=0.1)
    parser.add_argument("--standby", action="store_true", help="keep a warm standby connected")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the emulator in this process (its work then shares the pipeline's event loop)",
    )
    args = parser.parse_args()
    asyncio.run(main(args.faults, args.first_audio_delay, args.standby, args.in_process))
