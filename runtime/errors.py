"""User errors and the one wrapper every command line reports them with.

Errors a user can fix (a missing file, a bad option, a damaged bundle, an unknown class name)
derive from `UserError` and carry a message that names the problem and the fix. Every `main`
runs its body through `run_command`: such errors print one line and exit 2, without a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

__all__ = ["UserError", "DeviceError", "run_command", "USER_ERROR_EXIT"]

USER_ERROR_EXIT = 2  # argparse's own exit status for bad arguments


class UserError(Exception):
    """Base of the errors caused by input, files or options rather than by the code."""


class DeviceError(UserError, RuntimeError):
    """The requested device or execution provider cannot run here (missing GPU package,
    CUDA libraries that do not load)."""


# Beside UserError: argument values refused deep inside a library (ValueError), files that are
# missing or unwritable (OSError), optional packages not installed (ImportError).
_REPORTED = (UserError, ValueError, OSError, ImportError)


def run_command(prog: str, body: Callable[[], int]) -> int:
    """`body()`'s exit status; a user error is printed as `PROG: error: MESSAGE` and gives 2."""
    try:
        return body()
    except _REPORTED as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
