"""`python -m service`: serve on the settings in RICE_* environment variables (the container's entry point).

The operator tools (`rice ...`) live outside the served package and are not needed to serve.
"""

from __future__ import annotations

import sys

from pydantic import ValidationError

from service.server import serve
from service.settings import Settings


def settings_errors(exc: ValidationError) -> str:
    """Pydantic's report on one line: `RICE_SHARD: ...` for a field, the validator's sentence for a combination."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"RICE_{where.upper()}: {msg}" if where else msg)
    return "; ".join(parts)


if __name__ == "__main__":
    try:
        serve(Settings())
    except ValidationError as exc:  # a bad RICE_* value, or settings that cannot work together: one line each
        print(f"rice service: {settings_errors(exc)}", file=sys.stderr)
        sys.exit(2)
    except ValueError as exc:  # a setting the app refuses (bad RICE_API_KEYS, no keys with RICE_ALLOW_OPEN=false): say why, no traceback
        print(f"rice service: {exc}", file=sys.stderr)
        sys.exit(2)
