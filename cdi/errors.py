"""Errors a user can cause. The CLI prints them on one line and exits with code 2.

Every message names the file or option at fault and says how to fix it.
"""

from __future__ import annotations


class CDIError(Exception):
    """Base class of user-facing errors (bad input, bad option, unsupported model)."""

    exit_code = 2


class ImageSetError(CDIError):
    """An image folder cannot be used: missing, empty, too small, unreadable files, overlap."""


class ModelError(CDIError):
    """A model directory cannot be audited: missing files, unsupported pipeline, unsafe weights."""


class OptionError(CDIError):
    """A command-line option or API argument has an invalid value."""


class FeatureError(CDIError):
    """Features could not be computed for some image (for example non-finite values)."""


class TrackingError(CDIError):
    """The MLflow tracking store cannot be reached or written."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (the CLI turns both into this). A BaseException, like KeyboardInterrupt,
    so no `except Exception` swallows it; the audit's run is marked KILLED and the CLI exits 128 + signum."""

    def __init__(self, signum: int, run_id: str | None = None) -> None:
        super().__init__(signum, run_id)
        self.signum = signum
        self.run_id = run_id

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


__all__ = ["CDIError", "Interrupted", "FeatureError", "ImageSetError", "ModelError", "OptionError", "TrackingError"]
