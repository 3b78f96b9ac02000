"""The error a fake QMP command answers with: :class:`FakeQMPError`."""

from __future__ import annotations

__all__ = ["FakeQMPError", "generic_error"]


class FakeQMPError(Exception):
    """Raised by a handler to answer with a QMP error.

    Attributes:
        error_class: the QAPI error class (``"GenericError"``, ``"CommandNotFound"``,
            ``"DeviceNotFound"``, ...).
        desc: the description.
    """

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


def generic_error(desc: str) -> FakeQMPError:
    """A ``GenericError`` with ``desc`` (most of QEMU's errors are of this class)."""
    return FakeQMPError("GenericError", desc)
