"""Fault injection for tests and drills: ``crash_point(NAME)`` ends the process
at once (exit code 86, no cleanup) when the environment variable
``DELTAREC_CRASH_AT`` is NAME, so a test can prove a crash there leaves the
lake consistent.

Points: ``before_ledger_commit`` (pipeline/nightly.py: the checkpoint is
written and verified, the ledger row is not). Reads: the environment.
Writes: nothing.
"""
from __future__ import annotations

import logging
import os

CRASH_ENV = "DELTAREC_CRASH_AT"
CRASH_EXIT_CODE = 86

log = logging.getLogger("deltarec.faults")


def crash_point(name: str) -> None:
    """Exit immediately when ``DELTAREC_CRASH_AT`` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        log.error("crash injected at %s (%s=%s)", name, CRASH_ENV, name)
        os._exit(CRASH_EXIT_CODE)
