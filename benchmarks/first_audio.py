"""Time to first audio with no faults: what ResilientTTS adds to the bare stock service.

Each side speaks the same utterances one at a time (emulator in its own
process, no artificial latency); the time from queueing a TTSSpeakFrame to the
first audio frame reaching the end of the pipeline is taken for each. Sides
alternate within every round.

    python benchmarks/first_audio.py [--utterances 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio

from _common import emulator_process, median, pct, quiet, speak


async def main(utterances: int, rounds: int) -> None:
    quiet()
    samples: dict[str, list[float]] = {"bare": [], "resilient": []}
    async with emulator_process(ms_per_char=1.0) as url:
        for round_ in range(rounds):
            order = ("bare", "resilient") if round_ % 2 == 0 else ("resilient", "bare")
            for side in order:
                run = await speak(side, url, utterances, ms_per_char=1.0)
                samples[side].extend(run.first_audio)
    print(f"time to first audio, {len(samples['bare'])} utterances per side, no faults")
    print(f"{'':10}{'bare':>12}{'resilient':>12}{'added':>12}")
    for label, q in (("p50", 0.5), ("p95", 0.95)):
        bare, res = pct(samples["bare"], q) * 1000, pct(samples["resilient"], q) * 1000
        print(f"{label:10}{bare:>10.3f}ms{res:>10.3f}ms{res - bare:>10.3f}ms")
    bare_mean = median(samples["bare"]) * 1000
    print(f"ratio of medians: {median(samples['resilient']) * 1000 / bare_mean:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.utterances, args.rounds))
