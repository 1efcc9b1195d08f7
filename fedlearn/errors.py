"""The one exception tree of fedlearn.

::

    FedlearnError
    ├── ConfigError          bad settings, caught before any round runs
    │   └── RunConflict      a run directory holds another run, or another process uses it
    ├── DataError            a dataset or partition cannot be built
    ├── SerializationError   bytes that do not decode to a record
    ├── UpdateRejected       a client's reply failed validation (shape, dtype, NaN/Inf, ...)
    ├── AuthError            a client failed authentication (unknown, revoked, replayed)
    ├── SecAggError          secure aggregation refused a message or could not finish
    ├── RoundFailed          a round could not reach its quorum; the global model is unchanged
    ├── RunInterrupted       a run stopped at a clean point on request; it can be resumed
    └── InferenceError       a serving request cannot be answered
        ├── ModelNotFound    unknown model name or version
        ├── ModelNotReady    the model exists but has no servable version loaded
        └── InvalidInput     a request's tensors do not match the model's signature
"""

from __future__ import annotations


class FedlearnError(Exception):
    """Base class of every error fedlearn raises on purpose."""


class ConfigError(FedlearnError):
    """Invalid configuration or strategy settings."""


class RunConflict(ConfigError):
    """A run cannot start or continue in its directory: the directory holds a different
    run (the message lists the differing fields and the ways out), or is in use."""


class DataError(FedlearnError):
    """A dataset cannot be loaded or partitioned as asked."""


class SerializationError(FedlearnError):
    """Bytes that do not decode to a valid record."""


class UpdateRejected(FedlearnError):
    """A client's update or evaluation failed validation."""

    def __init__(self, message: str, *, client_id: int | None = None, round: int | None = None):
        where = []
        if round is not None:
            where.append(f"round {round}")
        if client_id is not None:
            where.append(f"client {client_id}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.client_id = client_id
        self.round = round
        self.reason = message


class RoundFailed(FedlearnError):
    """A round did not reach its quorum; nothing was applied."""


class RunInterrupted(FedlearnError):
    """A run stopped at a clean point (Ctrl-C, SIGTERM, a stop request) after committing
    round ``round``; ``resume`` is the command that continues it."""

    def __init__(self, round: int, resume: str, signal: int | None = None) -> None:
        super().__init__(f"interrupted after round {round}; continue with: {resume}")
        self.round = round
        self.resume = resume
        self.signal = signal


class AuthError(FedlearnError):
    """A client failed authentication (unknown, revoked, replayed or bad proof).

    ``retryable`` marks a challenge that lapsed (expired, or dropped to make room for the
    same key's newer ones) rather than a refusal: a fresh join may succeed.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class SecAggError(FedlearnError):
    """Secure aggregation refused a message or could not finish."""


class InferenceError(FedlearnError):
    """A serving request cannot be answered (the endpoint keeps serving)."""


class ModelNotFound(InferenceError):
    """The request names a model or version the endpoint does not have."""


class ModelNotReady(InferenceError):
    """The model is known but no version is loaded for the requested alias."""


class InvalidInput(InferenceError):
    """The request's tensors do not match the model's signature (name, datatype, shape)."""
