"""QEMU's socket chardev in front of the fake agent: the thin shell between the socket and the
agent's engine.

One client connection at a time: a second one is accepted by the kernel but not served until
the first one closes (QEMU's socket chardev does the same). What clients write waits in a
bounded input buffer for the agent to read (beyond the bound the socket is not read, so the
client's writes block, as with QEMU). Replies written while no client is connected, or for a
client that went away, are kept (bounded) and delivered to the next client before anything
else, as the real agent's throttled port resumes on the next connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ._server import SocketListener

__all__ = ["READ_CHUNK", "Changes", "Chardev"]

log = logging.getLogger("qmpagent.testing.fake_agent")  # the agent's log, as before the split

#: The most bytes read from the socket, or by the agent from the input buffer, at once.
READ_CHUNK = 4096


class Changes:
    """A condition the agent's parts wait on: :meth:`notify` after any change of state,
    :meth:`wait_until` a predicate over that state holds."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake every waiter to look at the state again."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` is true (checked at once and after each notify)."""
        while not predicate():
            await self._event.wait()


@dataclass(eq=False)
class _Connection:
    number: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    closed: bool = False
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Chardev:
    """The chardev (see the module doc).

    Args:
        changes: notified when a client comes or goes and when input arrives.
        port_open: whether the agent's port is open now (input of a client that leaves
            while it is closed never reached the guest, and is dropped).
        path, host, port: where to listen (see :class:`~._server.SocketListener`).
        max_input: the bound of the input buffer and of the undelivered replies.
    """

    def __init__(
        self,
        changes: Changes,
        *,
        port_open: Callable[[], bool],
        path: str | os.PathLike[str] | None,
        host: str | None,
        port: int,
        max_input: int,
    ) -> None:
        self._changes = changes
        self._port_open = port_open
        self._max_input = max_input
        self._listener = SocketListener(
            self._on_client, path=path, host=host, port=port, socket_name="qga.sock",
            tmp_prefix="qmpagent-fake-agent-", limit=READ_CHUNK,
        )
        self._client_lock = asyncio.Lock()
        self._conn: _Connection | None = None
        self._inbuf = bytearray()  # client bytes not yet read by the agent
        self._stash = bytearray()  # replies waiting for the next client
        self._closed = False
        #: How many client connections have been served so far.
        self.connection_count = 0

    @property
    def address(self) -> str | tuple[str, int] | None:
        """Where clients connect (``None`` before :meth:`start`)."""
        return self._listener.address

    @property
    def socket_path(self) -> str | None:
        """The unix socket path (``None`` for TCP or before :meth:`start`)."""
        path = self._listener.socket_path
        return str(path) if path is not None else None

    @property
    def connected(self) -> bool:
        """Whether a client is connected (and being served)."""
        return self._conn is not None and not self._conn.closed

    @property
    def connection_number(self) -> int | None:
        """The number (1-based) of the client being served, or ``None``."""
        return self._conn.number if self._conn is not None else None

    @property
    def buffered(self) -> int:
        """Bytes received that the agent has not read yet."""
        return len(self._inbuf)

    @property
    def undelivered(self) -> int:
        """Bytes of replies waiting for the next client."""
        return len(self._stash)

    async def start(self) -> None:
        """Listen.

        Raises:
            OSError: the socket cannot be created.
        """
        await self._listener.start()

    def stop_listening(self) -> None:
        """Serve no more clients (the current one stays until :meth:`close`)."""
        self._closed = True
        self._listener.stop_listening()
        self._changes.notify()

    async def close(self) -> None:
        """Drop the client and remove the socket. Idempotent."""
        self.stop_listening()
        self.drop_client()
        await self._listener.close(timeout=5.0)

    def read(self, size: int) -> bytes:
        """Take up to ``size`` bytes of input for the agent."""
        chunk = bytes(self._inbuf[:size])
        del self._inbuf[:size]
        return chunk

    def clear_input(self) -> None:
        """Drop the input the agent has not read (the agent went away)."""
        self._inbuf.clear()

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the client, or keep it for the next one."""
        conn = self._conn
        if conn is None or conn.closed or conn.writer.is_closing():
            self._keep(data)
            return
        async with conn.write_lock:
            try:
                conn.writer.write(data)
                await conn.writer.drain()
            except (ConnectionError, OSError):
                self._close(conn)
                self._keep(data)

    def drop_client(self) -> bool:
        """Close the current client's connection; whether there was one."""
        conn = self._conn
        if conn is None:
            return False
        self._close(conn)
        return True

    async def drop_connection(self) -> None:
        """Close the current client's connection and wait until it is closed."""
        conn = self._conn
        if conn is not None:
            self._close(conn)
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()

    def _keep(self, data: bytes) -> None:
        if len(self._stash) + len(data) <= self._max_input:
            self._stash += data
        else:
            log.debug("fake agent: dropping a %d-byte reply nobody reads", len(data))

    def _close(self, conn: _Connection) -> None:
        conn.closed = True
        conn.writer.close()
        if self._conn is conn:
            self._conn = None
        self._changes.notify()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn: _Connection | None = None
        try:
            # One client at a time: the next one waits, unserved, as with QEMU's chardev.
            async with self._client_lock:
                if self._closed:
                    return
                self.connection_count += 1
                conn = _Connection(self.connection_count, reader, writer)
                self._conn = conn
                self._changes.notify()
                if self._stash:
                    stale, self._stash = bytes(self._stash), bytearray()
                    await self.write(stale)
                while not conn.closed:
                    await self._changes.wait_until(
                        lambda: conn is None
                        or conn.closed
                        or self._closed
                        or len(self._inbuf) < self._max_input
                    )
                    if conn.closed or self._closed:
                        break
                    data = await reader.read(READ_CHUNK)
                    if not data:
                        break
                    if self._conn is conn:
                        self._inbuf += data
                        self._changes.notify()
        except (ConnectionError, OSError):
            pass
        finally:
            if conn is not None:
                if self._conn is conn and not self._port_open():
                    self._inbuf.clear()  # never reached the guest: lost with the socket
                self._close(conn)
            else:
                writer.close()
