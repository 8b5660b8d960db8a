"""The README's commands, the CI script and the examples stay in step with the code."""

from __future__ import annotations

import py_compile
import re
from pathlib import Path

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
