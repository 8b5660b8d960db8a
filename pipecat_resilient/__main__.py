"""Command line: ``pipecat-resilient demo`` (or ``python -m pipecat_resilient demo``)."""

from __future__ import annotations

import sys

USAGE = """usage: pipecat-resilient COMMAND [options]

commands:
  demo    stock Pipecat and ResilientTTS side by side under the same provider faults
          (embedded emulators, no keys, no network)
  chaos   a seeded schedule of faults through both; loss, dead air and recovery figures,
          a JSON report and a timeline picture; exit status 1 if the resilient side slips

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
    if command == "chaos":
        from pipecat_resilient.chaos import main as chaos

        return chaos(rest)
    print(f"unknown command: {command}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
