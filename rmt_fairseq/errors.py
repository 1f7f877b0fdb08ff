"""User-facing configuration errors: one line naming the flag (or file) and the offending value.

fairseq's CLIs let exceptions escape with a traceback. For our own `RMTConfigError` we print just
`error: <message>` and exit with status 2 (argparse's convention), so a bad flag reads like argparse's own
complaint. Any other exception keeps Python's default traceback."""

import sys


class RMTConfigError(ValueError):
    pass


def _excepthook(exc_type, exc, tb, _default=sys.excepthook):
    if issubclass(exc_type, RMTConfigError):
        sys.stderr.write(f"error: {exc}\n")
        sys.stdout.flush()
        sys.stderr.flush()
        # sys.exit is not possible from an excepthook; the interpreter exits 1 after it. Force 2.
        import os

        os._exit(2)
    _default(exc_type, exc, tb)


def install_excepthook() -> None:
    if sys.excepthook is not _excepthook:
        sys.excepthook = _excepthook


def check(condition: bool, message: str) -> None:
    if not condition:
        raise RMTConfigError(message)
