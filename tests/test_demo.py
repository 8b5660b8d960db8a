"""The demo command: the stock side loses words and lies to the context, the resilient side does not."""

from __future__ import annotations

from pipecat_resilient.__main__ import main
from pipecat_resilient.demo import last_llm_results, last_stt_results, run_demo
from pipecat_resilient.demo_stt import run_stt_case


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
    # The STT case: a Deepgram socket closed mid-turn.
    assert len(last_stt_results) == 1
    assert last_stt_results[0][1].clean


async def test_demo_stt_case_keeps_the_turn_whole() -> None:
    """A Deepgram socket closed with 1011 mid-turn: resilient commits every word once, in one turn."""
    lines: list[str] = []
    stock, resilient = await run_stt_case(realtime=False, out=lines.append, index=1)
    assert resilient.clean
    assert resilient.context == resilient.said and len(resilient.said) > 5
    assert resilient.lost == [] and resilient.extra == []
    assert resilient.turns == 1 and resilient.errors == 0
    assert stock.said == resilient.said
    # The stock service drops the audio while it waits out its reconnect backoff.
    assert stock.lost
    assert any(line.startswith("STT, stock:") and "every word in the context once" in line for line in lines)


def test_cli_usage() -> None:
    """No command prints the usage and fails; unknown commands fail."""
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert main(["nope"]) == 2
