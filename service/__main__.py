"""`python -m service`: serve on the settings in RICE_* environment variables (the container's entry point).

The operator tools (`rice ...`) live outside the served package and are not needed to serve.
"""

from __future__ import annotations

from service.server import serve
from service.settings import Settings

if __name__ == "__main__":
    serve(Settings())
