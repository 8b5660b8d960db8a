"""Command line: ``pipecat-resilient demo`` (or ``python -m pipecat_resilient demo``)."""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections.abc import Callable

# One line per command, for the top-level --help.
COMMANDS = {
    "demo": "stock Pipecat and the resilient processors side by side under the same provider faults "
    "(embedded emulators, no keys, no network)",
    "chaos": "a seeded schedule of faults through both sides: loss, dead air and recovery figures, "
    "a JSON report and a timeline picture; exit status 1 if the resilient side slips",
    "emulate": "serve the ElevenLabs emulator on 127.0.0.1 until interrupted (point a bot at it)",
}

DESCRIPTION = (
    "Drop-in Pipecat processors that survive provider connection failures without losing a word: "
    "see them work against local provider emulators."
)

EPILOG = "run `pipecat-resilient COMMAND --help` for a command's options; exit status 2 means a usage error"


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a sub-command and return the exit status (2 for any usage error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # A command's own options, --help included, belong to the command.
        if args and args[0] in COMMANDS:
            return _run(args[0], args[1:])
        command = _parser().parse_args(args).command
        return _run(command, [])
    except SystemExit as stop:
        # argparse exits on --help, --version and usage errors; hand back its status.
        return _status(stop.code)


def _parser() -> argparse.ArgumentParser:
    """The top-level parser: a command, --help and --version."""
    width = 79
    commands = "\n".join(
        textwrap.fill(summary, width, initial_indent=f"  {name:9}", subsequent_indent=" " * 11)
        for name, summary in COMMANDS.items()
    )
    parser = argparse.ArgumentParser(
        prog="pipecat-resilient",
        description=f"{textwrap.fill(DESCRIPTION, width)}\n\ncommands:\n{commands}",
        epilog=textwrap.fill(EPILOG, width),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-V", "--version", action="version", version=f"pipecat-resilient {version()}", help="show the version"
    )
    parser.add_argument("command", metavar="COMMAND", choices=list(COMMANDS), help="one of: %(choices)s")
    return parser


def version() -> str:
    """The installed distribution's version, or the package's own when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("pipecat-resilient")
    except metadata.PackageNotFoundError:
        from pipecat_resilient import __version__

        return __version__


def _run(command: str, argv: list[str]) -> int:
    if command == "demo":
        from pipecat_resilient.demo import main as demo

        return demo(argv)
    if command == "chaos":
        from pipecat_resilient.chaos import main as chaos

        return chaos(argv)
    return _emulate(argv)


def _status(code: object) -> int:
    """The exit status ``sys.exit(code)`` would give."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _number(*, minimum: float, strict: bool) -> Callable[[str], float]:
    """An argparse type: a finite number above ``minimum`` (or at least it, when not ``strict``)."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            bound = "more than" if strict else "at least"
            raise argparse.ArgumentTypeError(f"must be a number {bound} {minimum:g}, got {text!r}")
        return value

    return convert


def _emulate(argv: list[str]) -> int:
    """Serve an emulator until interrupted, printing its URL."""
    import asyncio

    parser = argparse.ArgumentParser(
        prog="pipecat-resilient emulate",
        description="Serve a provider emulator on 127.0.0.1, on a free port, until interrupted. "
        "It prints its URL: point a bot's service at it. No keys, no network.",
    )
    parser.add_argument("provider", choices=["elevenlabs"], help="which provider to emulate")
    parser.add_argument(
        "--ms-per-char",
        type=_number(minimum=0, strict=True),
        default=10.0,
        help="speech rate, milliseconds of audio per character (default 10)",
    )
    parser.add_argument(
        "--first-audio-delay",
        type=_number(minimum=0, strict=False),
        default=0.0,
        help="seconds before the first audio (default 0)",
    )
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
