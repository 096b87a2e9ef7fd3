"""The few exception types Airloom raises; the CLI maps them to exit codes."""


class AirloomError(Exception):
    """Base class. Messages name the file, line/row and field at fault."""

    exit_code = 2


class UsageError(AirloomError):
    """Bad usage or unreadable input (CLI exit code 2)."""

    exit_code = 2


class CheckFailed(AirloomError):
    """The data or model failed a check: validation, quality gate, sign-off (exit code 1)."""

    exit_code = 1


class RegistryError(AirloomError):
    """A registry operation could not be done (missing version, corrupt file)."""

    exit_code = 2


class ConflictError(RegistryError):
    """A compare-and-swap lost: someone else moved the alias or took the version first."""
