"""Errors the pipeline reports to users as one clear line (the CLI prints them without a traceback)."""


class PipelineError(Exception):
    """A user-facing failure: bad config, bad input file, unusable environment."""


class ConfigError(PipelineError):
    """params.yaml (or an imported config) is invalid."""


class StageInputError(PipelineError):
    """A stage's declared input is missing or unusable as a whole (single bad rows are rejects instead)."""
