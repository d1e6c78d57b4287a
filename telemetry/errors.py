"""The one error shape every endpoint answers with: ApiError, its JSON body, and FieldErrors
that name every bad field of a request at once. Nothing here knows an endpoint.
"""

from __future__ import annotations


class ApiError(Exception):
    """An error answered to the client as one JSON shape: see error_body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers or {}


def error_body(status: int, code: str, message: str, details: list[dict[str, str]]) -> dict:
    body = {"status": status, "code": code, "message": message}
    return {"error": {**body, "details": details} if details else body}


class FieldErrors:
    """Collects every problem of a request so the client hears about all of them at once."""

    def __init__(self) -> None:
        self.details: list[dict[str, str]] = []

    def add(self, field_path: str, problem: str) -> None:
        self.details.append({"field": field_path, "problem": problem})


class StorageUnavailable(Exception):
    """The database could not store or read right now; the client should retry."""


RETRY_AFTER_SECONDS = 2


def storage_unavailable(what_failed: str) -> ApiError:
    # 503, not 4xx: the JupyterLab clients retry 5xx and drop an event on any 4xx.
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return ApiError(503, "storage_unavailable", f"{what_failed}; retry shortly", headers=headers)
