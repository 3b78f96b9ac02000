"""The one fault vocabulary of both fakes: what a fault does (:class:`Fault`, its
:class:`FaultKind`), where and how often it applies (:class:`Injection`), and the table that
matches injections to calls (:class:`FaultTable`).

``FakeAgent.inject(command, fault, call=None, times=1)`` and
``FakeQMPServer.inject(command, fault, call=None, times=1)`` take the same :class:`Fault` and
return the same :class:`Injection`. Each fake models the kinds that make sense for its peer
(:attr:`AGENT_KINDS`, :attr:`QMP_KINDS`) and refuses the others when they are injected.

The former names stay: ``AgentFault`` (a :class:`Fault` whose constructors keep the agent's
former defaults, e.g. ``no_reply()`` applies the command), ``AgentFaultKind`` (this
:class:`FaultKind`), ``AgentInjection`` (this :class:`Injection`) and, on the QMP side,
``FaultKind.NEVER_ANSWER`` (an alias of :attr:`FaultKind.NO_REPLY`) and ``Fault.times`` (the
count :meth:`FakeQMPServer.add_fault` used to keep in the fault itself).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeVar

__all__ = [
    "AGENT_KINDS",
    "QMP_KINDS",
    "AgentFault",
    "Fault",
    "FaultHandler",
    "FaultKind",
    "FaultTable",
    "Injection",
]


class FaultKind(str, enum.Enum):
    """What a :class:`Fault` does to the command it hits."""

    DELAY = "delay"
    """Answer after ``seconds`` (the commands after it wait too, as in QEMU and qemu-ga)."""
    NO_REPLY = "no-reply"
    """Send no reply; the command takes effect if ``apply`` (a lost reply)."""
    NEVER_ANSWER = "no-reply"
    """The QMP fake's former name of :attr:`NO_REPLY`."""
    DISCONNECT = "disconnect"
    """Close the client connection instead of (or, agent: in the middle of) the reply; the
    command takes effect first if ``apply``."""
    ERROR = "error"
    """Answer with the error ``error_class``/``desc`` (the command takes effect if ``apply``)."""
    GARBAGE = "garbage"
    """Agent: send ``data`` instead of the reply."""
    OVERSIZED = "oversized"
    """Agent: send ``size`` bytes instead of the reply: no newline, or (``line``) one huge
    JSON line."""
    REPLY = "reply"
    """Agent: answer ``{"return": value}`` (e.g. a value of the wrong type) instead."""
    HANG = "hang"
    """Agent: stop answering anything until ``FakeAgent.release()`` (then carry on, this one
    first)."""
    CUSTOM = "custom"
    """Agent: let ``handler`` decide what is sent."""
    JOB_ERROR = "job-error"
    """QMP, for a job command: start the job and let it conclude with the error ``desc``
    (without the job's effect)."""
    JOB_DELAY = "job-delay"
    """QMP, for a job command: the job runs ``seconds`` longer before it concludes."""

    @classmethod
    def _missing_(cls, value: object) -> FaultKind | None:
        # The QMP fake's NEVER_ANSWER had a value of its own before the kinds were merged.
        return cls.NO_REPLY if value == "never-answer" else None


#: The kinds the fake agent models.
AGENT_KINDS: frozenset[FaultKind] = frozenset(
    {FaultKind.DELAY, FaultKind.NO_REPLY, FaultKind.DISCONNECT, FaultKind.ERROR,
     FaultKind.GARBAGE, FaultKind.OVERSIZED, FaultKind.REPLY, FaultKind.HANG, FaultKind.CUSTOM}
)
#: The kinds the fake QMP server models.
QMP_KINDS: frozenset[FaultKind] = frozenset(
    {FaultKind.DELAY, FaultKind.NO_REPLY, FaultKind.DISCONNECT, FaultKind.ERROR,
     FaultKind.JOB_ERROR, FaultKind.JOB_DELAY}
)

#: A custom fault's handler (agent): takes the message and the fake agent; returns the bytes
#: to send, a mapping to send as a JSON reply (formatted like QEMU), or None to send nothing,
#: or an awaitable of one of these. ``await agent.execute(message)`` runs the real command.
FaultHandler = Callable[[Any, Any], Any]


