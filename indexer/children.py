"""Child processes of the node that must not outlive it (index snapshot writers, DICOM receivers)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Resolved here, at import, in the parent: a forked child must not call dlopen/dlsym (another thread may have held
# the loader's lock at the fork).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def die_with(parent: int) -> None:
    """In a child of ``parent``: be killed when it dies (Linux), and exit now if it already has."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
