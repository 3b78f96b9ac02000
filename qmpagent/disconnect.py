"""The bounded teardown of a ``qemu.qmp`` client: :func:`disconnect`.

``qemu.qmp``'s graceful disconnect flushes what is still queued, which never ends if QEMU
stopped reading. After the graceful bound the transport is aborted and the stuck disconnect
cut short, so that the socket is closed and no task of the client is left running.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from qemu.qmp import QMPClient

__all__ = ["ABORT_GRACE", "disconnect"]

log = logging.getLogger("qmpagent.monitor")  # the logger these messages always had

#: After the graceful bound: how long, in seconds, the forced teardown (transport aborted,
#: qemu.qmp's stuck disconnect cancelled) may take in all. It takes milliseconds; this only
#: bounds the pathological.
ABORT_GRACE: Final = 1.0


async def disconnect(
    client: QMPClient, *, name: str, close_timeout: float
) -> BaseException | None:
    """Disconnect ``client``, bounded by ``close_timeout`` seconds for the graceful disconnect
    plus :data:`ABORT_GRACE` for a forced one; never raises.

    Returns:
        Why the connection ended (``EOFError``, ``OSError``, ...), if the disconnect says.
    """
    loop = asyncio.get_running_loop()
    disconnecting = loop.create_task(client.disconnect())
    done, _ = await asyncio.wait({disconnecting}, timeout=close_timeout)
    if not done:
        log.warning(
            "QMP connection %s: the graceful disconnect did not finish within %gs "
            "(QEMU stopped reading?); aborting the connection", name, close_timeout,
        )
        done = await _force(client, disconnecting)
    if not done:  # pragma: no cover - only if qemu.qmp ignores both the abort and the cancel
        log.error("QMP connection %s: the disconnect could not be ended", name)
        disconnecting.add_done_callback(_retrieve)
        return None
    if disconnecting.cancelled():
        return None
    exc = disconnecting.exception()
    if exc is not None:  # the reason the connection ended: EOFError, OSError, ...
        log.debug("QMP connection %s ended: %r", name, exc)
    return exc


async def _force(
    client: QMPClient, disconnecting: asyncio.Task[None]
) -> set[asyncio.Task[None]]:
    """Cut short a disconnect that is stuck flushing to a peer that does not read."""
    until = asyncio.get_running_loop().time() + ABORT_GRACE

    def left() -> float:
        return max(0.0, until - asyncio.get_running_loop().time())

    # 1. Abort the transport: the socket is closed at once, queued bytes dropped, and the
    #    writer's drain() returns or fails instead of waiting for the peer.
    writer = getattr(client, "_writer", None)
    if writer is not None:
        writer.transport.abort()
    done, _ = await asyncio.wait({disconnecting}, timeout=min(left(), 0.1))
    if done:
        return done
    # 2. qemu.qmp's disconnect may still wait for its outgoing queue to drain (messages
    #    that will never be written now): cancel it; its own clean-up still cancels and
    #    awaits the reader and writer tasks and closes the stream.
    dc_task = getattr(client, "_dc_task", None)
    if isinstance(dc_task, asyncio.Future) and not dc_task.done():
        dc_task.cancel()
    done, _ = await asyncio.wait({disconnecting}, timeout=left())
    if done:
        return done
    # 3. Last resort: stop waiting for it.
    disconnecting.cancel()  # pragma: no cover - see disconnect()
    done, _ = await asyncio.wait({disconnecting}, timeout=left())  # pragma: no cover
    return done  # pragma: no cover


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background job cleanup failed: %r", task.exception())
