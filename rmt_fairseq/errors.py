"""User-facing configuration errors: one line naming the flag (or file) and the offending value.

fairseq's CLIs let exceptions escape with a traceback. For our own `RMTConfigError` we print just
`error: <message>` and exit with status 2 (argparse's convention), so a bad flag reads like argparse's own
complaint. Any other exception keeps Python's default traceback."""

import sys


class RMTConfigError(ValueError):
    """A bad flag, file or value, found before or while loading: exit status 2."""


class RMTRunError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss): exit status 1."""


def _excepthook(exc_type, exc, tb, _default=sys.excepthook):
    if issubclass(exc_type, (RMTConfigError, RMTRunError)):
        # the process's own stderr: torch.distributed's excepthook (installed by init_process_group around this
        # one) points sys.stderr at a buffer it prints after the hook returns, and this hook does not return
        err = sys.__stderr__ or sys.stderr
        err.write(f"error: {exc}\n")
        sys.stdout.flush()
        err.flush()
        # sys.exit is not possible from an excepthook; the interpreter exits 1 after it. Force the status.
        import os

        os._exit(2 if issubclass(exc_type, RMTConfigError) else 1)
    _default(exc_type, exc, tb)


def install_excepthook() -> None:
    if sys.excepthook is not _excepthook:
        sys.excepthook = _excepthook


def check(condition: bool, message: str) -> None:
    if not condition:
        raise RMTConfigError(message)
