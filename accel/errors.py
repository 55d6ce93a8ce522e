"""Errors raised by accel. Each message names the problem and the fix."""


class AccelError(Exception):
    """Base class of accel's errors."""


class UnsupportedModelError(AccelError, TypeError):
    """The object handed to `accel.patch` is not a model family accel knows."""


class AlreadyPatchedError(AccelError, RuntimeError):
    """`accel.patch` was called on something that is already patched."""


class NotPatchedError(AccelError, RuntimeError):
    """`accel.unpatch` was called on something accel did not patch."""
