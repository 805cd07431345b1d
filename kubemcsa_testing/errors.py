"""Errors of the in-memory API server, answered as kube-apiserver does: a `kind: Status` body.

Messages and reasons follow kube-apiserver (see shared/reference/kube-apiserver-facts.md), because
clients, kubectl included, show them to users and some code branches on `reason`.
"""

from __future__ import annotations

from typing import Any


class StatusError(Exception):
    """An API error: raise it anywhere in the server and the HTTP layer answers it as a Status."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def to_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            status["details"] = self.details
        return status


def _details(kind: str, name: str, group: str = "") -> dict[str, Any]:
    details: dict[str, Any] = {"name": name, "kind": kind}
    if group:
        details["group"] = group
    return details


def _qualified(plural: str, group: str) -> str:
    return f"{plural}.{group}" if group else plural


def not_found(plural: str, name: str, group: str = "") -> StatusError:
    return StatusError(
        404, "NotFound", f'{_qualified(plural, group)} "{name}" not found', _details(plural, name, group)
    )


def already_exists(plural: str, name: str, group: str = "") -> StatusError:
    return StatusError(
        409, "AlreadyExists", f'{_qualified(plural, group)} "{name}" already exists', _details(plural, name, group)
    )


def conflict(plural: str, name: str, group: str = "") -> StatusError:
    return StatusError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {_qualified(plural, group)} "{name}": '
        "the object has been modified; please apply your changes to the latest version and try again",
        _details(plural, name, group),
    )


def invalid(kind: str, name: str, causes: list[tuple[str, str]], group: str = "") -> StatusError:
    """422 Invalid; `causes` are (field, message) pairs, e.g. ("spec.expirationSeconds", "Invalid value: ...")."""
    qualified = f"{kind}.{group}" if group else kind
    summary = ", ".join(f"{field}: {message}" for field, message in causes)
    details = _details(kind, name, group)
    details["causes"] = [
        {"reason": "FieldValueInvalid", "message": message, "field": field} for field, message in causes
    ]
    return StatusError(422, "Invalid", f'{qualified} "{name}" is invalid: {summary}', details)


def bad_request(message: str) -> StatusError:
    return StatusError(400, "BadRequest", message)


def unauthorized() -> StatusError:
    return StatusError(401, "Unauthorized", "Unauthorized")


def forbidden(message: str, plural: str = "", name: str = "", group: str = "") -> StatusError:
    details = _details(plural, name, group) if plural else None
    return StatusError(403, "Forbidden", message, details)


def method_not_allowed(message: str = "the server does not allow this method on the requested resource") -> StatusError:
    return StatusError(405, "MethodNotAllowed", message)


def gone(message: str) -> StatusError:
    return StatusError(410, "Expired", message)


def unsupported_media_type(content_type: str) -> StatusError:
    accepted = (
        "application/json, application/yaml, application/json-patch+json, "
        "application/merge-patch+json, application/strategic-merge-patch+json"
    )
    return StatusError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format - accepted media types include: {accepted}"
        f" (got {content_type!r})",
    )


def too_large() -> StatusError:
    return StatusError(413, "RequestEntityTooLarge", "the request body is too large")


def internal(message: str) -> StatusError:
    return StatusError(500, "InternalError", f"Internal error occurred: {message}")
