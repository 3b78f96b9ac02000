"""What a subcommand is: a :class:`Command` (name, help, its arguments, a typed options
dataclass built from the parsed command line, and ``run``), or a :class:`Group` of them (``agent``,
``qmp``) sharing connection options. ``main.COMMANDS`` lists them; docs/cli.md says how to add one.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Generic, TypeVar

from . import argtypes
from .argtypes import AGENT_ENV, QMP_ENV
from .exit_codes import exit_code_help
from .output import PROG, WIDTH

__all__ = [
    "ADDRESS_HELP",
    "Command",
    "CommonOptions",
    "ExecuteFields",
    "Formatter",
    "Group",
    "add_common_options",
    "add_execute_arguments",
    "connected",
    "shared_default",
    "wrap",
]

ADDRESS_HELP: Final = f"""\
addresses:
  --qmp ADDR     a unix socket path or HOST:PORT (also unix:PATH, tcp:HOST:PORT, [v6]:PORT);
                 default ${QMP_ENV}
  --agent ADDR   a unix socket path, HOST:PORT or vsock:CID:PORT; default ${AGENT_ENV}"""


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilogs' tables as written; descriptions are wrapped by :func:`wrap`."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=WIDTH)


def wrap(text: str) -> str:
    """A description paragraph, filled to the help's width."""
    return textwrap.fill(text, WIDTH - 2)


_O = TypeVar("_O", bound="CommonOptions")
_R = TypeVar("_R")


@dataclasses.dataclass(frozen=True)
class CommonOptions:
    """The options of every command: ``--json``, ``-v``/``--verbose``, ``--debug``.

    A command's options are a subclass whose field names are the argparse ``dest`` names."""

    json: bool
    verbose: bool
    debug: bool

    def usage_problem(self) -> str | None:
        """What argparse cannot check by itself: the message of a usage error (exit status 2,
        reported by the command's parser), or None. Subclasses check ``super()`` first."""
        return None

    @classmethod
    def from_namespace(cls: type[_O], ns: argparse.Namespace) -> _O:
        """The options of this class taken from a parsed command line."""
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def shared_default(owner: bool) -> Callable[[object], object]:
    """The defaults of an option repeated on nested parsers: its value on the parser that owns
    it, SUPPRESS on the others, so that an option given before a subcommand is not reset by the
    subcommand's parser."""
    return lambda value: value if owner else argparse.SUPPRESS


def add_common_options(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """--json / --debug / --verbose: on the top parser with defaults, repeated on every
    subcommand (default SUPPRESS, so they can be given before or after the subcommand)."""
    default = shared_default(top)
    g = parser.add_argument_group("output")
    g.add_argument("--json", action="store_true", default=default(False),
                   help="machine-readable JSON on stdout (errors too: {\"error\": {...}})")
    g.add_argument("-v", "--verbose", action="store_true", default=default(False),
                   help="also show the library's warnings and log (INFO)")
    g.add_argument("--debug", action="store_true", default=default(False),
                   help="log everything (DEBUG) and show tracebacks of errors")


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class Command(Generic[_O]):
    """One runnable subcommand (``snapshot``) or action of a group (``agent ping``).

    Attributes:
        name: what is typed on the command line.
        help: one line for the list of commands; also the description unless one is given.
        options: the dataclass :meth:`run` gets, built from the parsed command line.
        run: does the work and returns the exit status; errors it raises are reported by
            :mod:`qmpagent.cli.failures`.
        add_arguments: adds the command's own arguments to its parser.
        description: the paragraph at the top of ``--help`` (filled to width).
        epilog: text after the options in ``--help`` (kept as written).
        stop_is_ok: SIGINT/SIGTERM is how the command is meant to stop (exit 0).
    """

    name: str
    help: str
    options: type[_O]
    run: Callable[[_O], Awaitable[int]]
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    description: str | None = None
    epilog: str | None = None
    stop_is_ok: bool = False

    def parser(self, subparsers: Any) -> argparse.ArgumentParser:
        """This command's parser, bare, in ``subparsers``; it names the command to run."""
        description = self.description or self.help[:1].upper() + self.help[1:] + "."
        p: argparse.ArgumentParser = subparsers.add_parser(
            self.name, help=self.help, description=wrap(description), formatter_class=Formatter,
            epilog=self.epilog,
        )
        p.set_defaults(command_unit=self, command_parser=p)
        return p

    def add_to(self, subparsers: Any) -> None:
        """Add this command, with its arguments and the common options, to ``subparsers``."""
        p = self.parser(subparsers)
        self.add_arguments(p)
        add_common_options(p)


@dataclasses.dataclass(frozen=True)
class Group:
    """A command whose actions share connection options: ``qmpagent agent ACTION``.

    Attributes:
        name, help, description: as for :class:`Command`.
        examples: command lines (without ``qmpagent``) for the epilog, between the addresses
            and the exit statuses.
        add_options: adds the shared options to the group's parser (``leaf=False``: with their
            defaults) and to each action's (``leaf=True``: default SUPPRESS, so an option given
            before the action is not reset by the action's parser).
        actions: the group's commands, in the order ``--help`` lists them.
    """

    name: str
    help: str
    description: str
    examples: tuple[str, ...]
    add_options: Callable[[argparse.ArgumentParser, bool], None]
    actions: tuple[Command[Any], ...]

    def epilog(self) -> str:
        """The text after the group's options in ``--help``."""
        examples = "".join(f"  {PROG} {example}\n" for example in self.examples)
        return f"{ADDRESS_HELP}\n\nexamples:\n{examples}\n{exit_code_help()}"

    def add_to(self, subparsers: Any) -> None:
        """Add the group and its actions to ``subparsers``."""
        group: argparse.ArgumentParser = subparsers.add_parser(
            self.name, help=self.help, description=wrap(self.description),
            formatter_class=Formatter, epilog=self.epilog(),
        )
        self.add_options(group, False)
        add_common_options(group)
        group.set_defaults(command_parser=group)
        sub = group.add_subparsers(dest=f"{self.name}_command", metavar="ACTION", required=True)
        for action in self.actions:
            p = action.parser(sub)
            self.add_options(p, True)
            add_common_options(p)
            action.add_arguments(p)


def connected(
    connect: Callable[[_O], AbstractAsyncContextManager[_R]],
    act: Callable[[_R, _O], Awaitable[int]],
) -> Callable[[_O], Awaitable[int]]:
    """The ``run`` of a group's action: ``act`` on the connection ``connect`` opens (and closes)."""
    async def run(opts: _O) -> int:
        async with connect(opts) as connection:
            return await act(connection, opts)

    return run


@dataclasses.dataclass(frozen=True)
class ExecuteFields:
    """The options of ``agent execute`` and ``qmp execute`` (mixed into the group's options)."""

    name: str
    arguments: dict[str, Any] | None


def add_execute_arguments(example: str) -> Callable[[argparse.ArgumentParser], None]:
    """``COMMAND [ARGS]`` of an ``execute`` action; ``example`` is a command of its peer."""
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", metavar="COMMAND", help=f"e.g. {example}")
        p.add_argument("arguments", metavar="ARGS", type=argtypes.json_object, nargs="?",
                       help="its arguments as a JSON object ('-': read from stdin)")

    return add
