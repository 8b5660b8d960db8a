"""A testing kit: local provider emulators with fault plans, and a listener.

The stock Pipecat services talk to these emulators over real sockets on
127.0.0.1, so a test exercises the real service code against failures that
cannot be caused on the real providers: a 1012 restart mid-sentence, a socket
that goes half-open, a reconnect refused with 503 or 401. The audio is a
speech code that spells out its text, so what a listener heard can be decoded
from the audio itself.

* :class:`ElevenLabsEmulator` - ElevenLabs multi-stream-input websocket TTS.
* :class:`CartesiaEmulator` - Cartesia's websocket TTS, with word timestamps
  grouped and ordered against the audio as the real service may send them.
* :class:`GeminiLiveEmulator` - Gemini Live (BidiGenerateContent) over TLS, with
  scripted replies and tool calls (:class:`ToolCall`), session resumption, GoAway,
  a model that continues, restarts or repeats a cut reply, transcription ahead
  of or behind its audio, and replies that come silent (:class:`Silent`), go
  quiet or never come (a muted session).
* :class:`OpenAITTSEmulator` - OpenAI's HTTP text-to-speech (``/v1/audio/speech``),
  streamed PCM cut anywhere: a reset, a truncated body, a stall.
* :class:`DeepgramTTSEmulator` - Deepgram's websocket TTS (``/v1/speak``), no word
  timings, audio chunks that cut through words.
* :class:`OpenAIEmulator` - the OpenAI chat-completions streaming API (SSE), with
  scripted replies and tool calls (:class:`ChatToolCall`).
* :class:`OpenAIRealtimeEmulator` - the OpenAI Realtime websocket API, with a model
  that continues, restarts or repeats a cut reply, transcripts ahead of or behind
  their audio, error events with the socket open, and the 60-minute session limit.
* :class:`DeepgramSTTEmulator` - Deepgram's live transcription websocket (``/v1/listen``):
  it transcribes the speech code it receives, with finals grouped and held back.
* :class:`DeepgramFluxEmulator` - Deepgram Flux's turn-taking websocket (``/v2/listen``):
  ``StartOfTurn``, ``Update`` and ``EndOfTurn`` of the speech code it receives.
* :class:`AssemblyAIEmulator` - AssemblyAI's streaming v3 websocket.
* :class:`Caller`, :class:`STTScenario` - a caller speaking a script into a
  speech-to-text processor, and what reached the transcripts and the context.
* :class:`Fault`, :class:`FaultPlan` - what goes wrong, on which connection, when.
* Outages, the same on every emulator (:class:`OutageSwitch`): take the whole
  provider down for a while and bring it back. ``emulator.outage(mode="refuse"
  | "stall" | "hang", status=503, seconds=None, retry_after=None,
  drop_existing=True)`` starts one now (every new handshake or request is
  refused with ``status``, accepted and then never answered, or never
  answered at all; the open connections are cut), for ``seconds`` of the event
  loop's clock or until ``emulator.restore()``; ``emulator.outage_active``,
  ``await emulator.wait_restored()``, and ``emulator.outages`` (one
  :class:`Outage` each: when it started and ended, what it cut and answered)
  with ``emulator.time_in_outage()`` for a bench. Outages take precedence over
  fault plans.
* :class:`Scenario` - a pipeline around a TTS processor with a :class:`Listener`
  and Pipecat's own assistant aggregator, to assert on what was heard and
  what the LLM context received.
* :class:`SpeechDecoder`, :func:`encode` - the speech code itself.
"""

from pipecat_resilient.testing.assemblyai import AssemblyAIEmulator
from pipecat_resilient.testing.cartesia import CartesiaEmulator
from pipecat_resilient.testing.deepgram_flux import DeepgramFluxEmulator
from pipecat_resilient.testing.deepgram_stt import DeepgramSTTEmulator
from pipecat_resilient.testing.deepgram_tts import DeepgramTTSEmulator
from pipecat_resilient.testing.elevenlabs import ElevenLabsEmulator
from pipecat_resilient.testing.faults import Fault, FaultKind, FaultPlan
from pipecat_resilient.testing.gemini_live import GeminiLiveEmulator, Silent, ToolCall
from pipecat_resilient.testing.harness import Listener, Scenario, SessionScenario, UpstreamRecorder
from pipecat_resilient.testing.openai import ChatToolCall, OpenAIEmulator
from pipecat_resilient.testing.openai_realtime import OpenAIRealtimeEmulator
from pipecat_resilient.testing.openai_tts import OpenAITTSEmulator
from pipecat_resilient.testing.outage import Outage, OutageMode, OutageSwitch
from pipecat_resilient.testing.speech import HeardWord, SpeechDecoder, encode
from pipecat_resilient.testing.stt_harness import Caller, STTScenario

__all__ = [
    "AssemblyAIEmulator",
    "Caller",
    "CartesiaEmulator",
    "ChatToolCall",
    "DeepgramFluxEmulator",
    "DeepgramSTTEmulator",
    "DeepgramTTSEmulator",
    "ElevenLabsEmulator",
    "Fault",
    "FaultKind",
    "FaultPlan",
    "GeminiLiveEmulator",
    "HeardWord",
    "Listener",
    "OpenAIEmulator",
    "OpenAIRealtimeEmulator",
    "OpenAITTSEmulator",
    "Outage",
    "OutageMode",
    "OutageSwitch",
    "Scenario",
    "STTScenario",
    "SessionScenario",
    "Silent",
    "SpeechDecoder",
    "ToolCall",
    "UpstreamRecorder",
    "encode",
]