_F = TypeVar("_F", bound="Fault")


@dataclass(frozen=True)
class Fault:
    """A fault: what happens to a command it is injected into (``inject(command, fault)``).

    Make one with the class methods (:meth:`delay`, :meth:`no_reply`, :meth:`disconnect`,
    :meth:`error`, :meth:`garbage`, :meth:`oversized`, :meth:`reply`, :meth:`hang`,
    :meth:`custom`, :meth:`job_error`, :meth:`job_delay`) rather than directly. Their ``apply``
    defaults to ``False`` (the command does not take effect) except where the class says
    otherwise (:class:`AgentFault` keeps the agent's former defaults).

    Attributes:
        kind: what the fault does.
        seconds: the delay, for ``DELAY`` and ``JOB_DELAY``.
        times: only for the former ``FakeQMPServer.add_fault(command, fault)``: how many
            commands it applies to (``None``: all). ``inject()`` takes ``times`` itself, and
            counts in the :class:`Injection` it returns (a fault is a value: it never changes).
        apply: whether the command still takes effect (e.g. the filesystems do get frozen
            when a ``guest-fsfreeze-freeze`` reply is lost). Not used by ``DELAY``,
            ``CUSTOM`` and the job kinds.
        error_class: the error class sent, for ``ERROR``.
        desc: the error text, for ``ERROR`` and ``JOB_ERROR``.
        effect_first: for ``DELAY`` (agent): the command takes effect at once and only the
            reply is delayed (default: the command runs after the delay).
        after_bytes: for ``DISCONNECT`` (agent): send this many bytes of the reply first.
        data: the bytes sent, for ``GARBAGE``.
        size: the number of bytes sent, for ``OVERSIZED``.
        line: for ``OVERSIZED``: send one valid JSON line of ``size`` bytes (newline included)
            instead of ``size`` bytes of an unterminated reply.
        value: the ``return`` value sent, for ``REPLY``.
        handler: the handler, for ``CUSTOM``.
    """

    kind: FaultKind
    seconds: float = 0.0
    times: int | None = None
    apply: bool = False
    error_class: str = "GenericError"
    desc: str = "injected fault"
    effect_first: bool = False
    after_bytes: int | None = None
    data: bytes = b""
    size: int = 0
    line: bool = False
    value: Any = None
    handler: FaultHandler | None = None

    # The kinds whose constructor applies the command unless told otherwise.
    _APPLIED_BY_DEFAULT: ClassVar[frozenset[FaultKind]] = frozenset()

    @classmethod
    def _apply(
        cls: type[_F], kind: FaultKind, apply: bool | None) -> bool:
        return kind in cls._APPLIED_BY_DEFAULT if apply is None else apply

    @classmethod
    def delay(
        cls: type[_F], seconds: float, *, effect_first: bool = False) -> _F:
        """Answer after ``seconds``; with ``effect_first`` (agent) the command takes effect at
        once and only its reply waits.

        Raises:
            ValueError: ``seconds`` below 0.
        """
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        return cls(kind=FaultKind.DELAY, seconds=seconds, effect_first=effect_first)

    @classmethod
    def no_reply(
        cls: type[_F], *, apply: bool | None = None) -> _F:
        """Never answer this command; it takes effect if ``apply`` (the reply is lost)."""
        kind = FaultKind.NO_REPLY
        return cls(kind=kind, apply=cls._apply(kind, apply))

    @classmethod
    def disconnect(
        cls: type[_F], *, apply: bool | None = None, after_bytes: int | None = None) -> _F:
        """Drop the client connection instead of answering (agent: or after ``after_bytes`` of
        the reply); the command takes effect first if ``apply``.

        The agent itself stays up (like QEMU's chardev losing its client): requests it already
        received are still processed, their replies kept for the next client.

        Raises:
            ValueError: ``after_bytes`` below 0.
        """
        if after_bytes is not None and after_bytes < 0:
            raise ValueError("after_bytes must be >= 0")
        kind = FaultKind.DISCONNECT
        return cls(kind=kind, apply=cls._apply(kind, apply), after_bytes=after_bytes)

    @classmethod
    def error(
        cls: type[_F],
        desc: str = "injected fault",
        error_class: str = "GenericError",
        *,
        apply: bool | None = None,
    ) -> _F:
        """Answer with an error (``id`` echoed); by default the command does not take effect."""
        kind = FaultKind.ERROR
        return cls(kind=kind, apply=cls._apply(kind, apply), error_class=error_class, desc=desc)

    @classmethod
    def garbage(
        cls: type[_F], data: bytes = b'\x00\x01garbage}{"ret\n', *, apply: bool | None = None
    ) -> _F:
        """Send ``data`` instead of the reply (agent)."""
        kind = FaultKind.GARBAGE
        return cls(kind=kind, apply=cls._apply(kind, apply), data=bytes(data))

    @classmethod
    def oversized(
        cls: type[_F], size: int = 2 << 20, *, line: bool = False, apply: bool | None = None
    ) -> _F:
        """Send ``size`` bytes instead of the reply (agent).

        By default an unterminated reply (``{"return": "AAAA...``, no newline); with ``line``
        one complete JSON line of exactly ``size`` bytes (``{"return": "AAAA..."}\\n``).

        Raises:
            ValueError: ``size`` below 0.
        """
        if size < 0:
            raise ValueError("size must be >= 0")
        kind = FaultKind.OVERSIZED
        return cls(kind=kind, apply=cls._apply(kind, apply), size=size, line=line)

    @classmethod
    def reply(
        cls: type[_F], value: Any, *, apply: bool | None = None) -> _F:
        """Answer ``{"return": value}`` (``id`` echoed) instead of the real result (agent)."""
        kind = FaultKind.REPLY
        return cls(kind=kind, apply=cls._apply(kind, apply), value=value)

    @classmethod
    def hang(
        cls: type[_F], *, apply: bool | None = None) -> _F:
        """Hang the agent at this command: nothing is answered until ``FakeAgent.release()``.

        Then this command runs (unless it already did, with ``apply``) and is answered, and the
        agent carries on with what queued up meanwhile.
        """
        kind = FaultKind.HANG
        return cls(kind=kind, apply=cls._apply(kind, apply))

    @classmethod
    def custom(
        cls: type[_F], handler: FaultHandler) -> _F:
        """Let ``handler(message, agent)`` decide what is sent (see :data:`FaultHandler`)."""
        return cls(kind=FaultKind.CUSTOM, handler=handler)

    @classmethod
    def job_error(
        cls: type[_F], desc: str) -> _F:
        """Let the job the command starts (QMP, e.g. ``blockdev-create``) conclude with the
        error ``desc``, without its effect."""
        return cls(kind=FaultKind.JOB_ERROR, desc=desc)

    @classmethod
    def job_delay(
        cls: type[_F], seconds: float) -> _F:
        """Let the job the command starts (QMP) run ``seconds`` longer.

        Raises:
            ValueError: ``seconds`` below 0.
        """
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        return cls(kind=FaultKind.JOB_DELAY, seconds=seconds)


