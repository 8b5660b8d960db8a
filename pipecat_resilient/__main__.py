"""Command line: ``pipecat-resilient demo`` (or ``python -m pipecat_resilient demo``)."""

from __future__ import annotations

import sys

USAGE = """usage: pipecat-resilient COMMAND [options]

commands:
  demo    stock Pipecat and ResilientTTS side by side under the same provider faults
          (embedded emulators, no keys, no network)
  chaos   a seeded schedule of faults through both; loss, dead air and recovery figures,
          a JSON report and a timeline picture; exit status 1 if the resilient side slips
  emulate serve the ElevenLabs emulator on 127.0.0.1 until interrupted (point a bot at it)

run `pipecat-resilient COMMAND --help` for a command's options
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a sub-command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "demo":
        from pipecat_resilient.demo import main as demo

        return demo(rest)
    if command == "emulate":
        return _emulate(rest)
    if command == "chaos":
        from pipecat_resilient.chaos import main as chaos

        return chaos(rest)
    print(f"unknown command: {command}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


def _emulate(argv: list[str]) -> int:
    """Serve an emulator until interrupted, printing its URL."""
    import argparse
    import asyncio

    parser = argparse.ArgumentParser(prog="pipecat-resilient emulate", description=_emulate.__doc__)
    parser.add_argument("provider", choices=["elevenlabs"], help="which provider to emulate")
    parser.add_argument("--ms-per-char", type=float, default=10.0, help="speech rate (default 10)")
    parser.add_argument("--first-audio-delay", type=float, default=0.0, help="seconds before the first audio")
    parser.add_argument("--realtime", action="store_true", help="pace audio at its duration")
    args = parser.parse_args(argv)

    async def serve() -> None:
        from pipecat_resilient.testing.elevenlabs import ElevenLabsEmulator

        async with ElevenLabsEmulator(
            ms_per_char=args.ms_per_char, first_audio_delay=args.first_audio_delay, realtime=args.realtime
        ) as emulator:
            print(emulator.url, flush=True)
            await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
