"""Errors a user can act on: each message names what failed and how to fix it."""


class ModelUnavailableError(RuntimeError):
    """A model could not be loaded (not cached, not downloadable, not installed, or wrong device)."""


class QueryError(ValueError):
    """A query cannot be explained as given (empty, unknown word index, nothing to tokenize)."""


class SettingError(ValueError):
    """A setting's value does not suit the loaded models (a layer they do not have, an instruction the model's
    processor refuses): the settings alone could not tell."""
