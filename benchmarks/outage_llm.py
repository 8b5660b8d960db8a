"""A long outage of the primary LLM mid-answer: words lost, dead air, probes, and the way back.

Two chains, each against two emulators over real sockets (the stock services
talk to them):

* speech-to-speech: Gemini Live, falling back on another Gemini Live session
  (``GeminiLiveLLMService`` on a second emulator: another key, region or
  model). Reply audio is paced at its own duration, with a 100 ms first-audio
  delay. The user speaks each question (speech-code audio, framed by VAD frames);
* streaming LLM: ``OpenAILLMService`` falling back on a second
  OpenAI-compatible endpoint, tokens paced 20 ms apart after a 100 ms time to
  first token.

A conversation runs, one question after another with a pause between; in the
middle of the second answer the primary goes down for ``--outage-seconds``
(30 by default): its open connection is cut and every new handshake (or
request) is refused with 503. Then it comes back, and the conversation goes
on until the primary was taken back (``switch_back="boundary"``) and answered
twice more, or for three more questions (``"never"``).

Reported, per run: the answer words lost and heard twice, and whether the LLM
context equals what was heard; the dead air from the cut to the fallback's
first audio (or token) downstream, against the fallback's own connect + first
audio (or token), measured in the same run with a bare client (the least any
switch can cost); the handshakes (Gemini Live: probes) or requests
(streaming: answers, each refused) to the primary while it was down, and the
billed requests among them (any that carried conversation or asked for an
answer and was taken in: must be 0); for Gemini Live, what the session that
took the conversation back had been sent when its probe succeeded (its setup
alone) and when it took over (its setup, and the conversation with no answer
asked for); and whether and how long after it came back the primary answered
again.

    python benchmarks/outage_llm.py [--outage-seconds 30] [--runs 3] [--chain gemini|openai|both]
                                    [--switch-back boundary|never|both] [--hold 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import aiohttp
from _common import SENTENCES, median, pct, quiet
from pipecat.frames.frames import LLMTextFrame, UserStartedSpeakingFrame, UserStoppedSpeakingFrame
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.google.gemini_live.llm import GeminiLiveLLMService
from pipecat.services.openai.llm import OpenAILLMService
from websockets.asyncio.client import connect

from pipecat_resilient import BreakerPolicy, Health, LocalHealthStore, ReplayPolicy, ResilientLLM, RetryPolicy
from pipecat_resilient.testing import Fault, FaultPlan, GeminiLiveEmulator, OpenAIEmulator, SessionScenario
from pipecat_resilient.testing.gemini_live import PATH
from pipecat_resilient.testing.llm_harness import LLMScenario
from pipecat_resilient.testing.report import account

MODEL = "models/gemini-2.5-flash-native-audio-preview-12-2025"
FIRST_AUDIO_DELAY = 0.1
MS_PER_CHAR = 5.0  # Gemini Live reply audio
TOKEN_INTERVAL = 0.02  # streaming LLM
# Probes every 5 s at first, then at most every 10 s while it stays down (as benchmarks/outage.py).
POLICY = BreakerPolicy(failures=1, cooldown=5.0, cooldown_max=10.0)
RETRY = RetryPolicy(attempts=6, wait_initial=0.05, wait_max=0.5, timeout=15.0, attempt_timeout=3.0)
PAUSE = 1.0  # between an answer and the next question
CUT_AFTER = 6  # audio chunks (Gemini Live) or tokens (streaming) of the second answer heard before the cut
TURN_LIMIT = 20.0


def questions(count: int) -> list[tuple[str, str]]:
    """``count`` distinct questions, each answered with two sentences."""
    return [
        (f"What about item number {n}?", f"{SENTENCES[n % 4]} {SENTENCES[(n + 1) % 4]}") for n in range(count)
    ]


class Probes(LocalHealthStore):
    """The health store, noting what the primary had been sent when a success of it was recorded."""

    def __init__(self, primary: str, sent: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.primary, self.sent = primary, sent
        self.seen: list[tuple[float, Any]] = []

    def record_success(self, provider: str) -> Coroutine[Any, Any, Health]:  # type: ignore[override]
        if provider == self.primary:
            self.seen.append((time.monotonic(), self.sent()))
        return super().record_success(provider)


def switch_recorder(llm: ResilientLLM, sent: Any) -> list[tuple[float, str, str, Any]]:
    switches: list[tuple[float, str, str, Any]] = []

    @llm.event_handler("on_provider_switched")
    async def switched(processor: Any, old: str, new: str, reason: str) -> None:
        switches.append((time.monotonic(), old, new, sent()))

    return switches


def taken_back(switches: list[tuple[float, str, str, Any]], primary: str, after: float) -> float | None:
    back = [at for at, _, new, _ in switches if new == primary and at >= after]
    return back[0] if back else None


# -- Gemini Live -> another Gemini Live session -----------------------------------------


async def gemini_own_first_audio(backup: GeminiLiveEmulator, question: str) -> float:
    """A bare client's connect, setup and first audio on the fallback (the least a switch can cost)."""
    started = time.monotonic()
    url = f"wss://127.0.0.1:{backup.port}{PATH}"
    async with connect(url, ssl=backup.client_ssl_context, additional_headers={"x-goog-api-key": "k"}) as ws:
        setup = {"model": MODEL, "generationConfig": {"response_modalities": ["AUDIO"]}}
        await ws.send(json.dumps({"setup": setup}))
        await ws.recv()  # setupComplete
        turns = [{"role": "user", "parts": [{"text": question}]}]
        await ws.send(json.dumps({"client_content": {"turns": turns, "turnComplete": True}}))
        while "modelTurn" not in json.loads(await ws.recv()).get("serverContent", {}):
            pass
    return time.monotonic() - started


