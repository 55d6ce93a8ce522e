"""`PruneError`, and how pruning refuses to run inside torch.compile."""

from __future__ import annotations

import functools

from ..errors import AccelError


class PruneError(AccelError, RuntimeError):
    """The inputs of a call cannot be pruned consistently (the message says why and what to do)."""


_COMPILE_MESSAGE = (
    "visual token pruning cannot run inside torch.compile: it chooses tokens by value and changes the sequence "
    "length. Compile an unpatched model (accel.unpatch first) or patch with prune=False"
)


@functools.cache
def compile_refusal():
    """A function that raises `PruneError` in a way torch.compile's tracer passes on unchanged.

    Dynamo calls a function marked `assume_constant_result` for real while it traces, and re-raises its own
    `UserError` as is; an ordinary exception would come out as a dynamo error (or a graph break)."""
    try:
        from torch._dynamo import assume_constant_result
        from torch._dynamo.exc import UserError, UserErrorType
    except ImportError:  # an older torch: the PruneError reaches the user wrapped in the tracer's error

        def refuse():
            raise PruneError(_COMPILE_MESSAGE)

        return refuse

    class PruneCompileError(PruneError, UserError):
        def __init__(self, message: str):
            UserError.__init__(self, UserErrorType.ANTI_PATTERN, message)

    @assume_constant_result
    def refuse():
        raise PruneCompileError(_COMPILE_MESSAGE)

    return refuse
