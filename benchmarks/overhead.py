"""Steady-state cost of ResilientTTS: CPU and wall time per frame, against the bare stock service.

Both sides speak the same utterances through the same pipeline (listener and
assistant aggregator included) against an emulator running in its own process
with no artificial latency, alternating sides over several rounds. Prints the
per-frame cost of each and the ratio resilient / bare.

    python benchmarks/overhead.py [--utterances 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio

from _common import emulator_process, median, quiet, speak


async def main(utterances: int, rounds: int) -> None:
    quiet()
    ms_per_char = 1.0
    results: dict[str, list] = {"bare": [], "resilient": []}
    ratios: list[float] = []
    async with emulator_process(ms_per_char=ms_per_char) as url:
        for round_ in range(rounds):
            # Alternate which side goes first, and compare within a round.
            order = ("bare", "resilient") if round_ % 2 == 0 else ("resilient", "bare")
            runs = {side: await speak(side, url, utterances, ms_per_char=ms_per_char) for side in order}
            for side, run in runs.items():
                results[side].append(run)
            ratios.append(
                (runs["resilient"].cpu / runs["resilient"].frames) / (runs["bare"].cpu / runs["bare"].frames)
            )
    print(f"{utterances} utterances x {rounds} rounds per side, emulator in its own process, no latency")
    print(f"{'':22}{'bare':>14}{'resilient':>14}{'ratio':>10}")
    figures = {}
    for side, runs in results.items():
        frames = [r.frames for r in runs]
        figures[side] = {
            "cpu_per_frame_us": median([r.cpu / r.frames * 1e6 for r in runs]),
            "wall_per_frame_us": median([r.wall / r.frames * 1e6 for r in runs]),
            "audio_frames": median([r.audio_frames for r in runs]),
            "text_frames": median([r.text_frames for r in runs]),
            "frames": median(frames),
        }
    for key, label in (
        ("cpu_per_frame_us", "CPU per frame (us)"),
        ("wall_per_frame_us", "wall per frame (us)"),
        ("audio_frames", "audio frames / run"),
        ("text_frames", "text frames / run"),
    ):
        bare, res = figures["bare"][key], figures["resilient"][key]
        print(f"{label:22}{bare:>14.1f}{res:>14.1f}{res / bare:>10.3f}")
    ratios.sort()
    print(
        f"CPU-per-frame ratio within rounds: median {median(ratios):.3f} "
        f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f}, {len(ratios)} rounds)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.utterances, args.rounds))
