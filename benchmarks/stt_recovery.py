"""Recovery time of ResilientSTT after a close or an abort, against the emulator's own connect time.

The caller says one utterance after another, in real time; each is cut by a
close (1000, 1011) or an abort (1006) in its middle. Recovery is measured from
the moment the emulator carried out the fault to the moment the fresh instance
was live and had been sent the audio to replay (``on_connection_recovered``),
and to the moment the emulator saw the fresh handshake. The emulator's own
share is measured in the same run with a bare websocket client doing what a
fresh connection must: connect. What remains is ResilientSTT's part: noticing
the drop, a fresh instance, setting it up, sending the replay.

The bare stock services reconnect after 4 s (Deepgram) or at once without the
turn in flight (AssemblyAI): see tests/test_emulator_*.py.

    python benchmarks/stt_recovery.py [--drops 30] [--provider deepgram]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from _common import median, pct, quiet
from pipecat.services.assemblyai.stt import AssemblyAISTTService
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.stt_service import STTService
from websockets.asyncio.client import connect

from pipecat_resilient import ResilientSTT, STTRecoveryReport
from pipecat_resilient.testing import AssemblyAIEmulator, DeepgramSTTEmulator, Fault
from pipecat_resilient.testing.stt_harness import Caller, STTScenario

UTTERANCE = "I would like to book a table for four people on Friday night."
MS_PER_CHAR = 50.0


async def baseline(url: str, count: int) -> list[float]:
    """The emulator's own connect time, with a bare websocket client."""
    times = []
    for _ in range(count):
        started = time.monotonic()
        async with connect(url, additional_headers={"Authorization": "Token k"}):
            times.append(time.monotonic() - started)
    return times


async def measure(provider: str, drops: int) -> None:
    caller = Caller([UTTERANCE], ms_per_char=MS_PER_CHAR, pause=1.0)
    message_s = 0.02 if provider == "deepgram" else 0.05
    middle = int((caller.said[5].start + caller.said[5].end) / 2 / message_s) + 1  # mid "for"
    kinds = [
        lambda: Fault.close(1000, after_audio_received=middle),
        lambda: Fault.close(1011, after_audio_received=middle),
        lambda: Fault.abort(after_audio_received=middle),
    ]
    emulator: DeepgramSTTEmulator | AssemblyAIEmulator
    if provider == "deepgram":
        emulator = DeepgramSTTEmulator(ms_per_char=MS_PER_CHAR)
    else:
        emulator = AssemblyAIEmulator(ms_per_char=MS_PER_CHAR)
    async with emulator:

        def make() -> STTService:
            if isinstance(emulator, DeepgramSTTEmulator):
                return DeepgramSTTService(api_key="k", base_url=emulator.url)
            return AssemblyAISTTService(api_key="k", api_endpoint_base_url=emulator.ws_url)

        path = "/v1/listen?encoding=linear16&sample_rate=16000" if provider == "deepgram" else "/v3/ws"
        own = await baseline(emulator.url + path if provider == "deepgram" else emulator.ws_url, 30)
        stt = ResilientSTT(make)
        recovered: list[float] = []

        async def on_recovered(processor: ResilientSTT, report: STTRecoveryReport) -> None:
            recovered.append(time.monotonic())

        stt.add_event_handler("on_connection_recovered", on_recovered)
        run = STTScenario(stt, user_speech_timeout=0.6)
        await run.start()
        for index in range(drops):
            emulator.arm(kinds[index % len(kinds)]())
            await run.speak(caller, pace=1.0)
            await run.wait_until(lambda n=index + 1: len(run.user_messages) >= n and len(recovered) >= n, 30)
        lost = run.lost(Caller([UTTERANCE] * drops, ms_per_char=MS_PER_CHAR))
        extra = run.extra(Caller([UTTERANCE] * drops, ms_per_char=MS_PER_CHAR))
        await run.end()
    faults = [r for r in emulator.connections if r.fault_at is not None]
    records = emulator.connections
    reopened = [
        records[fault.index + 1].opened_at - fault.fault_at
        for fault in faults
        if fault.fault_at is not None and fault.index + 1 < len(records)
    ]
    recovery = [at - fault.fault_at for at, fault in zip(recovered, faults, strict=False) if fault.fault_at]
    part = [r - median(own) for r in recovery]
    print(f"{provider}: {len(recovery)} drops (close 1000, close 1011, abort) mid-utterance, real time")
    print(f"  words lost {len(lost)}, words twice {len(extra)}")
    print(f"  {'':46}{'p50':>10}{'p95':>10}{'max':>10}")
    for label, values in (
        ("fault to the fresh handshake at the emulator", reopened),
        ("fault to recovered (replay sent)", recovery),
        ("emulator's own connect (bare client)", own),
        ("ResilientSTT's part (recovered - own p50)", part),
    ):
        print(f"  {label:46}" + "".join(f"{pct(values, q) * 1000:>8.1f}ms" for q in (0.5, 0.95, 1.0)))


async def main(drops: int, providers: list[str]) -> None:
    quiet()
    for provider in providers:
        await measure(provider, drops)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=int, default=30)
    parser.add_argument("--provider", choices=["deepgram", "assemblyai"], action="append")
    args = parser.parse_args()
    asyncio.run(main(args.drops, args.provider or ["deepgram", "assemblyai"]))
