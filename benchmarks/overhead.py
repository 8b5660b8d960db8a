"""Steady-state cost of ResilientTTS: CPU and wall time per frame, against the bare stock service.

Each side speaks the same utterances through the same pipeline (listener and
assistant aggregator included) against an emulator running in its own process
with no artificial latency; the sides take turns within each round, in a
rotating order, over many rounds. Prints the per-frame cost of each and the
ratio to the bare service. A third side, the bare service followed by a
pass-through processor, shows what any one more pipeline stage costs, for
reference.

With ``--standby`` a fourth side runs ResilientTTS with a warm standby
connected beside it (its keep-alive included in the CPU time).

Then each side speaks once more under ``cProfile``, which counts the Python
function calls per frame: a deterministic figure, where the CPU time of a
shared machine moves by tens of percent from run to run.

    python benchmarks/overhead.py [--utterances 100] [--rounds 30] [--standby] [--ms-per-char 1]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats

from _common import Run, emulator_process, median, quiet, speak

SIDES: tuple[str, ...] = ("bare", "resilient", "bare+hop")


def _per_frame(run: Run) -> float:
    return run.cpu / run.frames


async def main(utterances: int, rounds: int, standby: bool = False, ms_per_char: float = 1.0) -> None:
    quiet()
    global SIDES
    if standby:
        SIDES = ("bare", "resilient", "resilient+standby", "bare+hop")
    results: dict[str, list[Run]] = {side: [] for side in SIDES}
    ratios: dict[str, list[float]] = {side: [] for side in SIDES[1:]}
    async with emulator_process(ms_per_char=ms_per_char) as url:
        for round_ in range(rounds):
            # Rotate which side goes first, and compare within a round.
            shift = round_ % len(SIDES)
            order = SIDES[shift:] + SIDES[:shift]
            runs: dict[str, Run] = {}
            for side in order:
                gc.collect()  # start each run with the same heap, not the other side's garbage
                runs[side] = await speak(side, url, utterances, ms_per_char=ms_per_char)
            for side, run in runs.items():
                results[side].append(run)
            for side in ratios:
                ratios[side].append(_per_frame(runs[side]) / _per_frame(runs["bare"]))
        calls: dict[str, float] = {}
        for side in SIDES:
            profile = cProfile.Profile()
            profile.enable()
            run = await speak(side, url, utterances, ms_per_char=ms_per_char)
            profile.disable()
            calls[side] = pstats.Stats(profile).total_calls / run.frames  # type: ignore[attr-defined]
    print(
        f"{utterances} utterances x {rounds} rounds per side, emulator in its own process, no latency, "
        f"{ms_per_char:g} ms of audio per character"
    )
    width = max(14, *(len(side) + 2 for side in SIDES))
    print(f"{'':22}" + "".join(f"{side:>{width}}" for side in SIDES))
    for label, value in (
        ("CPU per frame (us)", lambda r: r.cpu / r.frames * 1e6),
        ("wall per frame (us)", lambda r: r.wall / r.frames * 1e6),
        ("audio frames / run", lambda r: r.audio_frames),
        ("text frames / run", lambda r: r.text_frames),
    ):
        print(f"{label:22}" + "".join(f"{median([value(r) for r in results[s]]):>{width}.1f}" for s in SIDES))
    # The fastest run of each side is the least disturbed by the rest of the machine.
    best = {side: min(_per_frame(r) for r in runs_) for side, runs_ in results.items()}
    for side, values in ratios.items():
        values.sort()
        print(
            f"CPU per frame, {side} / bare: median within rounds {median(values):.3f} "
            f"(min {values[0]:.3f}, max {values[-1]:.3f}); fastest runs {best[side] / best['bare']:.3f}"
        )
    print(
        "Python function calls per frame: "
        + ", ".join(f"{side} {calls[side]:.0f} ({calls[side] / calls['bare']:.3f})" for side in SIDES)
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--standby", action="store_true", help="add a side with a warm standby")
    parser.add_argument(
        "--ms-per-char",
        type=float,
        default=1.0,
        help="audio per character (default 1: many tiny frames, the most per-frame work for the text; "
        "a real voice is about 65)",
    )
    args = parser.parse_args()
    asyncio.run(main(args.utterances, args.rounds, args.standby, args.ms_per_char))
