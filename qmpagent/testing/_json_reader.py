"""QEMU's JSON input, sans I/O: lexer (``qobject/json-lexer.c``), streamer
(``json-streamer.c``) and parser (``json-parser.c``) as of QEMU 7.2.

The one reader of both fakes: QEMU feeds its QMP monitor and the guest agent feeds its channel
through the same streamer, so both fakes split, reject and recover from input the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from ._json_writer import valid_codepoint

__all__ = ["QEMUJSONEvent", "QEMUJSONStreamParser"]

# Lexer states
_ERROR: Final = 0
_RECOVERY: Final = 1
_DQ_ESCAPE: Final = 2
_DQ: Final = 3
_SQ_ESCAPE: Final = 4
_SQ: Final = 5
_ZERO: Final = 6
_EXP_DIGITS: Final = 7
_EXP_SIGN: Final = 8
_EXP_E: Final = 9
_MANTISSA: Final = 10
_MANTISSA_DIGITS: Final = 11
_DIGITS: Final = 12
_SIGN: Final = 13
_KEYWORD: Final = 14
_START: Final = 15
# Token types (> every state)
_T_LCURLY: Final = 100
_T_RCURLY: Final = 101
_T_LSQUARE: Final = 102
_T_RSQUARE: Final = 103
_T_COLON: Final = 104
_T_COMMA: Final = 105
_T_INTEGER: Final = 106
_T_FLOAT: Final = 107
_T_KEYWORD: Final = 108
_T_STRING: Final = 109
_T_OVERSIZE: Final = 110  # not QEMU's: a token that outgrew the size limit

_STRUCTURAL: Final = {
    ord("{"): _T_LCURLY,
    ord("}"): _T_RCURLY,
    ord("["): _T_LSQUARE,
    ord("]"): _T_RSQUARE,
    ord(":"): _T_COLON,
    ord(","): _T_COMMA,
}
_WHITESPACE: Final = frozenset(b" \t\r\n")
_DIGIT: Final = frozenset(b"0123456789")
_LOWER: Final = frozenset(b"abcdefghijklmnopqrstuvwxyz")


def _transition(state: int, c: int) -> tuple[int, bool]:
    """One step of QEMU's lexer table: ``(new state or token type, lookahead)``.

    With lookahead the character is not consumed and is fed again in the new state.
    """
    if state == _START:
        if c == 0x22:
            return _DQ, False
        if c == 0x27:
            return _SQ, False
        if c == 0x30:
            return _ZERO, False
        if 0x31 <= c <= 0x39:
            return _DIGITS, False
        if c == 0x2D:
            return _SIGN, False
        token = _STRUCTURAL.get(c)
        if token is not None:
            return token, False
        if c in _LOWER:
            return _KEYWORD, False
        if c in _WHITESPACE:
            return _START, False
        return _ERROR, False
    if state in (_DQ, _SQ):
        if c == (0x22 if state == _DQ else 0x27):
            return _T_STRING, False
        if c == 0x5C:
            return (_DQ_ESCAPE if state == _DQ else _SQ_ESCAPE), False
        if 0x20 <= c <= 0xFD:
            return state, False
        return _ERROR, False
    if state in (_DQ_ESCAPE, _SQ_ESCAPE):
        if 0x20 <= c <= 0xFD:
            return (_DQ if state == _DQ_ESCAPE else _SQ), False
        return _ERROR, False
    if state == _RECOVERY:
        if c == 0x09 or (0x20 <= c <= 0xFD and c not in _STRUCTURAL):
            return _RECOVERY, False
        return _START, True
    if state == _ZERO:
        if c in _DIGIT:
            return _ERROR, False
        if c == 0x2E:
            return _MANTISSA, False
        return _T_INTEGER, True
    if state == _DIGITS:
        if c in _DIGIT:
            return _DIGITS, False
        if c in (0x65, 0x45):
            return _EXP_E, False
        if c == 0x2E:
            return _MANTISSA, False
        return _T_INTEGER, True
    if state == _SIGN:
        if c == 0x30:
            return _ZERO, False
        if 0x31 <= c <= 0x39:
            return _DIGITS, False
        return _ERROR, False
    if state == _MANTISSA:
        return (_MANTISSA_DIGITS, False) if c in _DIGIT else (_ERROR, False)
    if state == _MANTISSA_DIGITS:
        if c in _DIGIT:
            return _MANTISSA_DIGITS, False
        if c in (0x65, 0x45):
            return _EXP_E, False
        return _T_FLOAT, True
    if state == _EXP_E:
        if c in (0x2B, 0x2D):
            return _EXP_SIGN, False
        return (_EXP_DIGITS, False) if c in _DIGIT else (_ERROR, False)
    if state == _EXP_SIGN:
        return (_EXP_DIGITS, False) if c in _DIGIT else (_ERROR, False)
    if state == _EXP_DIGITS:
        return (_EXP_DIGITS, False) if c in _DIGIT else (_T_FLOAT, True)
    if state == _KEYWORD:
        return (_KEYWORD, False) if c in _LOWER else (_T_KEYWORD, True)
    raise AssertionError(f"bad lexer state {state}")  # pragma: no cover


def _byte_run(allowed: Iterable[int]) -> re.Pattern[bytes]:
    return re.compile(b"[" + b"".join(re.escape(bytes([b])) for b in sorted(allowed)) + b"]+")


# Fast paths over runs of bytes that only extend the current token (or are skipped).
_DQ_RUN: Final = _byte_run(b for b in range(0x20, 0xFE) if b not in (0x22, 0x5C))
_SQ_RUN: Final = _byte_run(b for b in range(0x20, 0xFE) if b not in (0x27, 0x5C))
_WS_RUN: Final = _byte_run(_WHITESPACE)
_RECOVERY_RUN: Final = _byte_run(
    [0x09, *(b for b in range(0x20, 0xFE) if b not in _STRUCTURAL)]
)


def _mod_utf8_codepoint(data: bytes, i: int) -> tuple[int, int]:
    """Decode one code point at ``data[i]`` like QEMU's ``mod_utf8_codepoint``.

    Returns ``(code point or -1 if invalid, index after it)``.
    """
    byte = data[i]
    i += 1
    if byte < 0x80:
        return byte, i
    if byte >= 0xFE or not byte & 0x40:
        return -1, i  # impossible byte, or unexpected continuation byte
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for _ in range(1, length):
        nxt = data[i] if i < len(data) else 0
        if nxt & 0xC0 != 0x80:
            return -1, i  # continuation byte missing
        i += 1
        cp = (cp << 6) | (nxt & 0x3F)
    if not valid_codepoint(cp):
        return -1, i
    if cp < (0x80, 0x800, 0x10000, 0x200000, 0x4000000)[length - 2] and not (
        cp == 0 and length == 2
    ):
        return -1, i  # overlong, other than C0 80
    return cp, i


def _c_string(data: bytes) -> str:
    """Bytes QEMU prints with ``%s`` and then formats as JSON: cut at NUL, invalid -> U+FFFD."""
    data = data.split(b"\x00", 1)[0]
    chars = []
    i = 0
    while i < len(data):
        cp, i = _mod_utf8_codepoint(data, i)
        chars.append(chr(0xFFFD if cp < 0 else cp))
    return "".join(chars)


class _ParseError(Exception):
    pass


class _Parser:
    """QEMU's recursive descent parser over one message's tokens (first error wins)."""

    def __init__(self, tokens: list[tuple[int, bytes]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def error(self, message: str) -> _ParseError:
        return _ParseError(f"JSON parse error, {message}")

    def peek(self) -> tuple[int, bytes] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def pop(self) -> tuple[int, bytes] | None:
        token = self.peek()
        if token is not None:
            self.pos += 1
        return token

    def value(self) -> Any:
        token = self.peek()
        if token is None:
            raise self.error("premature EOI")
        kind, text = token
        if kind == _T_LCURLY:
            return self.object()
        if kind == _T_LSQUARE:
            return self.array()
        if kind in (_T_INTEGER, _T_FLOAT, _T_STRING):
            self.pos += 1
            return self.literal(kind, text)
        if kind == _T_KEYWORD:
            self.pos += 1
            if text == b"true":
                return True
            if text == b"false":
                return False
            if text == b"null":
                return None
            raise self.error(f"invalid keyword '{_c_string(text)}'")
        raise self.error("expecting value")

    def object(self) -> dict[str, Any]:
        self.pop()
        result: dict[str, Any] = {}
        peek = self.peek()
        if peek is None:
            raise self.error("premature EOI")
        if peek[0] == _T_RCURLY:
            self.pop()
            return result
        self.pair(result)
        while True:
            token = self.pop()
            if token is None:
                raise self.error("premature EOI")
            if token[0] == _T_RCURLY:
                return result
            if token[0] != _T_COMMA:
                raise self.error("expected separator in dict")
            self.pair(result)

    def pair(self, result: dict[str, Any]) -> None:
        if self.peek() is None:
            raise self.error("premature EOI")
        key = self.value()
        if not isinstance(key, str):
            raise self.error("key is not a string in object")
        token = self.pop()
        if token is None:
            raise self.error("premature EOI")
        if token[0] != _T_COLON:
            raise self.error("missing : in object pair")
        value = self.value()
        if key in result:
            raise self.error("duplicate key")
        result[key] = value

    def array(self) -> list[Any]:
        self.pop()
        result: list[Any] = []
        peek = self.peek()
        if peek is None:
            raise self.error("premature EOI")
        if peek[0] == _T_RSQUARE:
            self.pop()
            return result
        result.append(self.value())
        while True:
            token = self.pop()
            if token is None:
                raise self.error("premature EOI")
            if token[0] == _T_RSQUARE:
                return result
            if token[0] != _T_COMMA:
                raise self.error("expected separator in list")
            result.append(self.value())

    def literal(self, kind: int, text: bytes) -> Any:
        if kind == _T_STRING:
            return self.string(text)
        if kind == _T_INTEGER:
            number = int(text)
            if -(1 << 63) <= number < (1 << 63) or 0 <= number < (1 << 64):
                return number
        return float(text)

    def string(self, text: bytes) -> str:
        quote = text[0]
        out: list[str] = []
        i = 1
        while text[i] != quote:
            c = text[i]
            if c == 0x5C:
                begin = i
                i += 1
                esc = text[i]
                i += 1
                simple = _SIMPLE_ESCAPES.get(esc)
                if simple is not None:
                    out.append(simple)
                    continue
                if esc != 0x75:  # 'u'
                    raise self.error("invalid escape sequence in string")
                cp = _hex4(text, i)
                i += 4
                if 0xD800 <= cp <= 0xDBFF and text[i : i + 2] == b"\\u":
                    trailing = _hex4(text, i + 2)
                    if 0xDC00 <= trailing <= 0xDFFF:
                        cp = 0x10000 + ((cp & 0x3FF) << 10) | (trailing & 0x3FF)
                        i += 6
                    else:
                        cp = -1
                if cp < 0 or not valid_codepoint(cp):
                    raise self.error(
                        f"{_c_string(text[begin:i])} is not a valid Unicode character"
                    )
                out.append(chr(cp))
            else:
                cp, i = _mod_utf8_codepoint(text, i)
                if cp < 0:
                    raise self.error("invalid UTF-8 sequence in string")
                out.append(chr(cp))
        return "".join(out)


_SIMPLE_ESCAPES: Final = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}


def _hex4(text: bytes, i: int) -> int:
    digits = text[i : i + 4]
    if len(digits) < 4 or not all(d in b"0123456789abcdefABCDEF" for d in digits):
        return -1
    return int(digits, 16)


@dataclass(frozen=True, slots=True)
class QEMUJSONEvent:
    """One outcome of :meth:`QEMUJSONStreamParser.feed`: a JSON value, or an error.

    Attributes:
        value: the parsed value (``dict``, ``list``, ``str``, ``int``, ``float``, ``bool`` or
            ``None``); ``None`` also when ``error`` is set.
        error: QEMU's error text (e.g. ``"JSON parse error, stray '\\ufffd'"``), or ``None``.
        after_sync_byte: a 0xFF byte was consumed since the previous successfully parsed value
            (for the parse error the 0xFF itself causes, and for the value after it).
        size: the bytes of the tokens that made the value (0 for an error).
    """

    value: Any
    error: str | None
    after_sync_byte: bool
    size: int = 0


class QEMUJSONStreamParser:
    """QEMU's JSON stream parser (lexer, streamer and parser of QEMU 7.2), sans I/O.

    Feed it bytes as they arrive; it returns what QEMU would hand to its dispatcher: each
    complete top-level value, or an error after which it recovers like QEMU (skipping to the
    next structural character or control byte; a 0xFF or 0xFE byte always ends the partial
    input with ``stray``). Messages need no separator and no newline.

    Args:
        max_message_size: the most bytes of tokens one message may hold (QEMU: 64 MiB);
            beyond it the message ends with "JSON token size limit exceeded".
        max_tokens: the most tokens one message may hold (QEMU: 2 Mi).
        max_nesting: the deepest nesting of ``{`` and ``[`` (QEMU: 1024).
    """

    def __init__(
        self,
        *,
        max_message_size: int = 64 << 20,
        max_tokens: int = 2 << 20,
        max_nesting: int = 1024,
    ) -> None:
        self._max_size = max_message_size
        self._max_tokens = max_tokens
        self._max_nesting = max_nesting
        self._state = _START
        self._token = bytearray()
        self._tokens: list[tuple[int, bytes]] = []
        self._size = 0
        self._brace = 0
        self._bracket = 0
        self._saw_sync = False
        self._events: list[QEMUJSONEvent] = []

    def feed(self, data: bytes) -> list[QEMUJSONEvent]:
        """Consume ``data``; return the values and errors it completed, in order."""
        i = 0
        n = len(data)
        while i < n:
            state = self._state
            run: re.Pattern[bytes] | None = None
            if state == _DQ:
                run = _DQ_RUN
            elif state == _SQ:
                run = _SQ_RUN
            elif state == _START:
                run = _WS_RUN
            elif state == _RECOVERY:
                run = _RECOVERY_RUN
            if run is not None:
                match = run.match(data, i)
                if match is not None:
                    end = match.end()
                    if state in (_DQ, _SQ):
                        end = min(end, i + self._max_size - len(self._token) + 1)
                        self._token += data[i:end]
                        i = end
                        self._check_token_size()
                    else:
                        i = end
                    continue
            self._feed_char(data[i])
            i += 1
        events, self._events = self._events, []
        return events

    def _feed_char(self, c: int) -> None:
        consumed = False
        while not consumed:
            new, lookahead = _transition(self._state, c)
            consumed = not lookahead
            if consumed:
                self._token.append(c)
                if c == 0xFF:
                    self._saw_sync = True
            if new >= _T_LCURLY:
                self._token_done(new, bytes(self._token))
                self._token.clear()
                new = _START
            elif new == _START:
                self._token.clear()
            elif new == _ERROR:
                self._emit(None, f"JSON parse error, stray '{_c_string(bytes(self._token))}'")
                self._token.clear()
                new = _RECOVERY
            elif new == _RECOVERY:
                self._token.clear()
            self._state = new
        self._check_token_size()

    def _check_token_size(self) -> None:
        if len(self._token) > self._max_size:
            self._token_done(_T_OVERSIZE, b"")
            self._token.clear()
            self._state = _START

    def _token_done(self, kind: int, text: bytes) -> None:
        # json_message_process_token()
        if kind == _T_LCURLY:
            self._brace += 1
        elif kind == _T_RCURLY:
            self._brace -= 1
        elif kind == _T_LSQUARE:
            self._bracket += 1
        elif kind == _T_RSQUARE:
            self._bracket -= 1
        if kind == _T_OVERSIZE or self._size + len(text) + 1 > self._max_size:
            self._emit(None, "JSON token size limit exceeded")
            return
        if len(self._tokens) + 1 > self._max_tokens:
            self._emit(None, "JSON token count limit exceeded")
            return
        if self._bracket + self._brace > self._max_nesting:
            self._emit(None, "JSON nesting depth limit exceeded")
            return
        self._tokens.append((kind, text))
        self._size += len(text)
        # QEMU 7.2 tests bracket_count twice here (and brace_count not at all): kept as is.
        if (self._brace > 0 or self._bracket > 0) and self._bracket >= 0:
            return
        parser = _Parser(self._tokens)
        try:
            value = parser.value()
        except _ParseError as exc:
            self._emit(None, str(exc))
        else:
            self._emit(value, None)

    def _emit(self, value: Any, error: str | None) -> None:
        size = self._size if error is None else 0
        self._brace = self._bracket = 0
        self._tokens = []
        self._size = 0
        self._events.append(QEMUJSONEvent(value, error, self._saw_sync, size))
        if error is None:
            self._saw_sync = False
