"""OpenAI's error envelope, and the exception the gateway raises to produce one."""

from __future__ import annotations

import orjson

# The `type` OpenAI uses for each status the gateway emits.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class GatewayError(Exception):
    """An error answered to the client in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPE_BY_STATUS.get(status, "api_error")
        self.headers = headers or {}

    def envelope(self) -> dict[str, dict[str, str | None]]:
        """The error as OpenAI's `{"error": {...}}` object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        """The serialised envelope."""
        return orjson.dumps(self.envelope())


def sse_error_event(err: GatewayError) -> bytes:
    """The error as one SSE event, for failures after a stream has started."""
    return b"data: " + err.body() + b"\n\n"
