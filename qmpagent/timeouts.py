"""The ``timeout=`` convention shared by every client in qmpagent (as in httpx).

A ``timeout=`` argument is a number of seconds, ``None`` ("no timeout at all", rarely wise: the
guest is untrusted), or :data:`USE_CLIENT_DEFAULT` ("the client's default"), which is the
default value of every ``timeout=`` parameter.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

from .errors import QMPAgentError

__all__ = [
    "USE_CLIENT_DEFAULT",
    "Timeout",
    "UseClientDefault",
    "deadline",
    "deadline_raising",
    "resolve_timeout",
]


class UseClientDefault(enum.Enum):
    """Type of :data:`USE_CLIENT_DEFAULT`: "use the client's default timeout".

    It is distinct from ``None``, which means "no timeout at all".
    """

    USE_CLIENT_DEFAULT = "USE_CLIENT_DEFAULT"

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


#: Default value of ``timeout=`` parameters: take the client's default timeout.
USE_CLIENT_DEFAULT: Final = UseClientDefault.USE_CLIENT_DEFAULT

#: A ``timeout=`` argument: seconds, ``None`` (no timeout) or :data:`USE_CLIENT_DEFAULT`.
Timeout = float | None | UseClientDefault


def resolve_timeout(timeout: Timeout, default: float | None) -> float | None:
    """The effective timeout: ``default`` for :data:`USE_CLIENT_DEFAULT`, else ``timeout``."""
    return default if timeout is USE_CLIENT_DEFAULT else timeout


if sys.version_info >= (3, 11):

    def deadline(delay: float | None) -> contextlib.AbstractAsyncContextManager[object]:
        """An async context manager that raises ``TimeoutError`` after ``delay`` seconds
        (``None``: never). ``asyncio.timeout`` here: one timer handle, half the cost of
        ``anyio.fail_after`` on a hot path like a command round trip."""
        return asyncio.timeout(delay)

else:  # pragma: no cover - Python 3.10
    import anyio

    class deadline(contextlib.AbstractAsyncContextManager[object]):
        """``anyio.fail_after`` as an async context manager (raises ``TimeoutError``)."""

        def __init__(self, delay: float | None) -> None:
            self._cm = anyio.fail_after(delay)

        async def __aenter__(self) -> object:
            return self._cm.__enter__()

        async def __aexit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> bool | None:
            return self._cm.__exit__(exc_type, exc, tb)


class deadline_raising:
    """:func:`deadline` whose expiry raises ``error()`` (from the ``TimeoutError``) instead.

    The one place a ``TimeoutError`` becomes a qmpagent error. As with a ``try``/``except
    TimeoutError`` around the block, a ``TimeoutError`` the block itself raises is translated
    too, unless it already is a qmpagent error (:class:`~qmpagent.MonitorTimeout`,
    :class:`~qmpagent.AgentTimeout`): those pass through unchanged. A class, not a generator:
    it sits on per-command paths, where a generator-based context manager costs microseconds.
    """

    __slots__ = ("_deadline", "_error")

    def __init__(self, delay: float | None, error: Callable[[], BaseException]) -> None:
        self._deadline = deadline(delay)
        self._error = error

    async def __aenter__(self) -> None:
        await self._deadline.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        # A deadline never swallows an exception (it lets it through or raises TimeoutError),
        # so neither does this: the result of its __aexit__ carries nothing.
        exc = exc_info[1]
        try:
            await self._deadline.__aexit__(*exc_info)
        except TimeoutError as expired:
            if isinstance(expired, QMPAgentError):
                raise
            raise self._error() from expired
        if isinstance(exc, TimeoutError) and not isinstance(exc, QMPAgentError):
            raise self._error() from exc
