"""The ``timeout=`` convention shared by every client in qmpagent (as in httpx).

A ``timeout=`` argument is a number of seconds, ``None`` ("no timeout at all", rarely wise: the
guest is untrusted), or :data:`USE_CLIENT_DEFAULT` ("the client's default"), which is the
default value of every ``timeout=`` parameter.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["USE_CLIENT_DEFAULT", "Timeout", "UseClientDefault", "resolve_timeout"]


class UseClientDefault(enum.Enum):
    """Type of :data:`USE_CLIENT_DEFAULT`: "use the client's default timeout".

    It is distinct from ``None``, which means "no timeout at all".
    """

    USE_CLIENT_DEFAULT = "USE_CLIENT_DEFAULT"

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


#: Default value of ``timeout=`` parameters: take the client's default timeout.
USE_CLIENT_DEFAULT: Final = UseClientDefault.USE_CLIENT_DEFAULT

#: A ``timeout=`` argument: seconds, ``None`` (no timeout) or :data:`USE_CLIENT_DEFAULT`.
Timeout = float | None | UseClientDefault


def resolve_timeout(timeout: Timeout, default: float | None) -> float | None:
    """The effective timeout: ``default`` for :data:`USE_CLIENT_DEFAULT`, else ``timeout``."""
    return default if timeout is USE_CLIENT_DEFAULT else timeout
