"""What a study may be called, declared once for the spec (which refuses a bad name in the YAML) and the store
(which refuses it from any caller). Torch-free, like everything a spec check needs."""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
NAME_RULE = "use 1-100 letters, digits, '_', '.', '-' (starting with a letter or digit)"


def is_valid_name(name: object) -> bool:
    """`fullmatch`: `$` alone would let a trailing newline through."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None
