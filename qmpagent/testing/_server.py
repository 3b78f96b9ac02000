"""The socket server under both fakes: listen on a unix socket (in a private temporary
directory by default) or on TCP, run one handler task per connection, and on close stop
listening, wait for the handlers and remove what was created.

The fakes own what a connection means (QMP's greeting and dispatch, the agent's chardev);
this module owns only the socket and the tasks, so both close the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["AsyncService", "ConnectionHandler", "SocketListener"]

log = logging.getLogger(__name__)

#: What runs for each accepted connection (asyncio's stream callback).
ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

_DEFAULT_LIMIT = 1 << 16  # asyncio's own default buffer limit of a StreamReader


class SocketListener:
    """A listening socket and the tasks serving its connections.

    Args:
        handler: run for each connection, as a task of its own.
        path: the unix socket to listen on; default: ``socket_name`` in a new temporary
            directory (prefix ``tmp_prefix``), removed on close. Ignored when ``host`` is given.
        host: listen on TCP at this host instead.
        port: the TCP port (``0``: any free one).
        socket_name: the socket's name in the temporary directory.
        tmp_prefix: the temporary directory's name prefix.
        limit: the stream buffer limit of each connection.
    """

    def __init__(
        self,
        handler: ConnectionHandler,
        *,
        path: str | os.PathLike[str] | None = None,
        host: str | None = None,
        port: int = 0,
        socket_name: str = "fake.sock",
        tmp_prefix: str = "qmpagent-fake-",
        limit: int = _DEFAULT_LIMIT,
    ) -> None:
        self._handler = handler
        self._path_arg = Path(path) if path is not None and host is None else None
        self._host = host
        self._port = port
        self._socket_name = socket_name
        self._tmp_prefix = tmp_prefix
        self._limit = limit
        self._server: asyncio.AbstractServer | None = None
        self._tmpdir: Path | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: The unix socket path (``None`` for TCP or before :meth:`start`).
        self.socket_path: Path | None = None
        #: Where clients connect: the unix socket path, or ``(host, port)``; ``None`` before
        #: :meth:`start`.
        self.address: str | tuple[str, int] | None = None

    @property
    def listening(self) -> bool:
        """Whether the socket accepts connections (started, not closed)."""
        return self._server is not None

    @property
    def handlers(self) -> set[asyncio.Task[Any]]:
        """The connection tasks still running (a copy)."""
        return set(self._tasks)

    async def start(self) -> None:
        """Bind and listen.

        Raises:
            OSError: the socket cannot be created (nothing is left behind but the temporary
                directory, which :meth:`close` removes).
        """
        if self._host is not None:
            self._server = await asyncio.start_server(
                self._serve, self._host, self._port, limit=self._limit
            )
            sockname = self._server.sockets[0].getsockname()
            self.address = (str(sockname[0]), int(sockname[1]))
            return
        if self._path_arg is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix=self._tmp_prefix))
            self.socket_path = self._tmpdir / self._socket_name
        else:
            self.socket_path = self._path_arg
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.socket_path), limit=self._limit
        )
        self.address = str(self.socket_path)

    def stop_listening(self) -> None:
        """Accept no more connections (the ones being served go on). Idempotent."""
        if self._server is not None:
            self._server.close()

    async def join(self, timeout: float | None = None) -> None:
        """Wait until every connection task has ended; after ``timeout`` seconds (``None``:
        no limit) cancel the ones left and wait for them."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self, timeout: float | None = None) -> None:
        """Stop listening, wait for the connection tasks (see :meth:`join`), and remove the
        socket and the temporary directory. Idempotent; raises nothing.

        The caller first makes its connections end (closing them): the tasks are waited
        for, not cancelled, because asyncio logs an error for a cancelled stream callback
        before Python 3.12.
        """
        self.stop_listening()
        await self.join(timeout)
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5.0 if timeout is None else timeout)
            if self.socket_path is not None and self._tmpdir is None:
                with contextlib.suppress(FileNotFoundError):
                    self.socket_path.unlink()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._handler(reader, writer)
        finally:
            if task is not None:
                self._tasks.discard(task)


_S = TypeVar("_S", bound="AsyncService")


class AsyncService:
    """The lifecycle every fake shares: :meth:`start`, :meth:`close`, and ``async with``,
    which starts it and closes it (also on error)."""

    async def start(self) -> None:
        """Start serving."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop serving and clean up; idempotent."""
        raise NotImplementedError

    async def __aenter__(self: _S) -> _S:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
