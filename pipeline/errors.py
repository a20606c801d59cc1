"""One exception type for every problem the user can fix.

The CLI prints a CurateError as one line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class CurateError(Exception):
    """A problem with the user's input, config or data, told in one line."""


class ShardError(CurateError):
    """A shard or one of its samples cannot be used; names the shard and sample."""
