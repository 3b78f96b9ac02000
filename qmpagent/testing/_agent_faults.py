"""What each fault kind does to a request of the fake agent: one small method per kind,
looked up in a table (:class:`AgentFaultRunner`).

The runner is given the agent's operations as callables (run the command, send bytes, format
a reply, drop the client) so it holds no state of the agent's but the hang it causes.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ._agent_chardev import Changes
from ._agent_engine import AgentMessage
from ._faults import Fault, FaultKind

__all__ = ["AgentFaultRunner"]

_Reply = dict[str, Any] | None


class AgentFaultRunner:
    """Runs the fault that applies to a request instead of its plain execution.

    Args:
        agent: what a custom fault's handler gets as its second argument.
        execute: run the request's command (it takes effect); its reply object or ``None``.
        send: send bytes made by the agent generation given (dropped if it has gone).
        encode: a reply object's bytes (with the 0xFF delimiter if one is due).
        current: whether the agent generation given is still running.
        connected: whether a client is connected.
        drop_client: close the client connection, if there is one; whether there was.
        changes: notified when the agent hangs; waited on until it is released.
    """

    def __init__(
        self,
        *,
        agent: object,
        execute: Callable[[AgentMessage], Awaitable[_Reply]],
        send: Callable[[bytes, int], Awaitable[None]],
        encode: Callable[[Mapping[str, Any]], bytes],
        current: Callable[[int], bool],
        connected: Callable[[], bool],
        drop_client: Callable[[], bool],
        changes: Changes,
    ) -> None:
        self._agent = agent
        self._execute = execute
        self._send = send
        self._encode = encode
        self._current = current
        self._connected = connected
        self._drop_client = drop_client
        self._changes = changes
        self._release_epoch = 0
        #: Whether the agent is hung by a ``HANG`` fault.
        self.hung = False
        self._by_kind: dict[FaultKind, Callable[[Fault, AgentMessage, int], Awaitable[None]]] = {
            FaultKind.DELAY: self._delay,
            FaultKind.HANG: self._hang_agent,
            FaultKind.CUSTOM: self._custom,
            FaultKind.REPLY: self._reply,
            FaultKind.ERROR: self._error,
            FaultKind.NO_REPLY: self._no_reply,
            FaultKind.GARBAGE: self._garbage,
            FaultKind.OVERSIZED: self._oversized,
            FaultKind.DISCONNECT: self._disconnect,
        }

    def release(self) -> None:
        """End a hang: the agent answers again."""
        self._release_epoch += 1
        self._changes.notify()

    async def run(self, fault: Fault, message: AgentMessage, generation: int) -> None:
        """Handle ``message`` as ``fault`` says (made by agent ``generation``)."""
        await self._by_kind[fault.kind](fault, message, generation)

    async def _answer(self, answer: _Reply, generation: int) -> None:
        if answer is not None:
            await self._send(self._encode(answer), generation)

    async def _delay(self, fault: Fault, message: AgentMessage, generation: int) -> None:
        if fault.effect_first:
            answer = await self._execute(message)
            await asyncio.sleep(fault.seconds)
        else:
            await asyncio.sleep(fault.seconds)
            if not self._current(generation):
                return
            answer = await self._execute(message)
        await self._answer(answer, generation)

    async def _hang_agent(self, fault: Fault, message: AgentMessage, generation: int) -> None:
        answer = await self._execute(message) if fault.apply else None
        epoch = self._release_epoch
        self.hung = True
        self._changes.notify()
        try:
            await self._changes.wait_until(
                lambda: epoch != self._release_epoch or not self._current(generation)
            )
        finally:
            self.hung = False
        if not self._current(generation):
            return
        if not fault.apply:
            answer = await self._execute(message)
        await self._answer(answer, generation)

    async def _custom(self, fault: Fault, message: AgentMessage, generation: int) -> None:
        assert fault.handler is not None
        result = fault.handler(message, self._agent)
        if inspect.isawaitable(result):
            result = await result
        if result is None:
            return
        if isinstance(result, (bytes, bytearray, memoryview)):
            await self._send(bytes(result), generation)
        elif isinstance(result, Mapping):
            await self._send(self._encode(result), generation)
        else:
            raise TypeError(f"a fault handler returned {type(result).__name__}")

    async def _substitute(
        self, fault: Fault, message: AgentMessage, generation: int, reply: dict[str, Any]
    ) -> None:
        # The real reply (if the command ran) is replaced: its delimiter is used up by it.
        if fault.apply:
            await self._execute(message)
        if message.has_id:
            reply["id"] = message.id
        await self._send(self._encode(reply), generation)

    async def _reply(self, fault: Fault, message: AgentMessage, generation: int) -> None:
        await self._substitute(fault, message, generation, {"return": fault.value})

    async def _error(self, fault: Fault, message: AgentMessage, generation: int) -> None:
        reply = {"error": {"class": fault.error_class, "desc": fault.desc}}
        await self._substitute(fault, message, generation, reply)

    async def _lost(self, fault: Fault, message: AgentMessage) -> bytes:
        # The real reply is lost (its bytes, 0xFF delimiter included, never arrive).
        real = await self._execute(message) if fault.apply else None
        return self._encode(real) if real is not None else b""

    async def _no_reply(self, fault: Fault, message: AgentMessage, generation: int) -> None:
        await self._lost(fault, message)

    async def _garbage(self, fault: Fault, message: AgentMessage, generation: int) -> None:
        await self._lost(fault, message)
        await self._send(fault.data, generation)

    async def _oversized(self, fault: Fault, message: AgentMessage, generation: int) -> None:
        await self._lost(fault, message)
        await self._send(_oversized(fault.size, fault.line), generation)

    async def _disconnect(self, fault: Fault, message: AgentMessage, generation: int) -> None:
        real_bytes = await self._lost(fault, message)
        if fault.after_bytes and self._connected():
            await self._send(real_bytes[: fault.after_bytes], generation)
        self._drop_client()


def _oversized(size: int, line: bool) -> bytes:
    head = b'{"return": "'
    if not line:
        return (head + b"A" * max(0, size - len(head)))[:size]
    tail = b'"}\n'
    return (head + b"A" * max(0, size - len(head) - len(tail)) + tail)[-size:] if size else b""
