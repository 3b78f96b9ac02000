"""The fake agent's command table: which commands exist, in ``guest-info`` order, which are
disabled (blocked with ``qemu-ga -b``, unsupported, or not allowed while frozen), and running
a request through it like ``qmp_dispatch`` (argument checks, error replies, no-reply commands).
The built-in commands are bound to a :class:`~._agent_guest.GuestModel` by
:func:`builtin_commands`.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ._agent_guest import GuestModel
from ._agent_profiles import FREEZE_ALLOWLIST, AgentProfile
from ._agent_qapi import BOOL, INT, STR, STR_LIST, FakeAgentError, Param, check_arguments

__all__ = ["CommandHandler", "CommandTable", "Request", "builtin_commands"]

log = logging.getLogger("qmpagent.testing.fake_agent")  # the agent's log, as before the split

#: A command handler (see :meth:`FakeAgent.set_handler`): takes the ``arguments`` object and
#: returns the ``return`` value (``None`` for ``{}``) or an awaitable of it; raises
#: :class:`FakeAgentError` to answer with an error.
CommandHandler = Callable[[dict[str, Any]], Any]

#: The built-in commands: name -> (QAPI parameters, implementation).
Builtins = dict[str, tuple[tuple[Param, ...], Callable[[dict[str, Any]], Any]]]


class Request(Protocol):
    """What the table needs of a request (an ``AgentMessage``)."""

    @property
    def command(self) -> str | None: ...
    @property
    def arguments(self) -> dict[str, Any]: ...
    @property
    def id(self) -> Any: ...
    @property
    def has_id(self) -> bool: ...


@dataclass(eq=False)
class _Command:
    name: str
    success_response: bool
    params: tuple[Param, ...] | None  # None: the handler checks its own arguments
    run: Callable[[dict[str, Any]], Any] | None  # None: not implemented


class CommandTable:
    """The commands of one agent.

    Args:
        profile: the real agent version's command list and disabled reasons.
        builtins: the implemented commands (see :func:`builtin_commands`); the profile's
            other commands exist but answer "not currently supported".
        blocked_commands: disabled as by ``qemu-ga -b``.
    """

    def __init__(
        self, profile: AgentProfile, builtins: Builtins, blocked_commands: Iterable[str]
    ) -> None:
        self._profile = profile
        self._commands: dict[str, _Command] = {}
        self._order: list[str] = []  # guest-info order
        for name, success in profile.commands:
            spec = builtins.get(name)
            self._commands[name] = _Command(
                name, success, spec[0] if spec else None, spec[1] if spec else None
            )
            self._order.append(name)
        self._blocked = set(profile.unsupported) | set(blocked_commands)
        self._disabled: dict[str, str | None] = {
            name: None if name in profile.unsupported else profile.blocked_reason
            for name in self._blocked
        }
        self._frozen = False

    def set_frozen(self, frozen: bool) -> None:
        """Disable the commands not allowed while frozen, or enable them again."""
        # ga_set_frozen() / ga_unset_frozen() with their enable/disable walks
        self._frozen = frozen
        if frozen:
            for name in self._commands:
                if name not in FREEZE_ALLOWLIST:
                    self._disabled[name] = self._profile.frozen_reason
        else:
            # Blocked commands stay disabled, with the frozen reason (as in qemu-ga 7.2).
            for name in list(self._disabled):
                if name not in self._blocked:
                    del self._disabled[name]

    def set_handler(
        self, command: str, handler: CommandHandler, *, success_response: bool = True
    ) -> None:
        """Add or replace a command (see ``FakeAgent.set_handler``); a new one is listed first."""
        if command not in self._commands:
            self._order.insert(0, command)
            if self._frozen and command not in FREEZE_ALLOWLIST:
                self._disabled[command] = self._profile.frozen_reason
        self._commands[command] = _Command(command, success_response, None, handler)

    def info(self, version: str) -> dict[str, Any]:
        """The ``guest-info`` result: the commands in the agent's order, enabled or not."""
        return {
            "version": version,
            "supported_commands": [
                {
                    "name": name,
                    "enabled": name not in self._disabled,
                    "success-response": self._commands[name].success_response,
                }
                for name in self._order
            ],
        }

    async def execute(self, message: Request) -> dict[str, Any] | None:
        """Run the request ``message`` as the agent does (``qmp_dispatch``); return its reply
        object, with the echoed ``id``; ``None`` for a command that succeeded without a reply
        (``guest-shutdown``, ``guest-suspend-*``). The command takes effect."""
        assert message.command is not None, "not a request"
        name = message.command
        reply: dict[str, Any]
        command = self._commands.get(name)
        try:
            if command is None:
                raise FakeAgentError(f"The command {name} has not been found", "CommandNotFound")
            if name in self._disabled:
                reason = self._disabled[name]
                raise FakeAgentError(
                    f"Command {name} has been disabled" + (f": {reason}" if reason else ""),
                    "CommandNotFound",
                )
            if command.run is None:
                raise FakeAgentError("this feature or command is not currently supported")
            arguments = message.arguments
            if command.params is not None:
                arguments = check_arguments(arguments, command.params)
            result = command.run(arguments)
            if inspect.isawaitable(result):
                result = await result
        except FakeAgentError as exc:
            reply = {"error": {"class": exc.error_class, "desc": exc.desc}}
        except Exception as exc:
            log.exception("fake agent: handler of %s failed", name)
            reply = {"error": {"class": "GenericError", "desc": f"fake agent handler failed: {exc!r}"}}
        else:
            if not command.success_response:
                return None
            reply = {"return": {} if result is None else result}
        if message.has_id:
            reply["id"] = message.id
        return reply



