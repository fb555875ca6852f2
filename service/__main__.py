"""`python -m service`: serve on the settings in RICE_* environment variables (the container's entry point).

The operator tools (`rice ...`) live outside the served package and are not needed to serve.
"""

from __future__ import annotations

import sys

from service.server import serve
from service.settings import Settings

if __name__ == "__main__":
    try:
        serve(Settings())
    except ValueError as exc:  # a setting the app refuses (bad RICE_API_KEYS, no keys with RICE_ALLOW_OPEN=false): say why, no traceback
        print(f"rice service: {exc}", file=sys.stderr)
        sys.exit(2)
