"""The agent's request checks: the QAPI input visitor (``qapi/qobject-input-visitor.c``) over
the small schema subset the fake implements, with GLib's hash-table order for which unexpected
argument is reported, and the error a command raises (:class:`FakeAgentError`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from ._json_writer import mod_utf8, qdict_order

__all__ = ["BOOL", "INT", "STR", "STR_LIST", "FakeAgentError", "Param", "check_arguments"]


class FakeAgentError(Exception):
    """Raised by a command handler (see :meth:`FakeAgent.set_handler`) to answer with an error.

    Attributes:
        desc: the error description.
        error_class: the QAPI error class (``"GenericError"`` or ``"CommandNotFound"``).
    """

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(f"{error_class}: {desc}")
        self.desc = desc
        self.error_class = error_class



_GLIB_PRIME_MOD: Final = (1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381,
                          32749, 65521, 131071, 262139, 524287, 1048573, 2097143, 4194301)


class _GHashSet:
    """Enough of GLib's ``GHashTable`` (2.74) to know which key it iterates first.

    The QAPI input visitor puts the argument names in one, removes each one it visits, and
    reports the first left over as "Parameter '...' is unexpected".
    """

    def __init__(self) -> None:
        self._set_shift(3)

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _GLIB_PRIME_MOD[shift]
        self.mask = self.size - 1
        self.hashes = [0] * self.size
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0

    @staticmethod
    def _hash(key: str) -> int:
        value = 5381
        for byte in mod_utf8(key):
            value = (value * 33 + (byte - 256 if byte > 127 else byte)) & 0xFFFFFFFF
        return value if value >= 2 else 2

    def _lookup(self, key: str) -> int:
        hv = self._hash(key)
        index = (hv * 11) % self.mod
        step = 0
        tombstone = -1
        while self.hashes[index] != 0:
            if self.hashes[index] == hv and self.keys[index] == key:
                return index
            if self.hashes[index] == 1 and tombstone < 0:
                tombstone = index
            step += 1
            index = (index + step) & self.mask
        return tombstone if tombstone >= 0 else index

    def add(self, key: str) -> None:
        index = self._lookup(key)
        if self.hashes[index] >= 2:
            return
        unused = self.hashes[index] == 0
        self.hashes[index] = self._hash(key)
        self.keys[index] = key
        self.nnodes += 1
        if unused:
            self.noccupied += 1
            self._maybe_resize()

    def discard(self, key: str) -> None:
        index = self._lookup(key)
        if self.hashes[index] < 2:
            return
        self.hashes[index] = 1
        self.keys[index] = None
        self.nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        if (self.size > self.nnodes * 4 and self.size > 8) or (
            self.size <= self.noccupied + self.noccupied // 16
        ):
            live = [k for k, h in zip(self.keys, self.hashes, strict=True) if h >= 2 and k is not None]
            self._set_shift(max(int(len(live) * 1.333).bit_length(), 3))
            for key in live:
                index = self._lookup(key)
                self.hashes[index] = self._hash(key)
                self.keys[index] = key
                self.nnodes += 1
                self.noccupied += 1

    def first(self) -> str | None:
        for key, hv in zip(self.keys, self.hashes, strict=True):
            if hv >= 2:
                return key
        return None


# Argument kinds of the QAPI schema subset the fake implements.
INT: Final = "int"
STR: Final = "str"
BOOL: Final = "bool"
STR_LIST: Final = "[str]"

Param = tuple[str, str, bool]  # name, kind, optional


def check_arguments(arguments: Mapping[str, Any], params: Sequence[Param]) -> dict[str, Any]:
    """Visit ``arguments`` like the QAPI input visitor; return the present ones.

    Raises:
        FakeAgentError: the visitor's error for the first bad member, or the first unexpected
            one in GLib hash table order.
    """
    leftover = _GHashSet()
    for key in qdict_order(list(arguments)):
        leftover.add(key)
    result: dict[str, Any] = {}
    for name, kind, optional in params:
        if name not in arguments:
            if optional:
                continue
            raise FakeAgentError(f"Parameter '{name}' is missing")
        leftover.discard(name)
        value = arguments[name]
        if kind == INT:
            if not _is_int64(value):
                raise FakeAgentError(f"Invalid parameter type for '{name}', expected: integer")
        elif kind == STR:
            if not isinstance(value, str):
                raise FakeAgentError(f"Invalid parameter type for '{name}', expected: string")
        elif kind == BOOL:
            if not isinstance(value, bool):
                raise FakeAgentError(f"Invalid parameter type for '{name}', expected: boolean")
        elif kind == STR_LIST:
            if not isinstance(value, list):
                raise FakeAgentError(f"Invalid parameter type for '{name}', expected: array")
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise FakeAgentError(
                        f"Invalid parameter type for '{name}[{i}]', expected: string"
                    )
        result[name] = value
    unexpected = leftover.first()
    if unexpected is not None:
        raise FakeAgentError(f"Parameter '{unexpected}' is unexpected")
    return result


def _is_int64(value: Any) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and -(1 << 63) <= value < (1 << 63)
    )
