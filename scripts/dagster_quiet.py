"""`dagster ...` without Dagster's notes on its own beta/preview/superseded APIs (`make demo`).

Python's -W option cannot name a third-party warning class, so the filters are set here before
Dagster's command line runs in this process.
"""

import sys
import warnings

import dagster

for category in (dagster.BetaWarning, dagster.PreviewWarning, dagster.SupersessionWarning):
    warnings.filterwarnings("ignore", category=category)

from dagster._cli import main  # noqa: E402  (after the filters: importing it already warns)

if __name__ == "__main__":
    sys.argv[0] = "dagster"
    sys.exit(main())
