"""The one exception family users see: a message that says what is wrong and what to do."""


class DifftrainError(ValueError):
    """An error the user can fix (a config key, a file, a path); str() is the whole message."""
