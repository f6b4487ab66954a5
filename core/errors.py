"""Errors fedcore reports to its user as one line, with exit code 2."""

from __future__ import annotations


class FedcoreUserError(Exception):
    """A problem in the user's input (spec, data, plugin choice); the CLI prints it and exits 2.

    The message is one line that names the file, spec path or column, and the fix.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        self.message = message
        self.where = where
        self.hint = hint
        parts = [f"{where}: {message}" if where else message]
        if hint:
            parts.append(hint)
        super().__init__(" — ".join(parts).replace("\n", " "))

    def relocated(self, where: str) -> FedcoreUserError:
        """The same error (same class, message and fix) pointing at ``where`` instead."""
        return type(self)(self.message, where=where, hint=self.hint)


class SpecError(FedcoreUserError):
    """The experiment spec is malformed or refers to something that does not exist."""


class PluginError(FedcoreUserError):
    """A plugin is unknown, failed to load, or is incompatible with another one."""


class DataError(FedcoreUserError):
    """Input data is missing or unusable."""


class PrivacyBudgetError(FedcoreUserError):
    """The requested privacy budget cannot be met."""


class RunFailure(Exception):
    """A run failed at run time for a reason that is neither the user's input nor a bug
    (a secure-aggregation party died, a peer timed out). The CLI prints it as one line, exit 1.
    """

    exit_code = 1
