"""Account for words: what was meant, what a listener heard, what the context recorded.

:func:`account` aligns the three word sequences (with :mod:`difflib`, so a
repeated or missing word is found where it happened, not just counted) and
returns a :class:`WordAccount` with the four numbers that matter:

* ``lost``: meant to be said, never heard;
* ``repeated``: heard more often than meant (said twice);
* ``unheard_in_context``: in the LLM context, never heard (the context lies);
* ``heard_not_in_context``: heard, missing from the context (the bot will
  repeat itself).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["WordAccount", "account"]


@dataclass(frozen=True, slots=True)
class WordAccount:
    """How three word sequences line up.

    Parameters:
        expected: Words that were meant to be said.
        heard: Words a listener heard in full.
        context: Words the LLM context recorded.
        lost: Expected words never heard.
        repeated: Heard words beyond what was expected (said twice).
        unheard_in_context: Context words never heard.
        heard_not_in_context: Heard words missing from the context.
    """

    expected: tuple[str, ...]
    heard: tuple[str, ...]
    context: tuple[str, ...]
    lost: tuple[str, ...]
    repeated: tuple[str, ...]
    unheard_in_context: tuple[str, ...]
    heard_not_in_context: tuple[str, ...]

    @property
    def honest(self) -> bool:
        """Nothing lost, nothing repeated, and the context equals what was heard."""
        return not (self.lost or self.repeated or self.unheard_in_context or self.heard_not_in_context)


def _difference(a: Sequence[str], b: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Words only in ``a`` and words only in ``b``, after aligning them."""
    only_a: list[str] = []
    only_b: list[str] = []
    matcher = difflib.SequenceMatcher(a=list(a), b=list(b), autojunk=False)
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag in ("delete", "replace"):
            only_a.extend(a[a0:a1])
        if tag in ("insert", "replace"):
            only_b.extend(b[b0:b1])
    return tuple(only_a), tuple(only_b)


def account(expected: Sequence[str], heard: Sequence[str], context: Sequence[str]) -> WordAccount:
    """Align what was meant, heard and recorded.

    Args:
        expected: Words meant to be said (interrupted words excluded).
        heard: Words a listener heard in full, in order.
        context: Words the LLM context recorded, in order.

    Returns:
        The account.
    """
    lost, repeated = _difference(expected, heard)
    heard_missing, unheard = _difference(heard, context)
    return WordAccount(
        expected=tuple(expected),
        heard=tuple(heard),
        context=tuple(context),
        lost=lost,
        repeated=repeated,
        unheard_in_context=unheard,
        heard_not_in_context=heard_missing,
    )
