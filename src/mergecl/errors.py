"""The one exception type for errors a user can cause.

The CLI prints ``mergecl: error: <message>`` for it and exits 2, without a traceback. Messages are
one line and name the thing that is wrong (the tensor, the file, the config key).
"""


class MergeclError(Exception):
    """A user-facing error: bad input, bad config, unreadable or inconsistent checkpoint."""
