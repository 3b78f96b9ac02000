"""pytest plugin of qmpagent (registered through the ``pytest11`` entry point).

Fixtures:

* ``fake_vm``: a started :class:`qmpagent.testing.FakeVM` (one disk) per test, no QEMU needed:
  connect to ``fake_vm.qmp_address`` and ``fake_vm.agent_address``, inject faults through
  ``fake_vm.agent`` and ``fake_vm.qmp``. Closed (and its directory removed) afterwards.
* ``fake_vm_factory``: ``async with fake_vm_factory(disks=2, no_reboot=True) as vm`` for tests
  that need other options or several fake VMs; any left open are closed after the test.
* ``qemu_guest``: a fresh throwaway guest per test (real QEMU under TCG, real ``qemu-ga``),
  booted with :func:`qmpagent.testing.boot_guest` defaults and stopped and removed afterwards.
* ``qemu_guest_factory``: ``async with qemu_guest_factory(second_disk=True, ...) as guest`` for
  tests that need other options or several guests.

Tests that use the real guest are marked ``real_vm`` automatically, so ``-m real_vm`` selects
them and ``-m "not real_vm"`` leaves them out. When the guest cannot be built (QEMU or another
package missing) they are skipped, except when the environment variable ``CI`` is set: then
they fail, so a CI run without QEMU cannot pass by skipping its real-VM tests (call
:func:`require_guest_image` for the same rule in your own real-VM fixtures).

The fixtures are async (pytest-asyncio); in its strict mode mark the tests that use them with
``@pytest.mark.asyncio``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from .fake_vm import FakeVM
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


def require_guest_image() -> None:
    """Build (or find cached) the real test guest, or skip the calling test when it cannot be
    built; with the environment variable ``CI`` set, fail instead of skipping."""
    try:
        build_guest_image()
    except GuestBuildError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"real-VM test cannot run in CI: {exc}", pytrace=False)
        pytest.skip(f"real-VM test needs the test guest: {exc}")


_require_guest_image = require_guest_image  # the former private name


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

    @pytest_asyncio.fixture
    async def fake_vm() -> AsyncIterator[FakeVM]:
        """A started fake VM (fake QEMU + fake guest agent, one disk); closed after the test."""
        async with FakeVM() as vm:
            yield vm

    @pytest_asyncio.fixture
    async def fake_vm_factory() -> AsyncIterator[Callable[..., FakeVM]]:
        """A factory of fake VMs with options: ``async with fake_vm_factory(disks=2) as vm``.

        Any VM it made and the test left open is closed after the test.
        """
        made: list[FakeVM] = []

        def factory(*args: Any, **options: Any) -> FakeVM:
            vm = FakeVM(*args, **options)
            made.append(vm)
            return vm

        try:
            yield factory
        finally:
            for vm in made:
                await vm.close()
