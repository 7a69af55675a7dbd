"""The one kind of error a user sees: a UserError becomes one line on stderr and exit code 2, never a traceback.
Raised anywhere (common.py's input checks, the levels, support/); printed by support.run.run_main."""
import sys


class UserError(Exception):
    """A problem with the input, files or machine that the user can fix; its message says how."""


def fail(message):
    """The one line, and exit code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
