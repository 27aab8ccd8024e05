"""The engine's error types: each message says what failed and what to do about it."""


class CheckpointError(Exception):
    """A checkpoint file that is missing, unreadable or not written by :func:`apro.engine.train`."""


class DataError(Exception):
    """Loading a training batch failed; the message names the step and the cause."""


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); the message says at which step and why."""