class AgentFault(Fault):
    """The fake agent's name for :class:`Fault`, with its former defaults: the positional
    order ``(kind, apply, seconds, ...)``, ``apply=True`` (the constructors :meth:`no_reply`,
    :meth:`disconnect`, :meth:`garbage`, :meth:`oversized` and :meth:`reply` apply the command
    unless told otherwise) and ``desc=""``."""

    _APPLIED_BY_DEFAULT: ClassVar[frozenset[FaultKind]] = frozenset(
        {FaultKind.NO_REPLY, FaultKind.DISCONNECT, FaultKind.GARBAGE, FaultKind.OVERSIZED,
         FaultKind.REPLY}
    )

    def __init__(
        self,
        kind: FaultKind,
        apply: bool = True,
        seconds: float = 0.0,
        effect_first: bool = False,
        after_bytes: int | None = None,
        data: bytes = b"",
        size: int = 0,
        line: bool = False,
        value: Any = None,
        error_class: str = "GenericError",
        desc: str = "",
        handler: FaultHandler | None = None,
        times: int | None = None,  # last: not the agent's; dataclasses.replace() passes it
    ) -> None:
        super().__init__(
            kind, seconds, times, apply, error_class, desc, effect_first, after_bytes, data,
            size, line, value, handler,
        )


