"""A long outage of the primary mid-answer: words lost, dead air, probes, and the way back.

ElevenLabs is the primary and Cartesia the fallback (each an emulator with a
100 ms first-audio delay; the stock services talk to them over real sockets).
A bot speaks utterances one after another; in the middle of one, the primary
goes down for ``--outage-seconds`` (30 by default): its open socket is cut and
every new handshake is refused with 503. Then it comes back.

Reported: the words the listener lost and heard twice and whether the LLM
context equals what was heard; the dead air from the cut to the fallback's
first replayed audio, against the fallback's own connect + first audio
(measured in the same run with a bare websocket client: the least any switch
can cost); the handshakes to the primary while it
was down (each a probe: a handshake, no text sent, nothing billed) and after;
and how long after it came back the bot spoke on it again.

    python benchmarks/outage.py [--outage-seconds 30] [--runs 3] [--standby]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from typing import Any

from _common import SENTENCES, median, pct, quiet
from pipecat.frames.frames import TTSSpeakFrame
from websockets.asyncio.client import connect

from pipecat_resilient import BreakerPolicy, LocalHealthStore, ResilientTTS
from pipecat_resilient.testing import Scenario
from pipecat_resilient.testing.kits import tts_kit

ELEVENLABS = tts_kit("elevenlabs")
CARTESIA = tts_kit("cartesia")
FIRST_AUDIO_DELAY = 0.1
# Both emulators speak at the same pace, so one decoder hears both.
MS_PER_CHAR = 4.0
SAMPLE_RATE = 24000
# Probes every 5 s at first, then at most every 10 s while it stays down.
POLICY = BreakerPolicy(failures=1, cooldown=5.0, cooldown_max=10.0)


def words(*texts: str) -> list[str]:
    return " ".join(texts).split()


async def fallback_connect(backup: Any, index: int) -> float:
    """The fallback's own connect + first audio: a bare websocket client opening a connection and
    asking for a sentence, as a switch must (the least any switch can cost)."""
    started = time.monotonic()
    headers = {"X-API-Key": "bench", "Cartesia-Version": "2026-03-01"}
    async with connect(f"{backup.url}/tts/websocket", additional_headers=headers) as ws:
        request = {
            "transcript": SENTENCES[0],
            "continue": False,
            "context_id": f"own-{index}",
            "model_id": "sonic-3",
            "voice": {"mode": "id", "id": "bench"},
            "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": SAMPLE_RATE},
            "add_timestamps": True,
        }
        await ws.send(json.dumps(request))
        while json.loads(await ws.recv()).get("type") != "chunk":
            pass
    return time.monotonic() - started


async def one_run(outage_seconds: float, standby: bool) -> dict[str, Any]:
    # Audio paced at its own duration, as a real provider streams it: a cut
    # mid-answer leaves text unsaid, and the fallback's first audio after the
    # cut is when the listener hears again.
    options = {"ms_per_char": MS_PER_CHAR, "first_audio_delay": FIRST_AUDIO_DELAY, "realtime": True}
    async with (
        ELEVENLABS.emulator(**options) as primary,
        CARTESIA.emulator(timestamps="after", **options) as backup,
    ):
        own = [await fallback_connect(backup, index) for index in range(10)]
        first_backup = len(backup.connections)
        tts = ResilientTTS(
            ELEVENLABS.factory(primary),
            fallbacks=[CARTESIA.factory(backup)],
            health=LocalHealthStore(policy=POLICY),
            standby=standby,
        )
        switches: list[tuple[float, str, str]] = []

        @tts.event_handler("on_provider_switched")
        async def switched(processor: Any, old: str, new: str, reason: str) -> None:
            switches.append((time.monotonic(), old, new))

        run = Scenario(tts, spc=primary.samples_per_char(SAMPLE_RATE))
        await run.start()
        said: list[str] = []
        cut_at = restored_at = back_at = None
        index = after_back = 0
        while after_back < 2:
            text = SENTENCES[index % len(SENTENCES)]
            said.append(text)
            await run.send(TTSSpeakFrame(text))
            if index == 2:
                # Mid-answer: once the primary's audio for it has started.
                heard = len(run.heard)
                await run.wait_until(lambda h=heard: len(run.heard) >= h + 3, 30)
                outage = primary.outage("refuse", status=503, seconds=outage_seconds)
                cut_at = outage.started_at
                restored_at = outage.ends_at
            count = len(said)
            await run.wait_until(lambda n=count: run.listener.stopped >= n, outage_seconds + 60)
            if back_at is not None:
                after_back += 1
            elif restored_at is not None and switches and switches[-1][2] == tts.providers[0]:
                back_at = switches[-1][0]
            index += 1
            await asyncio.sleep(0.3)  # a pause between answers (a boundary where a switch may happen)
        await run.end()
        assert cut_at is not None and restored_at is not None
        # The fallback's first audio after the cut.
        replay_audio = min(
            c.first_audio_at
            for c in backup.connections[first_backup:]
            if c.first_audio_at is not None and c.first_audio_at > cut_at
        )
        during = [c for c in primary.connections if cut_at <= c.opened_at < restored_at]
        expected = words(*said)
        return {
            "words": len(expected),
            "lost": sum((Counter(expected) - Counter(run.heard)).values()),
            "twice": sum((Counter(run.heard) - Counter(expected)).values()),
            "whole": run.heard == expected,
            "honest": run.context_words == run.heard,
            "dead_air": replay_audio - cut_at,
            "fallback_own": median(own),
            "probes_during": len(during),
            "probe_texts": sum(len(c.texts) for c in during),
            "back_after": back_at - restored_at if back_at is not None else None,
            "switches": [(old, new) for _, old, new in switches],
            "standbys_used": tts.standbys_used,
        }


async def main(outage_seconds: float, runs: int, standby: bool) -> None:
    quiet()
    results = [await one_run(outage_seconds, standby) for _ in range(runs)]
    print(
        f"{runs} run(s): primary ElevenLabs down {outage_seconds:g}s mid-answer, fallback Cartesia, "
        f"first-audio delay {FIRST_AUDIO_DELAY * 1000:.0f} ms each" + (", warm standby" if standby else "")
    )
    for number, r in enumerate(results, 1):
        print(
            f"run {number}: {r['words']} words: lost {r['lost']}, twice {r['twice']}, "
            f"heard == said: {r['whole']}, context == heard: {r['honest']}; "
            f"switches {' / '.join(f'{a}->{b}' for a, b in r['switches'])}"
        )
        print(
            f"  dead air {r['dead_air'] * 1000:.0f} ms (fallback's own connect + first audio "
            f"{r['fallback_own'] * 1000:.0f} ms; "
            f"excess {(r['dead_air'] - r['fallback_own']) * 1000:.0f} ms); "
            f"handshakes to the primary while down {r['probes_during']} (text sent on them: "
            f"{r['probe_texts']}); back on the primary {r['back_after']:.1f}s after it came back"
        )
    excess = [r["dead_air"] - r["fallback_own"] for r in results]
    print(
        f"dead air beyond the fallback's own connect + first audio: p50 {pct(excess, 0.5) * 1000:.0f} ms, "
        f"max {max(excess) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage-seconds", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--standby", action="store_true", help="keep a warm standby of the provider in use")
    args = parser.parse_args()
    asyncio.run(main(args.outage_seconds, args.runs, args.standby))
