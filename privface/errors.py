"""The one exception the service layer raises on purpose, named after its gRPC status."""

from __future__ import annotations


class ServiceError(Exception):
    """A refused request: ``code`` is a ``grpc.StatusCode`` name, ``reason`` a short
    machine-readable cause (sent as ``privface-reason`` trailing metadata) when there is one.

    The message is written for the person who sent the request: what was wrong and what to
    do. It never holds biometric or decrypted personal data.
    """

    def __init__(self, code: str, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
