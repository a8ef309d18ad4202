"""Domain errors raised by services; the API maps them to HTTP in one exception handler."""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every domain error; ``code`` is a stable machine-readable name."""

    code = "registry_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(RegistryError):
    code = "not_found"


class InvalidState(RegistryError):
    """The object exists but is in a state that forbids the operation (e.g. not pending)."""

    code = "invalid_state"


class InvalidInput(RegistryError):
    """A request field is malformed (bad file name, unknown role, ...)."""

    code = "invalid_input"


class ValidationFailed(RegistryError):
    """Uploaded content failed validation; names the file and, when known, the tensor."""

    code = "validation_failed"

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.tensor = tensor


class IntegrityMismatch(ValidationFailed):
    """Content does not hash to the sha256 the client declared."""

    code = "sha256_mismatch"


class BaseMismatch(ValidationFailed):
    """A checkpoint's tensors do not fit its declared base."""

    code = "base_mismatch"


class DependentsExist(RegistryError):
    """Deletion refused: other checkpoints depend on this one."""

    code = "dependents_exist"


class Unauthenticated(RegistryError):
    code = "unauthenticated"


class Forbidden(RegistryError):
    code = "forbidden"


class UploadStalled(RegistryError):
    """The client sent no body bytes for longer than the upload idle timeout."""

    code = "upload_idle_timeout"


class TooManyUploads(RegistryError):
    """Upload refused for now: the token (or the server) has every upload slot in use."""

    code = "too_many_uploads"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ClientDisconnected(RegistryError):
    """The client went away before its request body was read in full."""

    code = "client_disconnected"
