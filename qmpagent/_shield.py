"""Awaiting what must finish however the caller is cancelled: a clean-up step
(:func:`run_to_completion`), and a group of steps that all end before the caller goes on
(:func:`all_or_none`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


async def run_to_completion(coro: Awaitable[T]) -> T:
    """Await ``coro`` in a task of its own and do not give up on it when the caller is
    cancelled, whether through an anyio cancel scope (blocked by a shielded scope) or natively
    with ``Task.cancel()`` (absorbed by ``asyncio.shield`` until the step is done). A cancellation
    that arrived meanwhile is re-raised afterwards. ``coro`` must bound its own duration.
    """
    task = asyncio.ensure_future(coro)
    cancelled: asyncio.CancelledError | None = None
    with anyio.CancelScope(shield=True):
        while True:
            try:
                result = await asyncio.shield(task)
                break
            except asyncio.CancelledError as exc:
                if task.done():
                    raise  # the step itself was cancelled
                cancelled = exc
    if cancelled is not None:
        raise cancelled
    return result


async def all_or_none(coros: list[Coroutine[Any, Any, None]]) -> None:
    """Run ``coros`` as one task group: each in a task of its own; the first failure cancels
    the others; a cancellation of the caller (native, or re-delivered again and again by an
    anyio cancel scope) cancels each of them once. Either way every one of them has finished
    (its own clean-up, e.g. a job's cancel and dismiss, included) before this returns or
    raises: nothing goes on behind the caller's back. Each must bound its own duration."""
    if not coros:
        return
    tasks = [asyncio.ensure_future(c) for c in coros]
    interrupted: BaseException | None = None
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException as exc:  # the caller was cancelled
        interrupted = exc
    failed = any(t.done() and not t.cancelled() and t.exception() is not None for t in tasks)
    if interrupted is not None or failed:
        for t in tasks:
            t.cancel()  # once each; a done task ignores it
    with anyio.CancelScope(shield=True):
        while not all(t.done() for t in tasks):
            try:
                await asyncio.wait(tasks)
            except asyncio.CancelledError as exc:  # native cancellation goes through a shield
                interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted
    for t in tasks:
        if not t.cancelled() and (error := t.exception()) is not None:
            raise error
