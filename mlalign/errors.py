"""The one exception type for mistakes a user can make (bad config, missing files, no model access)."""


class UserError(Exception):
    """A problem the user can fix. `run.py` prints the message as one line and exits non-zero, without a traceback.

    The message must say what was wrong and what to type instead.
    """
