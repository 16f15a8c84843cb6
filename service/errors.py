"""Error envelopes of MindIE Service: ``{"error": ..., "error_type": ...}`` with a per-status label."""
from __future__ import annotations

import logging
import uuid

logger = logging.getLogger("service")

ERROR_TYPES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "NotFoundError",
    408: "Request Timeout",
    413: "Payload Too Large",
    422: "Input Validation Error",
    424: "Generation Error",
    500: "Incomplete Generation",
    503: "Service Unavailable",
}

# The parse error of POST /generate: its text is itself a JSON string (double-encoded on the wire).
GENERATE_PARSE_ERROR = (
    '{"Error": "`inputs` or `prompt` must be necessary and data type must be string. Additionally, '
    'the request body must be valid json", "error_type": "validation"}'
)
JSON_PARSE_ERROR = "Failed to parse request context to json"
TOKEN_LIMIT = 1048576


class ApiError(Exception):
    """An HTTP error answered with the spec's envelope."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": self.message, "error_type": ERROR_TYPES.get(self.status, "Incomplete Generation")}


RETRY_AFTER_S = 1


class ServiceStopped(ApiError):
    """The service is shutting down: new work is refused."""

    def __init__(self, message: str = "The service has been stopped"):
        super().__init__(503, message)


class QueueFull(ApiError):
    """The waiting queue is full: 503 with ``Retry-After``."""

    def __init__(self, message: str):
        super().__init__(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})


class TokenCountError(ApiError):
    """The prompt could not be tokenized (``got`` 0, with the ``cause``) or has more tokens than any request
    may carry. Each protocol words it with its own message (:meth:`render`)."""

    def __init__(self, got: int, cause: str | None = None):
        self.got = got
        self.cause = cause
        super().__init__(422, self.render("Prompt token length must be in (0, 1048576], but got {got}"))

    def render(self, message: str) -> ApiError:
        """The client's 422 with ``message`` formatted with ``{got}`` (and the cause appended)."""
        text = message.format(got=self.got)
        if self.cause is not None:
            text += f" Cause: {self.cause}"
        return invalid(text)


def invalid(message: str) -> ApiError:
    return ApiError(422, message)


def new_error_id() -> str:
    """The id a 500 shows the client; the log line with the details carries the same id."""
    return uuid.uuid4().hex[:16]


def internal_error(prefix: str, detail: object) -> ApiError:
    """A server fault: the client reads ``<prefix>: internal error (request id ...)``, never ``detail``
    (library text, paths); the details go to the log under that id."""
    rid = new_error_id()
    logger.error(f"internal error {rid}: {prefix}: {detail}")
    return ApiError(500, f"{prefix}: internal error (request id {rid})")
