"""The one exception family users see: a message that says what is wrong and what to do."""


class DifftrainError(ValueError):
    """An error the user can fix (a config key, a file, a path); str() is the whole message."""


class ConfigError(DifftrainError):
    """A setting that cannot work; the message names the config key and is meant for the user as it is."""


class UpscalerError(DifftrainError):
    """An upscaler file that is absent, unreadable or no network this toolkit knows; the message starts with the
    setting (upscaler, scale, tile), so a command line can name its flag."""
