"""The README's commands, the CI script and the examples stay in step with the code."""

from __future__ import annotations

import py_compile
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README has no 'Two commands' block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_gives_exactly_two_commands() -> None:
    """One sets up and runs the demo, one sets up and runs the tests."""
    demo, tests = readme_commands()
    assert "pipecat_resilient demo" in demo and "pip install" in demo
    assert "pytest" in tests and ".[test]" in tests


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs the README's test command verbatim."""
    _, tests = readme_commands()
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_examples_compile() -> None:
    """Every example is valid Python (they need provider keys to run)."""
    examples = sorted((ROOT / "examples").glob("*.py"))
    assert examples
    for path in examples:
        py_compile.compile(str(path), doraise=True)


def test_changelog_has_an_unreleased_section() -> None:
    """Keep a Changelog format."""
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text and "### Added" in text


def test_the_cartesia_example_builds_every_stage_with_the_installed_pipecat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The example of the usual stack (Deepgram, OpenAI, Cartesia) makes its wrappers as it says:
    a second OpenAI endpoint and ElevenLabs as fallbacks when their settings are given, none
    otherwise, and the shared Redis store with ``REDIS_URL`` (no connection is made here)."""
    import importlib.util

    from pipecat_resilient import LocalHealthStore, RedisHealthStore, ResilientSTT

    for name, value in {
        "DEEPGRAM_API_KEY": "d",
        "OPENAI_API_KEY": "o",
        "CARTESIA_API_KEY": "c",
        "CARTESIA_VOICE_ID": "v",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("ELEVENLABS_API_KEY", "ELEVENLABS_VOICE_ID", "OPENAI_FALLBACK_BASE_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    spec = importlib.util.spec_from_file_location(
        "voice_bot_cartesia", ROOT / "examples" / "voice_bot_cartesia.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    health = example.health_store()
    assert isinstance(health, LocalHealthStore)
    assert isinstance(example.make_stt(), ResilientSTT)
    assert example.make_llm(health).providers == ["OpenAILLMService"]
    tts = example.make_tts(health)
    assert tts.providers == ["CartesiaTTSService"]

    monkeypatch.setenv("ELEVENLABS_API_KEY", "e")
    monkeypatch.setenv("ELEVENLABS_VOICE_ID", "ev")
    monkeypatch.setenv("OPENAI_FALLBACK_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")
    health = example.health_store()
    assert isinstance(health, RedisHealthStore)
    assert example.make_llm(health).providers == ["OpenAILLMService", "OpenAILLMService#2"]
    assert example.make_tts(health).providers == ["CartesiaTTSService", "ElevenLabsTTSService"]
