"""The ``async with`` protocol of objects that close: entering gives the object, leaving closes it."""

from __future__ import annotations

from typing import TypeVar

_T = TypeVar("_T", bound="AsyncClosing")


class AsyncClosing:
    """Mixin: ``async with obj:`` gives ``obj`` and awaits ``obj.close()`` on the way out,
    however the block ends."""

    __slots__ = ()

    async def close(self) -> None:
        """Close; subclasses say what that means."""
        raise NotImplementedError

    async def __aenter__(self: _T) -> _T:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
