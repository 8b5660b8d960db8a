"""Draining a failed TTS instance: what it had queued comes out in one go."""

from __future__ import annotations

import asyncio

from pipecat.frames.frames import TTSAudioRawFrame
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

from pipecat_resilient.tts import _hand_out_queued_items_at_once


def _service() -> ElevenLabsTTSService:
    return ElevenLabsTTSService(
        api_key="k", url="ws://127.0.0.1:9", settings=ElevenLabsTTSService.Settings(voice="v")
    )


async def _queued_items_served_without_a_turn_of_the_loop(patch: bool) -> tuple[list[int], bool]:
    service = _service()
    manager = service._audio_context_manager
    await manager.create("c")
    frames = [TTSAudioRawFrame(audio=bytes(480), sample_rate=24000, num_channels=1) for _ in range(5)]
    for frame in frames:
        await manager.append("c", frame)
    manager.keepalive("c")  # a keep-alive among them is skipped, as Pipecat's own get does
    await manager.append("c", frames[0])
    if patch:
        _hand_out_queued_items_at_once(service)
    turned = asyncio.Event()
    asyncio.get_running_loop().call_soon(turned.set)
    got = [id(await manager.get("c", timeout=1.0)) for _ in range(6)]
    return [got.index(id(f)) for f in frames], turned.is_set()


async def test_a_failed_instance_hands_out_its_queued_audio_without_waiting_a_turn_per_item() -> None:
    """Pipecat waits for each queued item with a task (a turn of the loop each, so each drained frame
    waited for the pipeline to process the one before); queued items now come at once, in order."""
    order, turned = await _queued_items_served_without_a_turn_of_the_loop(patch=True)
    assert order == [0, 1, 2, 3, 4]
    assert not turned
    _, turned_stock = await _queued_items_served_without_a_turn_of_the_loop(patch=False)
    assert turned_stock  # what the stock playback does


async def test_an_empty_queue_is_still_waited_for() -> None:
    service = _service()
    manager = service._audio_context_manager
    await manager.create("c")
    _hand_out_queued_items_at_once(service)
    frame = TTSAudioRawFrame(audio=bytes(480), sample_rate=24000, num_channels=1)
    waiter = asyncio.create_task(manager.get("c", timeout=5.0))
    await asyncio.sleep(0)
    assert not waiter.done()
    await manager.append("c", frame)
    assert await waiter is frame
