"""The stack most Pipecat bots run (Deepgram, OpenAI, Cartesia), every stage resilient.

The usual pipeline (transport, STT, user aggregator, LLM, TTS, transport,
assistant aggregator) with each service replaced by its resilient wrapper
around a *factory* of the same stock service:

* ``ResilientSTT`` around ``DeepgramSTTService``: audio sent while the socket
  was down is sent again to a fresh one, so no words of the caller are lost.
* ``ResilientLLM`` around ``OpenAILLMService``: a broken answer stream is
  retried (before any text) or continued (after some); with
  ``OPENAI_FALLBACK_BASE_URL`` set, a second OpenAI-compatible endpoint takes
  over while the first is down.
* ``ResilientTTS`` around ``CartesiaTTSService``, with a warm standby
  connection (a drop costs no handshake) and, with ElevenLabs keys set,
  ElevenLabs as the fallback voice while Cartesia is down (kept for the rest of
  the call: ``switch_back="never"``, so the voice changes at most once).
* With ``REDIS_URL`` set, provider health is shared by every bot process
  (``RedisHealthStore``): one bot finding Cartesia down spares the others the
  attempt, and a single probe fleet-wide tells when it is back.

Install and run (keys in the environment or a ``.env`` file)::

    pip install "pipecat-resilient[cartesia,deepgram,openai]" "pipecat-ai[runner,webrtc]" python-dotenv
    # optional: pip install "pipecat-resilient[elevenlabs,redis]"
    export DEEPGRAM_API_KEY=... OPENAI_API_KEY=... CARTESIA_API_KEY=... CARTESIA_VOICE_ID=...
    python examples/voice_bot_cartesia.py      # then open http://localhost:7860/client

To watch the wrappers recover without waiting for a provider to drop you,
run the side-by-side demo on the embedded emulators:
``python -m pipecat_resilient demo``.
"""

import os
from collections.abc import Callable

from dotenv import load_dotenv
from loguru import logger
from pipecat.frames.frames import LLMRunFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.services.cartesia.tts import CartesiaTTSService
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.llm_service import LLMService
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.tts_service import TTSService
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.workers.runner import WorkerRunner

from pipecat_resilient import (
    Failure,
    HealthStore,
    ReplayFailed,
    ResilientLLM,
    ResilientSTT,
    ResilientTTS,
    RetryPolicy,
    default_store,
)

load_dotenv(override=True)


def health_store() -> HealthStore:
    """Provider health shared across the fleet with ``REDIS_URL``, else within this process."""
    url = os.environ.get("REDIS_URL")
    if not url:
        return default_store()
    from pipecat_resilient import RedisHealthStore  # the `redis` extra

    # If Redis cannot be reached, the store answers from local state within
    # 0.2 s (one warning): a call is never blocked on Redis.
    return RedisHealthStore(url, prefix="voicebot")


def make_stt() -> ResilientSTT:
    """Speech to text: drop-in for ``DeepgramSTTService(...)``."""
    return ResilientSTT(lambda: DeepgramSTTService(api_key=os.environ["DEEPGRAM_API_KEY"]))


def make_llm(health: HealthStore) -> ResilientLLM:
    """The LLM: drop-in for ``OpenAILLMService(...)``, with an optional second endpoint."""

    def openai() -> OpenAILLMService:
        return OpenAILLMService(
            api_key=os.environ["OPENAI_API_KEY"], settings=OpenAILLMService.Settings(model="gpt-4o-mini")
        )

    fallbacks: list[Callable[[], LLMService]] = []
    if os.environ.get("OPENAI_FALLBACK_BASE_URL"):

        def second_endpoint() -> OpenAILLMService:
            return OpenAILLMService(
                api_key=os.environ.get("OPENAI_FALLBACK_API_KEY", os.environ["OPENAI_API_KEY"]),
                base_url=os.environ["OPENAI_FALLBACK_BASE_URL"],
                settings=OpenAILLMService.Settings(
                    model=os.environ.get("OPENAI_FALLBACK_MODEL", "gpt-4o-mini")
                ),
            )

        fallbacks.append(second_endpoint)
    return ResilientLLM(openai, fallbacks=fallbacks, health=health)


def make_tts(health: HealthStore) -> ResilientTTS:
    """The voice: drop-in for ``CartesiaTTSService(...)``."""

    def cartesia() -> CartesiaTTSService:
        """A fresh stock Cartesia service. ResilientTTS calls this for every (re)connection."""
        return CartesiaTTSService(
            api_key=os.environ["CARTESIA_API_KEY"],
            settings=CartesiaTTSService.Settings(voice=os.environ["CARTESIA_VOICE_ID"]),
        )

    fallbacks: list[Callable[[], TTSService]] = []
    if os.environ.get("ELEVENLABS_API_KEY") and os.environ.get("ELEVENLABS_VOICE_ID"):
        from pipecat.services.elevenlabs.tts import ElevenLabsTTSService  # the `elevenlabs` extra

        def elevenlabs() -> ElevenLabsTTSService:
            return ElevenLabsTTSService(
                api_key=os.environ["ELEVENLABS_API_KEY"],
                settings=ElevenLabsTTSService.Settings(voice=os.environ["ELEVENLABS_VOICE_ID"]),
            )

        fallbacks.append(elevenlabs)

    tts = ResilientTTS(
        cartesia,
        fallbacks=fallbacks,
        switch_back="never",  # one voice change per call at most
        standby=True,  # one more open Cartesia connection per bot: check your concurrency limit
        health=health,
        retry=RetryPolicy(attempts=4, timeout=10.0),  # then one ErrorFrame, and is_usable=False
    )

    @tts.event_handler("on_connection_lost")
    async def on_lost(tts: ResilientTTS, failure: Failure) -> None:
        logger.warning(f"TTS connection lost: {failure.description}")

    @tts.event_handler("on_provider_switched")
    async def on_switched(tts: ResilientTTS, from_name: str, to_name: str, reason: str) -> None:
        logger.warning(f"TTS moved from {from_name} to {to_name}: {reason}")

    @tts.event_handler("on_connection_given_up")
    async def on_given_up(tts: ResilientTTS, error: ReplayFailed) -> None:
        logger.error(f"TTS gave up: {error}")

    return tts


async def run_bot(transport: BaseTransport, runner_args: RunnerArguments) -> None:
    """Build and run the pipeline on ``transport``."""
    health = health_store()
    stt = make_stt()
    llm = make_llm(health)
    tts = make_tts(health)

    context = LLMContext(
        [{"role": "system", "content": "You are a friendly assistant on a phone call. Keep answers short."}]
    )
    aggregators = LLMContextAggregatorPair(context)

    pipeline = Pipeline(
        [
            transport.input(),
            stt,  # was: DeepgramSTTService(...)
            aggregators.user(),
            llm,  # was: OpenAILLMService(...)
            tts,  # was: CartesiaTTSService(...)
            transport.output(),
            aggregators.assistant(),  # records only what the caller actually heard
        ]
    )
    worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True))

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport: BaseTransport, client: object) -> None:
        context.add_message({"role": "user", "content": "Say hello and introduce yourself."})
        await worker.queue_frames([LLMRunFrame()])

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport: BaseTransport, client: object) -> None:
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(worker)
    await runner.run()


async def bot(runner_args: RunnerArguments) -> None:
    """Entry point of Pipecat's development runner."""
    transport_params = {
        "webrtc": lambda: TransportParams(audio_in_enabled=True, audio_out_enabled=True),
    }
    transport = await create_transport(runner_args, transport_params)
    await run_bot(transport, runner_args)


if __name__ == "__main__":
    from pipecat.runner.run import main

    main()
