"""The ``qmpagent`` command line. The only package that prints, configures logging or calls
``asyncio.run``.

Subcommands mirror the library:

* ``qmpagent agent ...``: the guest agent (:class:`~qmpagent.GuestAgent`): ``ping``, ``info``,
  ``fsfreeze status|freeze|thaw``, ``exec``, ``osinfo``, ``fsinfo``, ``execute``, ``shutdown``;
* ``qmpagent qmp ...``: QMP (:class:`~qmpagent.Monitor`): ``execute``, ``events``, ``wait-event``;
* ``qmpagent snapshot ...``: :class:`~qmpagent.snapshot.SnapshotOrchestrator`;
* ``qmpagent demo``: boot the built-in test guest and take a quiesced snapshot of it.

Human output by default, ``--json`` for machines. Errors are one line on stderr (a traceback
only with ``--debug``) and a distinct exit status, :class:`ExitCode`.

The modules: :mod:`.main` (entry point, parser, signals, ``COMMANDS``), :mod:`.command` (what a
command is), :mod:`.failures` (the one table from exception class to exit status, message and
JSON fields), :mod:`.exit_codes`, :mod:`.argtypes` (addresses and argument types),
:mod:`.output`, :mod:`.connect`, and one ``cmd_*`` module per command.
"""

from __future__ import annotations

from .argtypes import AGENT_ENV, QMP_ENV, parse_agent_address, parse_qmp_address
from .exit_codes import EXIT_CODE_HELP, ExitCode
from .failures import exit_code_for
from .main import build_parser, main
from .output import PROG

__all__ = [
    "AGENT_ENV",
    "EXIT_CODE_HELP",
    "PROG",
    "QMP_ENV",
    "ExitCode",
    "build_parser",
    "exit_code_for",
    "main",
    "parse_agent_address",
    "parse_qmp_address",
]
