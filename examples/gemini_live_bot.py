"""A Gemini Live voice bot whose session survives 1007s, 1011s, dropped sockets and GoAways.

The usual speech-to-speech pipeline, with one change: the LLM is
``ResilientLLM`` around a *factory* of the stock ``GeminiLiveLLMService``. A
reply cut by a drop is closed and finished on a fresh session, what the user
says meanwhile is kept, tool results reach the model once, and a GoAway moves
the call to a fresh session at the next turn boundary.

Install and run (key in the environment or a ``.env`` file)::

    pip install "pipecat-resilient[google]" "pipecat-ai[runner,webrtc,silero]" python-dotenv
    export GOOGLE_API_KEY=...
    python examples/gemini_live_bot.py      # then open http://localhost:7860/client
"""

import os

from dotenv import load_dotenv
from loguru import logger
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import LLMRunFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.services.google.gemini_live.llm import GeminiLiveLLMService
from pipecat.services.llm_service import FunctionCallParams
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.workers.runner import WorkerRunner

from pipecat_resilient import RecoveryReport, ReplayPolicy, ResilientLLM, RetryPolicy

load_dotenv(override=True)

WEATHER = FunctionSchema(
    name="get_weather",
    description="The current weather in a city.",
    properties={"city": {"type": "string"}},
    required=["city"],
)


async def get_weather(params: FunctionCallParams) -> None:
    """A tool: runs once per call, even when the session drops while it runs."""
    await params.result_callback({"city": params.arguments["city"], "conditions": "sunny", "celsius": 21})


def make_gemini() -> GeminiLiveLLMService:
    """A fresh stock Gemini Live service. ResilientLLM calls this for every new session."""
    service = GeminiLiveLLMService(
        api_key=os.environ["GOOGLE_API_KEY"],
        system_instruction="You are a friendly assistant on a phone call. Keep answers short.",
    )
    service.register_function("get_weather", get_weather)
    return service


def make_llm() -> ResilientLLM:
    """The speech-to-speech stage: drop-in replacement for `make_gemini()` in the pipeline."""
    llm = ResilientLLM(
        make_gemini,
        retry=RetryPolicy(attempts=4, timeout=10.0),
        replay=ReplayPolicy(answer_again=True, max_buffered_input_s=20.0),
        first_token_timeout=6.0,  # no reply this long after the user's turn: the session is dead
    )

    @llm.event_handler("on_connection_recovered")
    async def on_recovered(llm: ResilientLLM, report: RecoveryReport) -> None:
        logger.info(f"Gemini session back after {report.downtime:.2f}s ({report.attempts} attempt(s))")

    return llm


async def run_bot(transport: BaseTransport, runner_args: RunnerArguments) -> None:
    """Build and run the pipeline on ``transport``."""
    context = LLMContext(tools=ToolsSchema(standard_tools=[WEATHER]))
    aggregators = LLMContextAggregatorPair(context)
    pipeline = Pipeline(
        [
            transport.input(),
            aggregators.user(),
            make_llm(),  # was: make_gemini()
            transport.output(),
            aggregators.assistant(),
        ]
    )
    worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True))

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport: BaseTransport, client: object) -> None:
        context.add_message({"role": "user", "content": "Say hello."})
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