@dataclass(eq=False)
class Injection:
    """A fault injected with ``inject()``; a handle to inspect or cancel it.

    Attributes:
        command: the command it applies to (``"*"``: any command).
        fault: the fault.
        call: the one call number it applies to (1-based; for ``"*"``, counted over all
            commands), or ``None``.
        remaining: how many more matching calls it applies to (``None``: all of them).
        fired: how many times it has applied.
        active: whether it can still apply.
    """

    command: str
    fault: Fault
    call: int | None = None
    remaining: int | None = 1
    fired: int = 0
    active: bool = True

    def cancel(self) -> None:
        """Stop this injection from applying again."""
        self.active = False


_MAX_COUNTED_NAMES: Final = 4096  # distinct command names whose calls are numbered


class FaultTable:
    """The injections of one fake, in the order they were made, and the numbering of the
    calls they are matched against: the first active one that matches a call applies to it,
    and each call gets at most one.

    Args:
        kinds: the fault kinds this fake models; others are refused by :meth:`add`.
    """

    def __init__(self, kinds: frozenset[FaultKind]) -> None:
        self._kinds = kinds
        self._injections: list[Injection] = []
        # Numbered for a bounded set of names (a client may send any): the rest are call 0.
        self._counts: Counter[str] = Counter()
        #: Calls counted in total.
        self.total_calls = 0

    def call(self, command: str) -> tuple[Injection | None, int]:
        """Count a call of ``command``; return the injection that applies to it (see
        :meth:`take`) and the call's number (1-based; 0 beyond 4096 distinct names)."""
        if command in self._counts or len(self._counts) < _MAX_COUNTED_NAMES:
            self._counts[command] += 1
        self.total_calls += 1
        number = self._counts[command]
        return self.take(command, number, self.total_calls), number

    def call_count(self, command: str | None = None) -> int:
        """How many calls of ``command`` (or of any) were counted."""
        return self.total_calls if command is None else self._counts[command]

    def add(
        self, command: str, fault: Fault, *, call: int | None = None, times: int | None = 1
    ) -> Injection:
        """Inject ``fault`` into ``command`` (``"*"``: any): only its call number ``call``
        (1-based), or else its next ``times`` calls (``None``: all of them).

        Raises:
            ValueError: ``call`` or ``times`` below 1, or a kind this fake does not model.
        """
        if fault.kind not in self._kinds:
            raise ValueError(f"this fake does not model {fault.kind.name} faults")
        if call is not None and call < 1:
            raise ValueError("call must be >= 1")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        injection = Injection(command, fault, call, None if call is not None else times)
        self._injections.append(injection)
        return injection

    def take(self, command: str, call: int, total: int) -> Injection | None:
        """The injection that applies to call number ``call`` of ``command`` (``total``: its
        number over all commands), counted as fired; ``None`` if none applies."""
        for injection in self._injections:
            if not injection.active or injection.command not in (command, "*"):
                continue
            number = total if injection.command == "*" else call
            if injection.call is not None and injection.call != number:
                continue
            injection.fired += 1
            if injection.call is not None:
                injection.active = False
            elif injection.remaining is not None:
                injection.remaining -= 1
                if injection.remaining <= 0:
                    injection.active = False
            self._prune()
            return injection
        return None

    def clear(self, command: str | None = None) -> None:
        """Cancel the injections of ``command``, or all of them."""
        for injection in self._injections:
            if command is None or injection.command == command:
                injection.active = False
        self._prune()

    @property
    def active(self) -> list[Injection]:
        """The injections that can still apply, oldest first."""
        return [i for i in self._injections if i.active]

    def _prune(self) -> None:
        self._injections = [i for i in self._injections if i.active]