def builtin_commands(
    guest: GuestModel,
    *,
    info: Callable[[], Any],
    delimit: Callable[[Any], Any],
    suspend: Callable[[str], None],
) -> Builtins:
    """The implemented commands over ``guest``; ``info`` answers ``guest-info``, ``delimit``
    answers ``guest-sync-delimited`` (the protocol's, not the guest's), ``suspend`` runs
    ``guest-suspend-<mode>``."""
    return {
        "guest-sync-delimited": ((("id", INT, False),), lambda a: delimit(a["id"])),
        "guest-sync": ((("id", INT, False),), lambda a: a["id"]),
        "guest-ping": ((), lambda a: None),
        "guest-info": ((), lambda a: info()),
        "guest-get-time": ((), lambda a: time.time_ns() // 1000 * 1000),
        "guest-fsfreeze-status": (
            (),
            lambda a: "frozen" if guest.frozen else "thawed",
        ),
        "guest-fsfreeze-freeze": ((), lambda a: guest.freeze(None)),
        "guest-fsfreeze-freeze-list": (
            (("mountpoints", STR_LIST, True),),
            lambda a: guest.freeze(a.get("mountpoints")),
        ),
        "guest-fsfreeze-thaw": ((), lambda a: guest.thaw()),
        "guest-get-osinfo": ((), lambda a: dict(guest.osinfo)),
        "guest-get-fsinfo": ((), guest.fsinfo),
        "guest-get-host-name": ((), lambda a: {"host-name": guest.host_name}),
        "guest-get-timezone": ((), lambda a: {"zone": "UTC", "offset": 0}),
        "guest-get-users": ((), lambda a: []),
        "guest-shutdown": ((("mode", STR, True),), guest.shutdown),
        "guest-suspend-disk": ((), lambda a: suspend("disk")),
        "guest-suspend-ram": ((), lambda a: suspend("ram")),
        "guest-suspend-hybrid": ((), lambda a: suspend("hybrid")),
        "guest-exec": (
            (
                ("path", STR, False),
                ("arg", STR_LIST, True),
                ("env", STR_LIST, True),
                ("input-data", STR, True),
                ("capture-output", BOOL, True),
            ),
            guest.exec,
        ),
        "guest-exec-status": ((("pid", INT, False),), guest.exec_status),
        "guest-file-open": (
            (("path", STR, False), ("mode", STR, True)),
            guest.file_open,
        ),
        "guest-file-read": (
            (("handle", INT, False), ("count", INT, True)),
            guest.file_read,
        ),
        "guest-file-write": (
            (("handle", INT, False), ("buf-b64", STR, False), ("count", INT, True)),
            guest.file_write,
        ),
        "guest-file-close": ((("handle", INT, False),), guest.file_close),
    }
