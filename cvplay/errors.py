"""The one exception type a user sees as a one-line error, and the wrapper that shows it."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable


class CvplayError(Exception):
    """A problem the user can fix: the message names the file or key and the fix."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (temporary files) runs."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a CvplayError becomes one line on stderr and exit status 2.

    Ctrl-C (SIGINT) and SIGTERM stop it with one line and the shell's status (130, 143),
    after removing temporary files; the train stage resumes when run again.
    """
    signal.signal(signal.SIGTERM, _on_sigterm)
    # A shell starts background jobs with SIGINT ignored, and Python then keeps it ignored:
    # `kill -INT` of a stage run with `&` or from CI would do nothing. Always handle it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    except CvplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, Terminated) as exc:
        name = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
        print(
            f"interrupted ({name}); run the same command again to continue "
            "(training resumes after its last completed epoch)",
            file=sys.stderr,
        )
        sys.exit(143 if isinstance(exc, Terminated) else 130)
