"""A voice bot whose LLM stream and ElevenLabs voice survive dropped connections without losing a word.

The usual Pipecat pipeline (transport, STT, user aggregator, LLM, TTS,
transport, assistant aggregator), with two changes: the LLM is
``ResilientLLM`` around a factory of the stock ``OpenAILLMService``, and the
TTS is ``ResilientTTS`` around a *factory* of the stock ``ElevenLabsTTSService``.

Install and run (keys in the environment or a ``.env`` file)::

    pip install "pipecat-resilient[elevenlabs]" "pipecat-ai[deepgram,openai,runner,webrtc]" python-dotenv
    export DEEPGRAM_API_KEY=... OPENAI_API_KEY=... ELEVENLABS_API_KEY=... ELEVENLABS_VOICE_ID=...
    python examples/voice_bot_elevenlabs.py      # then open http://localhost:7860/client

To watch it recover without waiting for ElevenLabs to drop you, point the
factory at the embedded emulator (``ElevenLabsEmulator``) with a fault plan,
as the demo does: ``python -m pipecat_resilient demo``.
"""

import os

from dotenv import load_dotenv
from loguru import logger
from pipecat.frames.frames import LLMRunFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.workers.runner import WorkerRunner

from pipecat_resilient import Failure, RecoveryReport, ReplayFailed, ResilientLLM, ResilientTTS, RetryPolicy

load_dotenv(override=True)


def make_elevenlabs() -> ElevenLabsTTSService:
    """A fresh stock ElevenLabs service. ResilientTTS calls this for every (re)connection."""
    return ElevenLabsTTSService(
        api_key=os.environ["ELEVENLABS_API_KEY"],
        settings=ElevenLabsTTSService.Settings(voice=os.environ["ELEVENLABS_VOICE_ID"]),
    )


def make_tts() -> ResilientTTS:
    """The TTS stage: drop-in replacement for `make_elevenlabs()` in the pipeline."""
    tts = ResilientTTS(
        make_elevenlabs,
        retry=RetryPolicy(attempts=4, timeout=10.0),  # then one ErrorFrame, and is_usable=False
        first_audio_timeout=2.0,  # a half-open socket is caught in ~2 s, not 20 s
    )

    @tts.event_handler("on_connection_lost")
    async def on_lost(tts: ResilientTTS, failure: Failure) -> None:
        logger.warning(f"TTS connection lost: {failure.description}")

    @tts.event_handler("on_connection_recovered")
    async def on_recovered(tts: ResilientTTS, report: RecoveryReport) -> None:
        logger.info(f"TTS back after {report.downtime:.2f}s, replayed {report.replayed_chars} characters")

    @tts.event_handler("on_connection_given_up")
    async def on_given_up(tts: ResilientTTS, error: ReplayFailed) -> None:
        logger.error(f"TTS gave up: {error}")

    return tts


async def run_bot(transport: BaseTransport, runner_args: RunnerArguments) -> None:
    """Build and run the pipeline on ``transport``."""
    stt = DeepgramSTTService(api_key=os.environ["DEEPGRAM_API_KEY"])
    # A broken answer stream is retried (before any text) or continued (after some).
    llm = ResilientLLM(lambda: OpenAILLMService(api_key=os.environ["OPENAI_API_KEY"]))
    tts = make_tts()

    context = LLMContext(
        [{"role": "system", "content": "You are a friendly assistant on a phone call. Keep answers short."}]
    )
    aggregators = LLMContextAggregatorPair(context)

    pipeline = Pipeline(
        [
            transport.input(),
            stt,
            aggregators.user(),
            llm,  # was: OpenAILLMService(...)
            tts,  # was: ElevenLabsTTSService(...)
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
