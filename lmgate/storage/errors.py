"""Errors raised by the storage layer; the admin API and the CLI turn them into messages."""

from __future__ import annotations


class StorageError(Exception):
    """A request the database cannot satisfy; `param` names the offending field, if any."""

    status = 400

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidError(StorageError):
    """A value is not acceptable (unknown role, negative amount...)."""


class NotFoundError(StorageError):
    """The named user, team, key, budget or price does not exist."""

    status = 404


class ConflictError(StorageError):
    """The name is already taken."""

    status = 409
