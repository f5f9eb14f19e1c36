"""The one exception type a user sees as a one-line error, and the wrapper that shows it."""

from __future__ import annotations

import sys
from collections.abc import Callable


class CvplayError(Exception):
    """A problem the user can fix: the message names the file or key and the fix."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a CvplayError becomes one line on stderr and exit status 2."""
    try:
        main()
    except CvplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
