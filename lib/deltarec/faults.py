"""Fault injection for tests and drills: ``crash_point(NAME)`` ends the process
at once (exit code 86, no cleanup) when the environment variable
``DELTAREC_CRASH_AT`` is NAME, and stops it (SIGSTOP, after logging "paused at
NAME") when ``DELTAREC_PAUSE_AT`` is NAME, so a test can kill it from outside
by PID at exactly that point, or race another run against it.

Points: ``after_state_write`` (pipeline/delta_job.py: quarantine, index and
state written, examples not), ``before_ledger_commit`` (pipeline/publish.py:
the checkpoint is written and verified, the ledger row is not),
``after_ledger_commit`` (the ledger row is written, its audit event and the
cleanup of earlier attempts are not), ``after_inrun_checkpoint``
(train/resume.py: an in-run checkpoint is complete, training is not),
``after_checkpoint_write`` (train/loop.py: the candidate's checkpoint is
complete; nothing scored or committed it), and privacy/'s ``forget_*`` points.
The training points fire in the process that trains (the nightly's own with
``train.backend=local``, a worker's otherwise).
Reads: the environment. Writes: nothing.
"""
from __future__ import annotations

import logging
import os
import signal

CRASH_ENV = "DELTAREC_CRASH_AT"
PAUSE_ENV = "DELTAREC_PAUSE_AT"
CRASH_EXIT_CODE = 86
PAUSED = "paused at"  # the log line a test waits for before it signals the process

log = logging.getLogger("deltarec.faults")


def crash_point(name: str) -> None:
    """Exit immediately when ``DELTAREC_CRASH_AT`` names this point; stop
    (until SIGCONT or SIGKILL) when ``DELTAREC_PAUSE_AT`` does."""
    if os.environ.get(CRASH_ENV) == name:
        log.error("crash injected at %s (%s=%s)", name, CRASH_ENV, name)
        os._exit(CRASH_EXIT_CODE)
    if os.environ.get(PAUSE_ENV) == name:
        log.error("%s %s (%s=%s): pid %d stops for a signal", PAUSED, name, PAUSE_ENV, name, os.getpid())
        for h in logging.getLogger().handlers + log.handlers:
            h.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
