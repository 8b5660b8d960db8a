"""Provider kits: each TTS provider's emulator and its stock Pipecat service, built alike.

A :class:`TTSKit` knows how to start a provider's emulator, how to point the
stock Pipecat service at it, and what the provider reports (word timings or
not). The chaos bench, the benchmarks and the tests use them to run the same
workload against every provider::

    kit = tts_kit("cartesia")
    async with kit.emulator(plan=plan, timestamps="grouped") as emulator:
        tts = ResilientTTS(kit.factory(emulator))

OpenAI's HTTP text-to-speech has a kit of its own, :data:`OPENAI_TTS_KIT`
(an :class:`OpenAITTSKit`): one request per sentence takes HTTP faults
(``refuse``, ``abort``, ``close`` as a truncated body, ``stall``, ``hang``)
counted by request, not the websocket fault plans of :data:`TTS_KITS`::

    kit = OPENAI_TTS_KIT
    async with kit.emulator(plan=FaultPlan(Fault.abort(after_audio_chunks=10))) as emulator:
        tts = ResilientTTS(kit.factory(emulator))

The stock services are imported when a kit is used, so a kit for a provider
whose Pipecat extra is not installed fails then, with Pipecat's own message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from pipecat.services.tts_service import TTSService

from pipecat_resilient.testing._server import ConnectionRecord, WebsocketEmulator
from pipecat_resilient.testing.faults import FaultPlan

if TYPE_CHECKING:
    from pipecat_resilient.testing.openai_tts import OpenAITTSEmulator, SpeechRequest

__all__ = ["OPENAI_TTS_KIT", "TTS_KITS", "OpenAITTSKit", "TTSKit", "tts_kit"]


@dataclass(frozen=True)
class TTSKit:
    """One TTS provider: its emulator and its stock service.

    Parameters:
        name: ``"elevenlabs"``, ``"cartesia"`` or ``"deepgram"``.
        timings: Whether the provider reports word timings (without them, what
            was heard of a cut sentence is estimated, and a word or two may be
            said again).
    """

    name: str
    timings: bool = True

    def emulator(self, plan: FaultPlan | None = None, **options: Any) -> WebsocketEmulator:
        """A stopped emulator of this provider (start it with ``async with``)."""
        if self.name == "elevenlabs":
            from pipecat_resilient.testing.elevenlabs import ElevenLabsEmulator

            return ElevenLabsEmulator(plan=plan, **options)
        if self.name == "cartesia":
            from pipecat_resilient.testing.cartesia import CartesiaEmulator

            return CartesiaEmulator(plan=plan, **options)
        from pipecat_resilient.testing.deepgram_tts import DeepgramTTSEmulator

        return DeepgramTTSEmulator(plan=plan, **options)

    def stock(self, emulator: Any, *, api_key: str = "test-key", voice: str = "test-voice") -> TTSService:
        """A stock Pipecat service pointed at ``emulator``."""
        if self.name == "elevenlabs":
            from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

            return ElevenLabsTTSService(
                api_key=api_key, url=emulator.url, settings=ElevenLabsTTSService.Settings(voice=voice)
            )
        if self.name == "cartesia":
            from pipecat.services.cartesia.tts import CartesiaTTSService

            return CartesiaTTSService(
                api_key=api_key,
                url=f"{emulator.url}/tts/websocket",
                settings=CartesiaTTSService.Settings(voice=voice),
            )
        from pipecat.services.deepgram.tts import DeepgramTTSService

        return DeepgramTTSService(
            api_key=api_key, base_url=emulator.url, settings=DeepgramTTSService.Settings(voice=voice)
        )

    def factory(self, emulator: Any, **options: Any) -> Callable[[], TTSService]:
        """A factory of stock services pointed at ``emulator`` (what ``ResilientTTS`` takes)."""
        return lambda: self.stock(emulator, **options)

    def voice(self, record: ConnectionRecord) -> str | None:
        """The voice a connection was opened with (or its first request asked for)."""
        if self.name == "elevenlabs":
            return record.path.split("/")[3]
        if self.name == "cartesia":
            for message in record.messages:
                if isinstance(message, dict) and isinstance(message.get("voice"), dict):
                    return str(message["voice"].get("id"))
            return None
        return parse_qs(urlsplit(record.path).query).get("model", [None])[0]


TTS_KITS = {
    "elevenlabs": TTSKit("elevenlabs"),
    "cartesia": TTSKit("cartesia"),
    "deepgram": TTSKit("deepgram", timings=False),
}
"""Every TTS provider kit, by name."""


def tts_kit(name: str) -> TTSKit:
    """The kit of a TTS provider (``elevenlabs``, ``cartesia``, ``deepgram``).

    Raises:
        ValueError: For an unknown provider.
    """
    try:
        return TTS_KITS[name]
    except KeyError:
        raise ValueError(f"unknown TTS provider {name!r}; one of: {', '.join(TTS_KITS)}") from None


@dataclass(frozen=True)
class OpenAITTSKit:
    """OpenAI's HTTP text-to-speech: its emulator and the stock ``OpenAITTSService``.

    Built like a :class:`TTSKit`, but not one of :data:`TTS_KITS`: its faults
    are HTTP faults, counted by request (the ``connection`` of a fault is the
    request's index; see :mod:`pipecat_resilient.testing.openai_tts`).

    Parameters:
        name: ``"openai"``.
        timings: False: OpenAI reports no word timings (what was heard of a
            cut sentence is estimated, and a word or two may be said again).
    """

    name: str = "openai"
    timings: bool = False

    def emulator(self, plan: FaultPlan | None = None, **options: Any) -> OpenAITTSEmulator:
        """A stopped emulator (start it with ``async with``); ``options`` go to the emulator."""
        from pipecat_resilient.testing.openai_tts import OpenAITTSEmulator

        return OpenAITTSEmulator(plan=plan, **options)

    def stock(
        self, emulator: OpenAITTSEmulator, *, api_key: str = "test-key", voice: str = "alloy", **kwargs: Any
    ) -> TTSService:
        """A stock ``OpenAITTSService`` pointed at ``emulator``.

        Args:
            emulator: A running emulator.
            api_key: The key it sends.
            voice: One of OpenAI's built-in voices (the stock service refuses
                any other name).
            **kwargs: Passed to ``OpenAITTSService`` (``settings=`` replaces the voice).
        """
        from pipecat.services.openai.tts import OpenAITTSService

        kwargs.setdefault("settings", OpenAITTSService.Settings(voice=voice))
        return OpenAITTSService(api_key=api_key, base_url=emulator.base_url, **kwargs)

    def factory(self, emulator: OpenAITTSEmulator, **options: Any) -> Callable[[], TTSService]:
        """A factory of stock services pointed at ``emulator`` (what ``ResilientTTS`` takes)."""
        return lambda: self.stock(emulator, **options)

    def voice(self, record: SpeechRequest) -> str | None:
        """The voice a request asked for."""
        return record.voice


OPENAI_TTS_KIT = OpenAITTSKit()
"""The OpenAI HTTP text-to-speech kit."""
