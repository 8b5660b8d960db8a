"""What differs between providers, one small module per provider.

:func:`tts_adapter_for` picks the adapter for a stock TTS service by the name
of its class (or of a class it derives from), without importing any provider
SDK. A service with no adapter of its own gets the generic one
(:class:`~pipecat_resilient.providers._base.TTSAdapter`), which works with any
stock TTS service on the word timings Pipecat reports.

Adding a provider: write ``providers/<name>.py`` with a ``TTSAdapter`` subclass
(what its protocol says about word timings, errors and closes), and add its
stock class name to ``_TTS`` below.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipecat_resilient.providers._base import AdapterSink, TTSAdapter, WordTiming

__all__ = ["AdapterSink", "TTSAdapter", "WordTiming", "tts_adapter_for"]

# Stock service class name -> "module:class" of its adapter.
_TTS = {
    "ElevenLabsTTSService": "pipecat_resilient.providers.elevenlabs:ElevenLabsAdapter",
    "CartesiaTTSService": "pipecat_resilient.providers.cartesia:CartesiaAdapter",
    "DeepgramTTSService": "pipecat_resilient.providers.deepgram:DeepgramAdapter",
    "OpenAITTSService": "pipecat_resilient.providers.openai:OpenAITTSAdapter",
}


def tts_adapter_for(service: Any) -> TTSAdapter:
    """The adapter for a stock TTS service (the generic one when it has none of its own)."""
    for cls in type(service).__mro__:
        target = _TTS.get(cls.__name__)
        if target is not None:
            module, name = target.split(":")
            adapter: TTSAdapter = getattr(importlib.import_module(module), name)()
            return adapter
    return TTSAdapter()
