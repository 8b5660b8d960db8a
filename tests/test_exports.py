"""The public API: the top-level __all__ is the union of the modules' __all__."""

from __future__ import annotations

import importlib

import pipecat_resilient
import pipecat_resilient.testing

PUBLIC_MODULES = [
    "audio_journal",
    "errors",
    "failures",
    "health",
    "ledger",
    "llm",
    "policy",
    "redis_health",
    "stt",
    "tts",
]


def test_top_level_exports_are_real_and_documented() -> None:
    """Every exported name exists, and every public class or function has a docstring."""
    for name in pipecat_resilient.__all__:
        obj = getattr(pipecat_resilient, name)
        if callable(obj):
            assert obj.__doc__, f"{name} has no docstring"


def test_top_level_reexports_come_from_the_modules() -> None:
    """Nothing is defined in __init__; each name is listed in its module's __all__."""
    module_names: set[str] = set()
    for module in PUBLIC_MODULES:
        module_names |= set(importlib.import_module(f"pipecat_resilient.{module}").__all__)
    assert set(pipecat_resilient.__all__) <= module_names


def test_testing_kit_exports() -> None:
    """The testing kit's names all resolve."""
    for name in pipecat_resilient.testing.__all__:
        assert getattr(pipecat_resilient.testing, name) is not None


def test_every_module_says_what_it_is_for() -> None:
    """A module docstring on every module."""
    import pkgutil

    for info in pkgutil.walk_packages(pipecat_resilient.__path__, "pipecat_resilient."):
        module = importlib.import_module(info.name)
        assert module.__doc__ and module.__doc__.strip(), f"{info.name} has no module docstring"
