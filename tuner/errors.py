"""The one exception type a user can cause and fix; the CLI prints it as a single line."""

from __future__ import annotations

from pydantic import ValidationError


class TunerError(Exception):
    """A mistake in the user's input (a file, a field, a flag): shown as one line, exit code 2."""


def describe_validation_error(err: ValidationError, source: str) -> str:
    """Name every bad field by its path, so the user can find it in their YAML or flags."""
    parts = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(top level)"
        parts.append(f"{loc}: {item['msg']}")
    return f"{source}: " + "; ".join(parts)
