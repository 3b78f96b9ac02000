"""pytest plugin of qmpagent (registered through the ``pytest11`` entry point).

Fixtures:

* ``qemu_guest``: a fresh throwaway guest per test (real QEMU under TCG, real ``qemu-ga``),
  booted with :func:`qmpagent.testing.boot_guest` defaults and stopped and removed afterwards.
* ``qemu_guest_factory``: ``async with qemu_guest_factory(second_disk=True, ...) as guest`` for
  tests that need other options or several guests.

Tests that use them are marked ``real_vm`` automatically, so ``-m real_vm`` selects them and
``-m "not real_vm"`` leaves them out. When the guest cannot be built (QEMU or another package
missing) they are skipped, except when the environment variable ``CI`` is set: then they fail,
so a CI run without QEMU cannot pass by skipping its real-VM tests.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from .guest import Guest, boot_guest
from .image import GuestBuildError, build_guest_image

try:  # the fixtures are async; without pytest-asyncio only the marker is offered
    import pytest_asyncio

    _HAVE_PYTEST_ASYNCIO = True
except ImportError:  # pragma: no cover
    _HAVE_PYTEST_ASYNCIO = False

_GUEST_FIXTURES = {"qemu_guest", "qemu_guest_factory"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "real_vm: needs real QEMU and the real qemu-ga in a throwaway guest",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _GUEST_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_vm)


def _require_guest_image() -> None:
    try:
        build_guest_image()
    except GuestBuildError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"real-VM test cannot run in CI: {exc}", pytrace=False)
        pytest.skip(f"real-VM test needs the test guest: {exc}")


if _HAVE_PYTEST_ASYNCIO:

    @pytest_asyncio.fixture
    async def qemu_guest() -> AsyncIterator[Guest]:
        """A fresh, running test guest with its agent port open; removed after the test."""
        _require_guest_image()
        async with boot_guest() as guest:
            yield guest

    @pytest_asyncio.fixture
    async def qemu_guest_factory() -> AsyncIterator[
        Callable[..., contextlib.AbstractAsyncContextManager[Guest]]
    ]:
        """A factory of guests with options: ``async with qemu_guest_factory(**opts) as g``."""
        _require_guest_image()

        def factory(**options: Any) -> contextlib.AbstractAsyncContextManager[Guest]:
            return boot_guest(**options)

        yield factory