def gemini_factory(emulator: GeminiLiveEmulator) -> Any:
    def make() -> GeminiLiveLLMService:
        return GeminiLiveLLMService(
            api_key="bench",
            http_options=emulator.http_options(),
            settings=GeminiLiveLLMService.Settings(model=MODEL),
        )

    return make


def answered(listener: Any, words: int) -> Any:
    """Whether ``words`` words were heard and no reply is open."""
    return lambda: len(listener.heard) >= words and listener.started == listener.stopped


def gemini_kinds(emulator: GeminiLiveEmulator, connection: int = -1) -> list[str]:
    """What a connection was sent: message kinds, a seed marked with its turnComplete."""
    if not emulator.connections:
        return []
    kinds = []
    for message in emulator.connections[connection].messages:
        kind = next(iter(message)) if isinstance(message, dict) and message else "?"
        if kind == "client_content":
            kind += f"(turnComplete={message[kind].get('turnComplete')})"
        kinds.append(kind)
    return kinds


async def gemini_run(outage_seconds: float, switch_back: str, hold: float = 0.3) -> dict[str, Any]:
    script = dict(questions(60))
    options = {"ms_per_char": MS_PER_CHAR, "first_audio_delay": FIRST_AUDIO_DELAY, "realtime": True}
    async with (
        GeminiLiveEmulator(script=script, **options) as primary,
        GeminiLiveEmulator(script=script, **options) as backup,
    ):
        own = [await gemini_own_first_audio(backup, question) for question, _ in questions(10)]
        names = ("GeminiLiveLLMService", "GeminiLiveLLMService#2")
        store = Probes(names[0], lambda: gemini_kinds(primary), policy=POLICY)
        llm = ResilientLLM(
            gemini_factory(primary),
            fallbacks=[gemini_factory(backup)],
            health=store,
            switch_back=switch_back,
            retry=RETRY,
            replay=ReplayPolicy(continuation_hold_s=hold),
            first_token_timeout=2.0,
            stall_timeout=2.0,
        )
        switches = switch_recorder(llm, lambda: gemini_kinds(primary))
        run = SessionScenario(llm, primary.samples_per_char())
        await run.start()
        listener = run.listener
        expected: list[str] = []
        cut_at = restored_at = None
        after_back = after_restore = 0
        for number, (question, answer) in enumerate(questions(60)):
            if number:
                await asyncio.sleep(PAUSE)
                await run.send(UserStartedSpeakingFrame())
                await run.speak(question)
                await run.send(UserStoppedSpeakingFrame())
            else:
                await run.start_conversation(question)
            if number == 1:
                # Mid-answer: once some of its audio was heard.
                frames = listener.audio_frames
                await run.wait_until(lambda f=frames: listener.audio_frames >= f + CUT_AFTER, TURN_LIMIT)
                outage = primary.outage("refuse", status=503, seconds=outage_seconds)
                cut_at, restored_at = outage.started_at, outage.ends_at
            expected += answer.split()
            await listener.settle(answered(listener, len(expected)), idle=3.0, limit=TURN_LIMIT)
            if restored_at is None or time.monotonic() < restored_at:
                continue
            after_restore += 1
            if taken_back(switches, names[0], restored_at) is not None:
                after_back += 1
            if after_back >= 2 or (switch_back == "never" and after_restore >= 3):
                break
        await asyncio.sleep(0.3)  # the aggregator writes the last answer into the context
        await run.cancel()
        assert cut_at is not None and restored_at is not None
        words = account(expected, listener.heard, " ".join(run.assistant_texts).split())
        first_after = next(at for at, _ in listener.audio_times if at > cut_at)
        during = [c for c in primary.connections if cut_at <= c.opened_at < restored_at]
        billed = sum(1 for c in during for m in c.messages if not (isinstance(m, dict) and "setup" in m))
        back_at = taken_back(switches, names[0], restored_at)
        probe = next((sent for at, sent in store.seen if at >= restored_at), None)
        at_swap = next((sent for at, _, new, sent in switches if new == names[0]), None)
        # What the session that took the conversation back was sent before the next user turn.
        taken: list[str] | None = None
        if back_at is not None:
            index = max(i for i, c in enumerate(primary.connections) if c.opened_at < back_at)
            kinds = gemini_kinds(primary, index)
            taken = kinds[: kinds.index("realtime_input")] if "realtime_input" in kinds else kinds
        after = [c for c in primary.connections if c.opened_at >= restored_at]
        return {
            **_shared_figures(expected, words, run.errors, first_after - cut_at, own, during),
            "billed_during": billed,
            "probe_sent": probe,
            "swap_sent": at_swap,
            "taken_sent": taken,
            "handshakes_after": len(after),
            "back_after": back_at - restored_at if back_at is not None else None,
            "switches": [(old, new) for _, old, new, _ in switches],
        }


