"""Error envelopes of MindIE Service: ``{"error": ..., "error_type": ...}`` with a per-status label."""
from __future__ import annotations

ERROR_TYPES = {
    400: "Bad Request",
    404: "NotFoundError",
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


def invalid(message: str) -> ApiError:
    return ApiError(422, message)
