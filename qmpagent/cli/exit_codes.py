"""The exit statuses of the ``qmpagent`` command, and their lines in ``--help``."""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["EXIT_CODE_HELP", "ExitCode", "exit_code_help"]


class ExitCode(enum.IntEnum):
    """The exit statuses of the ``qmpagent`` command. Each failure class has its own."""

    OK = 0
    #: Any other failure: a malformed reply from QEMU or the guest, lost events, a failed
    #: demo check, an unexpected error.
    ERROR = 1
    #: A bad command line or bad arguments (argparse's own status; also the library's
    #: :class:`~qmpagent.UsageError`, e.g. an unknown disk or an existing overlay file).
    USAGE = 2
    #: The guest agent cannot be reached: no socket, its port closed in the guest (qemu-ga not
    #: running), or no answer to sync/ping.
    AGENT_UNAVAILABLE = 3
    #: QMP cannot be reached (no socket, QEMU not running) or the connection was lost.
    QMP_UNAVAILABLE = 4
    #: A command or a wait got no answer in time.
    TIMEOUT = 5
    #: QEMU or the agent answered with an error (unknown command, bad arguments...), or a
    #: program run with ``agent exec`` exited non-zero or was killed.
    COMMAND_ERROR = 6
    #: ``snapshot``: no snapshot was taken, or it could not be quiesced under
    #: ``--quiesce required`` (the error says whether the VM runs on the overlays).
    SNAPSHOT_FAILED = 7
    #: ``snapshot``: our freeze could not be thawed; ``recover``: a freeze of ours may still be
    #: in place. THE GUEST MAY STILL BE FROZEN.
    THAW_FAILED = 8
    #: ``commit``: the commit did not finish (the error says where the VM runs: on its active
    #: layer, or on the base with merged nodes left); run it again to finish.
    COMMIT_FAILED = 9
    #: ``backup``: the backup did not complete (refused, failed, timed out, or not quiesced
    #: under ``--quiesce required``); its files were removed, no tracked change was lost.
    BACKUP_FAILED = 10
    #: Interrupted by SIGINT (Ctrl-C). A freeze made by this command is thawed first.
    INTERRUPTED = 130
    #: Terminated by SIGTERM. A freeze made by this command is thawed first.
    TERMINATED = 143


#: One line per exit status, for ``--help`` and docs/cli.md.
EXIT_CODE_HELP: Final[dict[ExitCode, str]] = {
    ExitCode.OK: "success",
    ExitCode.ERROR: "other error (malformed reply, lost events, failed demo check)",
    ExitCode.USAGE: "bad command line or arguments (unknown disk, existing overlay file...)",
    ExitCode.AGENT_UNAVAILABLE: "guest agent unreachable: no socket, qemu-ga not running, no answer",
    ExitCode.QMP_UNAVAILABLE: "QMP unreachable: no socket, QEMU not running, connection lost",
    ExitCode.TIMEOUT: "a command or a wait got no answer in time",
    ExitCode.COMMAND_ERROR: "QEMU or the agent answered with an error; `agent exec` program failed",
    ExitCode.SNAPSHOT_FAILED: "snapshot failed (or not quiesced under --quiesce required)",
    ExitCode.THAW_FAILED: "THAW FAILED: THE GUEST MAY STILL BE FROZEN; check and thaw by hand",
    ExitCode.COMMIT_FAILED: "commit did not finish (the VM runs on a valid chain; see the message)",
    ExitCode.BACKUP_FAILED: "backup did not complete (its files removed, no tracked change lost)",
    ExitCode.INTERRUPTED: "interrupted (SIGINT); a freeze of ours is thawed first",
    ExitCode.TERMINATED: "terminated (SIGTERM); a freeze of ours is thawed first",
}


def exit_code_help() -> str:
    """The ``exit status:`` section of the help texts, one line per :class:`ExitCode`."""
    lines = ["exit status:"]
    for code, text in EXIT_CODE_HELP.items():
        lines.append(f"  {int(code):<4} {code.name.lower().replace('_', '-'):<18} {text}")
    return "\n".join(lines)
