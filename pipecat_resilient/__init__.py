"""Drop-in Pipecat processors that survive provider connection failures without losing a word.

:class:`ResilientTTS` takes the place of a stock TTS service, :class:`ResilientLLM`
of a stock LLM service (streaming or speech-to-speech), :class:`ResilientSTT` of a
stock speech-to-text service. It hosts one
live instance at a time, made by a factory; when the provider's socket drops
it connects a fresh instance and replays what the listener has not heard yet,
and the LLM context only ever records words whose audio went out.

The testing kit (local provider emulators with fault plans) lives in
:mod:`pipecat_resilient.testing`.
"""

from pipecat_resilient.audio_journal import AudioJournal
from pipecat_resilient.errors import InvalidState, ReplayFailed, ResilienceError
from pipecat_resilient.failures import Failure, Verdict
from pipecat_resilient.health import (
    DEFAULT_BREAKER,
    BreakerPolicy,
    Health,
    HealthStore,
    LocalHealthStore,
    default_store,
)
from pipecat_resilient.ledger import Ledger, State
from pipecat_resilient.llm import ResilientLLM
from pipecat_resilient.policy import DEFAULT_REPLAY, DEFAULT_RETRY, ReplayPolicy, RetryPolicy
from pipecat_resilient.redis_health import RedisHealthStore
from pipecat_resilient.stt import ResilientSTT, STTRecoveryReport
from pipecat_resilient.tts import RecoveryReport, ResilientTTS

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BREAKER",
    "DEFAULT_REPLAY",
    "DEFAULT_RETRY",
    "AudioJournal",
    "BreakerPolicy",
    "Failure",
    "Health",
    "HealthStore",
    "InvalidState",
    "Ledger",
    "LocalHealthStore",
    "RecoveryReport",
    "RedisHealthStore",
    "ReplayFailed",
    "ReplayPolicy",
    "ResilienceError",
    "ResilientLLM",
    "ResilientSTT",
    "ResilientTTS",
    "RetryPolicy",
    "STTRecoveryReport",
    "State",
    "Verdict",
    "default_store",
]
