"""The speech-to-speech chaos bench: a short seeded schedule, stock and resilient side by side."""

from __future__ import annotations

import pytest

from pipecat_resilient.chaos_llm import LLMChaosConfig, format_table, main, make_schedule, run_llm_chaos


@pytest.mark.parametrize(
    ("provider", "mix"),
    [("gemini-live", ("close-1011", "abort", "silent")), ("openai-realtime", ("close-1011", "error"))],
)
async def test_the_resilient_side_hears_every_word_once_and_the_stock_side_does_not(
    provider: str, mix: tuple[str, ...]
) -> None:
    """Same faults: the stock service loses words; ResilientLLM loses, repeats and misreports none."""
    config = LLMChaosConfig(
        provider=provider,
        seed=3,
        turns=3,
        faults=2,
        mix=mix,
        idle=0.8,
        turn_limit=5.0,
        continuation_hold_s=3.0,
    )
    report = await run_llm_chaos(config)
    assert report.ok, format_table(report)
    assert report.resilient.unanswered == [] and report.resilient.errors == 0
    assert report.stock.words["lost"] and not report.stock.honest
    assert report.resilient.recoveries or report.resilient.connections == 1
    assert "every word heard once" in format_table(report)


def test_the_schedule_is_seeded_and_checked() -> None:
    """The same seed gives the same schedule; bad settings fail at once."""
    config = LLMChaosConfig(seed=9, turns=5, faults=3)
    assert make_schedule(config) == make_schedule(config)
    assert sum(turn.fault is not None for turn in make_schedule(config)) == 3
    with pytest.raises(ValueError, match="cannot schedule"):
        LLMChaosConfig(provider="openai-realtime", mix=("silent",))
    with pytest.raises(ValueError, match="bundles"):
        LLMChaosConfig(provider="openai-realtime", transcript="bundled")
    with pytest.raises(SystemExit):
        main(["--provider", "nope"])


def test_every_question_of_a_long_schedule_is_asked_once() -> None:
    """The emulated model answers a question by its text: a question asked twice in a schedule would
    get the later answer both times (and the bench would blame the processor)."""
    from pipecat_resilient.chaos_llm import LLMChaosConfig, make_schedule

    schedule = make_schedule(LLMChaosConfig(turns=300, faults=100))
    assert len({turn.question for turn in schedule}) == 300


async def test_a_turn_is_over_when_its_own_words_were_heard_not_when_enough_words_were() -> None:
    """Words heard twice must not make the bench call a turn over before its continuation plays.

    With Gemini Live's output transcription trailing its audio, each cut leaves
    a word or two heard whose transcription never came; the continuation says
    them again (by design: the transcription never named them). Counted as
    words heard, those extra words had the bench take a cut turn as answered
    as soon as the cut reply was closed, ask the next question over the
    continuation (the model drops the rest of the answer for the new input),
    and blame ResilientLLM for the words it lost.
    """
    from pipecat_resilient.chaos_llm import _side

    config = LLMChaosConfig(
        provider="gemini-live",
        seed=1,
        turns=9,
        faults=9,
        mix=("close-1011",),
        continuation="restart",
        transcript="after_audio",
        idle=1.0,
        turn_limit=5.0,
    )
    report = await _side(config, make_schedule(config), resilient=True)
    assert report.words["lost"] == [] and report.unanswered == [], report.words
    assert report.words["unheard_in_context"] == [] and report.errors == 0, report.words
    # Every answer was heard in full, in order, each turn after the one before.
    expected = report.words["expected"]
    assert report.words["heard"] == expected + len(report.words["repeated"])
