"""The one exception type for mistakes a user can make (bad path, unknown game, wrong checkpoint).

The CLI prints its message as one sentence and exits non-zero without a traceback; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message is one sentence naming the thing and the fix."""
