"""`python -m service`: serve on the settings in RICE_* environment variables (the container's entry point).

The operator tools (`rice ...`) live outside the served package and are not needed to serve. A setting
that cannot work is one line per error on stderr and exit status 2 (`service.startup`).
"""

from __future__ import annotations

import sys

from service.startup import run

if __name__ == "__main__":
    sys.exit(run("rice service"))
