"""Constants the freeze guard (:mod:`qmpagent._guard_main`) and the orchestrator's side
(:mod:`qmpagent.guard`) share. Imports nothing."""

from __future__ import annotations

#: Seconds after the freeze deadline before the guard acts on a stuck orchestrator (the
#: orchestrator's own thaw at the deadline comes first; the guard's resync, status and thaw
#: take a few ms to tens of ms more: thawed well within 1 s of the deadline).
GRACE: float = 0.25

#: What the orchestrator runs (``python -I -S -c BOOT PACKAGE_DIR ARGS...``): this module
#: without importing the ``qmpagent`` package (its ``__init__`` pulls in asyncio, anyio and
#: qemu.qmp: ~0.1 s more start-up), only the few stdlib-only modules the guard needs.
BOOT = (
    "import sys, types; pkg = types.ModuleType('qmpagent'); pkg.__path__ = [sys.argv.pop(1)]; "
    "sys.modules['qmpagent'] = pkg; from qmpagent._guard_main import main; "
    "sys.exit(main(sys.argv[1:]))"
)