# -- OpenAI streaming LLM -> a second OpenAI-compatible endpoint ------------------------


async def openai_own_first_token(backup: OpenAIEmulator, question: str) -> float:
    """A bare client's request and first token on the fallback, on a fresh connection."""
    started = time.monotonic()
    body = {"model": "gpt-4.1", "stream": True, "messages": [{"role": "user", "content": question}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{backup.base_url}/chat/completions", json=body) as response,
    ):
        async for line in response.content:
            if line.startswith(b"data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    break
    return time.monotonic() - started


def openai_factory(emulator: OpenAIEmulator) -> Any:
    return lambda: OpenAILLMService(api_key="bench", base_url=emulator.base_url)


async def openai_run(outage_seconds: float, switch_back: str, hold: float = 0.3) -> dict[str, Any]:
    script = dict(questions(60))
    options = {
        "replies": script,
        "chunk_interval": TOKEN_INTERVAL,
        "plan": FaultPlan(Fault.delay_first_audio(FIRST_AUDIO_DELAY, connection=None)),
    }
    async with OpenAIEmulator(**options) as primary, OpenAIEmulator(**options) as backup:  # type: ignore[arg-type]
        own = [await openai_own_first_token(backup, question) for question, _ in questions(10)]
        first_backup = len(backup.requests)
        names = ("OpenAILLMService", "OpenAILLMService#2")
        llm = ResilientLLM(
            openai_factory(primary),
            fallbacks=[openai_factory(backup)],
            health=LocalHealthStore(policy=POLICY),
            switch_back=switch_back,
            retry=RETRY,
            first_token_timeout=2.0,
            stall_timeout=2.0,
        )
        switches = switch_recorder(llm, lambda: None)
        run = LLMScenario(llm, context=LLMContext())
        await run.start()
        expected: list[str] = []
        cut_at = restored_at = None
        after_back = after_restore = 0
        for number, (question, answer) in enumerate(questions(60)):
            if number:
                await asyncio.sleep(PAUSE)
            await run.ask(question)
            if number == 1:
                texts = len(run.texts)
                await run.wait_until(lambda t=texts: len(run.texts) >= t + CUT_AFTER, TURN_LIMIT)
                outage = primary.outage("refuse", status=503, seconds=outage_seconds)
                cut_at, restored_at = outage.started_at, outage.ends_at
            expected += answer.split()
            await run.wait_until(lambda n=number: run.responses_ended >= n + 1, TURN_LIMIT)
            if restored_at is None or time.monotonic() < restored_at:
                continue
            after_restore += 1
            if taken_back(switches, names[0], restored_at) is not None:
                after_back += 1
            if after_back >= 2 or (switch_back == "never" and after_restore >= 3):
                break
        await run.end()
        assert cut_at is not None and restored_at is not None
        heard = " ".join(run.responses).split()
        words = account(expected, heard, " ".join(run.assistant_texts).split())
        first_after = next(p.at for p in run.timeline.of(LLMTextFrame) if p.at > cut_at)
        during = [r for r in primary.requests if cut_at <= r.received_at < restored_at]
        answered_by_primary = [r for r in primary.requests if r.received_at >= restored_at and r.completed]
        back_at = answered_by_primary[0].received_at if answered_by_primary else None
        return {
            **_shared_figures(expected, words, run.errors, first_after - cut_at, own, during),
            "billed_during": sum(1 for r in during if r.chunks_sent),
            "fallback_requests": len(backup.requests) - first_backup,
            "back_after": back_at - restored_at if back_at is not None else None,
            "switches": [(old, new) for _, old, new, _ in switches],
        }


def _shared_figures(
    expected: list[str], words: Any, errors: list[Any], dead_air: float, own: list[float], during: list[Any]
) -> dict[str, Any]:
    """The figures both chains report: words, honesty, dead air, the fallback's own time, probes."""
    return {
        "words": len(expected),
        "lost": len(words.lost),
        "twice": len(words.repeated),
        "honest": not (words.unheard_in_context or words.heard_not_in_context),
        "errors": len(errors),
        "dead_air": dead_air,
        "fallback_own": median(own),
        "probes_during": len(during),
    }


# -- report -----------------------------------------------------------------------------


def report(chain: str, switch_back: str, outage_seconds: float, results: list[dict[str, Any]]) -> None:
    what = {
        "gemini": "Gemini Live -> another Gemini Live session (audio; first audio delay 100 ms each)",
        "openai": "OpenAILLMService -> a second OpenAI-compatible endpoint (tokens; first token 100 ms each)",
    }[chain]
    unit = "audio" if chain == "gemini" else "token"
    print(f"\n{what}; primary down {outage_seconds:g}s mid-answer; switch_back={switch_back!r}")
    for number, r in enumerate(results, 1):
        back = (
            "not taken back" if r["back_after"] is None else f"back {r['back_after']:.1f}s after it came back"
        )
        print(
            f"run {number}: {r['words']} answer words: lost {r['lost']}, twice {r['twice']}, "
            f"context == heard: {r['honest']}, error frames {r['errors']}; "
            f"switches {', '.join(f'{a}->{b} x{n}' for (a, b), n in Counter(r['switches']).items())}"
        )
        probes = "handshakes" if chain == "gemini" else "requests (refused)"
        excess = r["dead_air"] - r["fallback_own"]
        print(
            f"  dead air {r['dead_air'] * 1000:.0f} ms (fallback's own connect + first {unit} "
            f"{r['fallback_own'] * 1000:.0f} ms; excess {excess * 1000:.0f} ms); "
            f"{probes} to the primary while down {r['probes_during']}, billed {r['billed_during']}; {back}"
        )
        if chain == "gemini" and r["back_after"] is not None:
            print(
                f"  the primary's probe, when it succeeded, had been sent {r['probe_sent']}; the session "
                f"that took over, before the next user turn: {r['taken_sent']}"
            )
        elif chain == "gemini":
            print(f"  handshakes to the primary after it came back: {r['handshakes_after']}")
    excess = [r["dead_air"] - r["fallback_own"] for r in results]
    print(
        f"dead air beyond the fallback's own connect + first {unit}: p50 {pct(excess, 0.5) * 1000:.0f} ms, "
        f"max {max(excess) * 1000:.0f} ms"
    )


async def main(outage_seconds: float, runs: int, chains: list[str], policies: list[str], hold: float) -> None:
    quiet()
    for chain in chains:
        for switch_back in policies:
            one = gemini_run if chain == "gemini" else openai_run
            results = [await one(outage_seconds, switch_back, hold) for _ in range(runs)]
            report(chain, switch_back, outage_seconds, results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage-seconds", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chain", choices=("gemini", "openai", "both"), default="both")
    parser.add_argument("--switch-back", choices=("boundary", "never", "both"), default="both")
    parser.add_argument(
        "--hold",
        type=float,
        default=0.3,
        help="Gemini Live: ReplayPolicy.continuation_hold_s (0: a continuation plays as it comes, unchecked)",
    )
    args = parser.parse_args()
    chains = ["gemini", "openai"] if args.chain == "both" else [args.chain]
    policies = ["boundary", "never"] if args.switch_back == "both" else [args.switch_back]
    asyncio.run(main(args.outage_seconds, args.runs, chains, policies, args.hold))
