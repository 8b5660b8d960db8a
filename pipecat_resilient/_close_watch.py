"""A provider's close, told from its close frame rather than a round trip later.

``websockets`` raises ``ConnectionClosed`` in ``recv`` only once the closing
handshake is over: after the provider's close frame came in, the client
answered it, and the provider closed the TCP connection. That is a network
round trip after the provider said it was closing, and, if a proxy passes
the close on and then hangs, never (until the client's close timeout, 2 s in
Pipecat, ends the wait). :class:`CloseWatch` tells the close as soon as its
frame is in and the service reading the socket has handled every message
that came before it, so that nothing the provider sent is left out of what
the recovery works from.

It reads ``websockets`` internals (the connection's ``protocol`` and the
queue of received frames behind ``recv``); where they are missing, it does
nothing and the close is heard when ``recv`` raises, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger
from websockets.frames import Close

__all__ = ["CloseWatch", "watch_close"]


class CloseWatch:
    """Tells, once per socket, a close the provider started, from its close frame.

    The close is told at once if the reader waits in ``recv`` with every
    earlier message taken; otherwise at the reader's next ``recv`` with none
    left (the reader's ``recv`` must call :meth:`before_recv` first when
    :attr:`pending` is set). A close the client started (a shutdown, a
    settings reconnect) is not told.

    Args:
        websocket: A ``websockets.asyncio`` client connection.
        tell: Called with the provider's close frame.
        owner: Named in the DEBUG line if ``tell`` fails.
    """

    __slots__ = ("_frames", "_owner", "_protocol", "_tasks", "_tell", "pending", "told")

    def __init__(self, websocket: Any, tell: Callable[[Close], Awaitable[None]], owner: object) -> None:
        self._tell = tell
        self._owner = owner
        self._frames: Any = getattr(getattr(websocket, "recv_messages", None), "frames", None)
        self._protocol: Any = getattr(websocket, "protocol", None)
        self._tasks: set[asyncio.Task[None]] = set()
        self.pending: Close | None = None
        """The provider's close, once its frame is in (until told, and after)."""
        self.told = False
        if hasattr(self._frames, "get_waiter") and hasattr(self._protocol, "close_rcvd"):
            data_received = websocket.data_received

            def data_received_watched(data: bytes) -> None:
                data_received(data)
                if self._protocol.close_rcvd is not None and self.pending is None:
                    self._close_in()

            websocket.data_received = data_received_watched

    def _close_in(self) -> None:
        protocol = self._protocol
        if not protocol.close_rcvd_then_sent:
            return  # the answer to our own close
        self.pending = protocol.close_rcvd
        if not self._frames and self._frames.get_waiter is not None:
            # The reader waits in recv with every earlier message handled.
            task = asyncio.get_running_loop().create_task(self.tell(protocol.close_rcvd))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def before_recv(self) -> None:
        """Tell the pending close if every message before it has been taken (call it with one pending)."""
        if self.pending is not None and not self._frames:
            await self.tell(self.pending)

    async def tell(self, close: Close) -> None:
        """Tell ``close`` unless a close was told already."""
        if self.told:
            return
        self.told = True
        try:
            await self._tell(close)
        except Exception as exc:
            logger.debug(f"{self._owner}: telling a close failed ({type(exc).__name__}: {exc})")


def watch_close(websocket: Any, tell: Callable[[Close], Awaitable[None]], owner: object) -> CloseWatch:
    """Watch ``websocket`` for a close the provider starts; tell it from its frame.

    Wraps the socket's ``recv`` (which its message iterator and SDKs call) to
    tell a close that waited for the reader to handle the messages before it.

    Args:
        websocket: A ``websockets.asyncio`` client connection, just opened.
        tell: Called once with the provider's close frame.
        owner: Named in the DEBUG line if ``tell`` fails.

    Returns:
        The watch.
    """
    watch = CloseWatch(websocket, tell, owner)
    recv = websocket.recv

    async def recv_watched(*args: Any, **kwargs: Any) -> Any:
        if watch.pending is not None and not watch.told:
            await watch.before_recv()
        return await recv(*args, **kwargs)

    websocket.recv = recv_watched
    return watch
