"""A testing kit: local provider emulators with fault plans, and a listener.

The stock Pipecat services talk to these emulators over real sockets on
127.0.0.1, so a test exercises the real service code against failures that
cannot be caused on the real providers: a 1012 restart mid-sentence, a socket
that goes half-open, a reconnect refused with 503 or 401. The audio is a
speech code that spells out its text, so what a listener heard can be decoded
from the audio itself.

* :class:`ElevenLabsEmulator` - ElevenLabs multi-stream-input websocket TTS.
* :class:`GeminiLiveEmulator` - Gemini Live (BidiGenerateContent) over TLS, with
  scripted replies and tool calls (:class:`ToolCall`), session resumption, GoAway.
* :class:`OpenAIEmulator` - the OpenAI chat-completions streaming API (SSE), with
  scripted replies and tool calls (:class:`ChatToolCall`).
* :class:`Fault`, :class:`FaultPlan` - what goes wrong, on which connection, when.
* :class:`Scenario` - a pipeline around a TTS processor with a :class:`Listener`
  and Pipecat's own assistant aggregator, to assert on what was heard and
  what the LLM context received.
* :class:`SpeechDecoder`, :func:`encode` - the speech code itself.
"""

from pipecat_resilient.testing.elevenlabs import ElevenLabsEmulator
from pipecat_resilient.testing.faults import Fault, FaultKind, FaultPlan
from pipecat_resilient.testing.gemini_live import GeminiLiveEmulator, ToolCall
from pipecat_resilient.testing.harness import Listener, Scenario, SessionScenario, UpstreamRecorder
from pipecat_resilient.testing.openai import ChatToolCall, OpenAIEmulator
from pipecat_resilient.testing.speech import HeardWord, SpeechDecoder, encode

__all__ = [
    "ChatToolCall",
    "ElevenLabsEmulator",
    "Fault",
    "FaultKind",
    "FaultPlan",
    "GeminiLiveEmulator",
    "HeardWord",
    "Listener",
    "OpenAIEmulator",
    "Scenario",
    "SessionScenario",
    "SpeechDecoder",
    "ToolCall",
    "UpstreamRecorder",
    "encode",
]
