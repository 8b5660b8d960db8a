"""The demo command: the stock side loses words and lies to the context, the resilient side does not."""

from __future__ import annotations

from pipecat_resilient.__main__ import main
from pipecat_resilient.demo import last_llm_results, run_demo


async def test_demo_shows_the_difference() -> None:
    """Same faults on both sides: stock loses and misreports, resilient is clean."""
    lines: list[str] = []
    pairs = await run_demo(realtime=False, ms_per_char=5.0, out=lines.append)
    assert len(pairs) == 3
    for stock, resilient in pairs:
        assert stock.words.lost and stock.words.unheard_in_context
        assert resilient.words.honest
        assert resilient.errors == 0
    assert any("every word heard once" in line for line in lines)
    # The LLM cases: an OpenAI stream, a Gemini Live session and an OpenAI Realtime one, cut mid-answer.
    assert len(last_llm_results) == 3
    for stock, resilient in last_llm_results:
        assert not stock.complete
        assert resilient.complete


def test_cli_usage() -> None:
    """No command prints the usage and fails; unknown commands fail."""
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert main(["nope"]) == 2
