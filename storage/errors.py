"""Exceptions raised by :mod:`storage`.

Each class carries ``grpc_code``: the *name* of the gRPC status code the service should answer
with (``grpc.StatusCode[err.grpc_code]``). Storage keeps no gRPC dependency so it can be used
and tested alone; the names keep the mapping in one place instead of a table in the service.
Messages are written for the person who sent the request: they say what was wrong and what to
do, and never contain biometric data or decrypted personal data.
"""

from __future__ import annotations

from typing import ClassVar


class StorageError(Exception):
    """Base class: anything storage raises on purpose."""

    grpc_code: ClassVar[str] = "INTERNAL"


class InvalidArgument(StorageError, ValueError):  # noqa: N818 - names mirror gRPC status codes
    """The request itself is malformed (bad name, wrong template shape, NaN, bad page token)."""

    grpc_code = "INVALID_ARGUMENT"


class NotFound(StorageError, LookupError):  # noqa: N818 - names mirror gRPC status codes
    """A gallery, subject or sample named in the request does not exist."""

    grpc_code = "NOT_FOUND"


class GalleryNotFound(NotFound):
    def __init__(self, gallery: str) -> None:
        super().__init__(f"gallery {gallery!r} does not exist")
        self.gallery = gallery


class SubjectNotFound(NotFound):
    def __init__(self, gallery: str, subject_id: str) -> None:
        super().__init__(f"subject {subject_id!r} does not exist in gallery {gallery!r}")
        self.gallery = gallery
        self.subject_id = subject_id


class SampleNotFound(NotFound):
    def __init__(self, gallery: str, subject_id: str, sample_ids: list[int]) -> None:
        ids = ", ".join(str(i) for i in sample_ids)
        super().__init__(
            f"sample(s) {ids} do not belong to subject {subject_id!r} in gallery {gallery!r}"
        )
        self.gallery = gallery
        self.subject_id = subject_id
        self.sample_ids = sample_ids


class AlreadyExists(StorageError):  # noqa: N818 - names mirror gRPC status codes
    """Creating something whose unique name is taken (gallery name, subject id in a gallery)."""

    grpc_code = "ALREADY_EXISTS"


class IdempotencyConflict(StorageError):  # noqa: N818 - names mirror gRPC status codes
    """An idempotency key was reused for a request with different content.

    Retrying with the same key must send the same request; a new request needs a new key.
    """

    grpc_code = "ALREADY_EXISTS"

    def __init__(self, gallery: str, key: str) -> None:
        super().__init__(
            f"idempotency key {key!r} in gallery {gallery!r} was already used for a different "
            "request; retry with the original request or use a new key"
        )
        self.gallery = gallery
        self.key = key


class FailedPrecondition(StorageError):  # noqa: N818 - names mirror gRPC status codes
    """The request is well formed but the stored state does not allow it."""

    grpc_code = "FAILED_PRECONDITION"


class TemplateDimensionMismatch(FailedPrecondition):
    """A template's length differs from the templates of the same model already in the gallery.

    One FAISS index per gallery and model needs one dimension; storing a mismatched template
    would break the next index rebuild, so it is refused up front.
    """


class StaleCursor(FailedPrecondition):
    """A change-feed cursor can no longer be caught up; the index must be rebuilt from scratch.

    Raised when the tombstones it would need were purged, or when the cursor belongs to an
    earlier gallery with the same name (deleted and re-created).
    """


class KeyRingError(StorageError):
    """The key ring configuration is missing or malformed (an operator problem)."""

    grpc_code = "FAILED_PRECONDITION"


class UnknownKeyId(KeyRingError):  # noqa: N818 - names mirror gRPC status codes
    """A stored value was encrypted with a key that is not in the loaded key ring."""

    def __init__(self, key_id: str, known: list[str]) -> None:
        super().__init__(
            f"value is encrypted with key id {key_id!r}, which is not in the key ring "
            f"(loaded: {', '.join(sorted(known)) or 'none'}); load a key file that still holds "
            f"{key_id!r}, and only remove a key after rotate_keys() reports it unused"
        )
        self.key_id = key_id


class DecryptionFailed(StorageError):  # noqa: N818 - names mirror gRPC status codes
    """Authentication failed: wrong key, tampered ciphertext, or a value moved between rows."""

    grpc_code = "DATA_LOSS"
