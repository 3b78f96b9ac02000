"""QEMU's JSON output, byte for byte (``qobject/qjson.c`` and ``qobject/qdict.c``).

Both fakes format what they send with :func:`qemu_json`, so a reply of the fake QMP server and
of the fake agent has QEMU's separators, member order and escapes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = ["mod_utf8", "qdict_order", "qemu_json", "valid_codepoint"]

_QDICT_BUCKET_MAX: Final = 512


def mod_utf8(text: str) -> bytes:
    """A Python string as QEMU holds it: UTF-8, with U+0000 as the overlong ``C0 80``."""
    return text.encode("utf-8", "surrogatepass").replace(b"\x00", b"\xc0\x80")


@functools.lru_cache(maxsize=4096)
def _qdict_bucket(key: str) -> int:
    # tdb_hash() of qobject/qdict.c, modulo QDICT_BUCKET_MAX.
    data = mod_utf8(key)
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % _QDICT_BUCKET_MAX


def qdict_order(keys: Sequence[str]) -> list[str]:
    """Keys in the order QEMU iterates a QDict they were inserted into in this order.

    A QDict is a 512-bucket hash table iterated bucket by bucket; each bucket is a list with the
    newest entry first.
    """
    if len(keys) < 2:
        return list(keys)
    ranked = sorted((_qdict_bucket(k), -i, k) for i, k in enumerate(keys))
    return [k for _, _, k in ranked]


def valid_codepoint(cp: int) -> bool:
    """Whether QEMU holds ``cp`` as a character (``is_valid_codepoint``)."""
    # util/unicode.c is_valid_codepoint()
    if cp > 0x10FFFF:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False  # noncharacter
    return not 0xD800 <= cp <= 0xDFFF  # surrogate


_JSON_SAFE_RE: Final = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*\Z")
_JSON_UNSAFE_RE: Final = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_JSON_ESCAPES: Final = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    escaped = _JSON_ESCAPES.get(ch)
    if escaped is not None:
        return escaped
    cp = ord(ch)
    if not valid_codepoint(cp):
        cp = 0xFFFD
    if cp > 0xFFFF:
        cp -= 0x10000
        return f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}"
    return f"\\u{cp:04X}"


def _encode_string(text: str, out: list[str]) -> None:
    if _JSON_SAFE_RE.match(text):
        out.append(f'"{text}"')
    else:
        out.append('"' + _JSON_UNSAFE_RE.sub(_escape_char, text) + '"')


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(int(value)))
    elif isinstance(value, float):
        out.append(f"{value:.17g}")
    elif isinstance(value, str):
        _encode_string(value, out)
    elif isinstance(value, Mapping):
        out.append("{")
        for n, key in enumerate(qdict_order(list(value))):
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be strings, not {key!r}")
            if n:
                out.append(", ")
            _encode_string(key, out)
            out.append(": ")
            _encode(value[key], out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for n, item in enumerate(value):
            if n:
                out.append(", ")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def qemu_json(value: Any) -> str:
    """Format a JSON value exactly as QEMU does (``qobject_to_json``, not pretty).

    Separators are ``", "`` and ``": "``; object members come in QEMU's QDict iteration order
    (a 512-bucket hash of the key, newest first within a bucket), which is why the real agent
    answers ``{"return": {}, "id": 1}`` but ``{"id": 1, "error": {...}}``; characters outside
    printable ASCII are escaped as upper-case ``\\uXXXX`` (surrogate pairs beyond the BMP,
    U+FFFD for what QEMU cannot hold); floats use ``%.17g``. Works for QMP replies too.

    Args:
        value: ``None``, ``bool``, ``int``, ``float``, ``str``, a mapping with string keys (its
            iteration order is taken as the insertion order), or a list/tuple of these.

    Raises:
        TypeError: a value of another type.
    """
    out: list[str] = []
    _encode(value, out)
    return "".join(out)
