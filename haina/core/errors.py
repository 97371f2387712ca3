"""User-facing errors.

A `HainaError` is a mistake the user can fix (a missing file, an unknown config key, a bad
option). The CLI prints its message as one line and exits with status 2; tracebacks are kept
for real bugs and for `--debug`.
"""


class HainaError(Exception):
    """An error caused by user input; its message names the problem and the fix."""


def require(condition: bool, message: str) -> None:
    """Raise `HainaError(message)` unless `condition` holds."""
    if not condition:
        raise HainaError(message)
