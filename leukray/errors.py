"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback,
and exits with the error's `exit_code`, so a scheduler can tell who has to act:

    2  a user mistake: a bad option, config value or path, a run folder a command cannot use
    3  bad data: no readable images, a single class, a manifest or split that cannot work
    4  model weights missing or unreadable (offline, not cached, a corrupt or foreign file)
    5  cluster trouble: Ray cannot start or attach, or the cluster lost a node or object

(1 is a bug: an unexpected exception, shown with its traceback; 130 an interrupt.)
"""

EXIT_USER = 2
EXIT_DATA = 3
EXIT_WEIGHTS = 4
EXIT_CLUSTER = 5


class LeukrayError(Exception):
    """A problem with the user's input, data or configuration (one-line message)."""

    exit_code = EXIT_USER


class ConfigError(LeukrayError):
    """A configuration value is missing, unknown or out of range."""


class DataError(LeukrayError):
    """The data cannot be used as given (an empty folder, a single class, too few to split, ...)."""

    exit_code = EXIT_DATA


class InputNotFoundError(DataError):
    """A path the user gave (--data, --test-data, --model, a run folder) does not exist or
    does not hold what the command needs: a user mistake, not bad data."""

    exit_code = EXIT_USER


class WeightsError(LeukrayError):
    """Model weights cannot be found, downloaded, read or verified."""

    exit_code = EXIT_WEIGHTS


class ClusterError(LeukrayError):
    """Ray cannot start or attach to the cluster, or the cluster failed under the job."""

    exit_code = EXIT_CLUSTER


def exit_code_of(exc: BaseException) -> int:
    """The documented exit code for an error the CLI reports in one line."""
    return exc.exit_code if isinstance(exc, LeukrayError) else EXIT_USER
