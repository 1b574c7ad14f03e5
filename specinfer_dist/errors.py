"""Typed errors for user mistakes. The CLI prints them as one line and exits non-zero."""


class SpecInferError(ValueError):
    """Base class for every error caused by what a user passed in."""


class ModelLoadError(SpecInferError):
    """A model source is missing, corrupt, unsupported, or incompatible with the LLM."""


class InvalidConfigError(SpecInferError):
    """A tree spec, engine option or config file is malformed."""


class InvalidRequestError(SpecInferError):
    """A prompt or its sampling parameters cannot be served (empty, too long, bad values)."""


class EngineOverloadedError(SpecInferError):
    """The engine's queue is full: the request is refused now and may be retried later (HTTP 429)."""
