"""The ledger's cost per frame against the length of the turn: flat from 1k to 100k tokens.

One open LLM turn of N tokens streams through a :class:`~pipecat_resilient.ledger.Ledger`
as ResilientTTS drives it: each token accepted and fed, each sentence handed to
the provider, its audio pushed in chunks and its words timed. Prints the
ledger's CPU time per token for each N, and the ratio of the largest to the
smallest (the target: within 2x at 100k tokens against 1k).

    python benchmarks/ledger_cost.py [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import time

from pipecat_resilient.ledger import Ledger

CHAR_S = 0.01
WORDS = ("the", "appointment", "is", "confirmed", "for", "tuesday", "at", "ten", "with", "doctor", "patel.")


class _Frame:
    """A stand-in frame (the ledger only needs identity)."""


def one_turn(tokens: int) -> float:
    """CPU seconds the ledger spends on an open turn of ``tokens`` tokens."""
    ledger = Ledger(speaking_rate=1 / CHAR_S)
    started = time.process_time()
    turn = ledger.turn_started(_Frame())
    ledger.to_feed()
    sentence: list[str] = []
    sentence_start = 0
    spoken = 0  # characters of the turn's text voiced so far
    for index in range(tokens):
        word = WORDS[index % len(WORDS)]
        ledger.text_accepted(word + " ", source=_Frame())
        ledger.to_feed()
        sentence.append(word)
        if word.endswith("."):
            text = " ".join(sentence) + " "
            ledger.text_handed(turn, "c", text, now=0.0)
            # Its audio in chunks of five characters, then its word timings.
            for start in range(0, len(text), 5):
                ledger.audio_pushed("c", min(5, len(text) - start) * CHAR_S, now=0.0)
                ledger.context_text(turn)
            position, timings = sentence_start, []
            for word_ in sentence:
                begin = (position - 0) * CHAR_S
                timings.append((word_, begin, begin + len(word_) * CHAR_S))
                position += len(word_) + 1
            ledger.words_timed("c", timings)
            ledger.context_text(turn)
            spoken += len(text)
            sentence_start = spoken
            sentence = []
    elapsed = time.process_time() - started
    assert turn.voiced > 0.9 * spoken, "the benchmark must exercise the evidence path"
    return elapsed


def main(sizes: list[int]) -> None:
    per_token = {}
    for size in sizes:
        best = min(one_turn(size) for _ in range(3))
        per_token[size] = best / size
        print(
            f"{size:>7} tokens in one turn: {best * 1000:8.1f} ms ledger time, "
            f"{per_token[size] * 1e6:6.2f} us/token"
        )
    ratio = per_token[max(sizes)] / per_token[min(sizes)]
    print(f"per-token cost at {max(sizes)} against {min(sizes)} tokens: {ratio:.2f}x (target: within 2x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    args = parser.parse_args()
    main([int(size) for size in args.sizes.split(",")])
