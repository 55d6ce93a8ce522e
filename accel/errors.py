"""Errors raised by accel. Each message names the problem and the fix."""


class AccelError(Exception):
    """Base class of accel's errors."""


class UnsupportedModelError(AccelError, TypeError):
    """The object handed to `accel.patch` (or `accel.quant.quantize`) is not a model, or not of a family or
    layout accel knows."""


class AlreadyPatchedError(AccelError, RuntimeError):
    """`accel.patch` was called on something that is already patched."""


class NotPatchedError(AccelError, RuntimeError):
    """`accel.unpatch` was called on something accel did not patch."""


class ConfigError(AccelError, ValueError):
    """A config field (or an `accel.patch` keyword) has a wrong type or an out-of-range value; the message
    names the field."""


class CopyError(AccelError, TypeError):
    """A patched object was deep-copied or pickled; the message says how to copy or save it instead."""


class ConfigTypeError(ConfigError, TypeError):
    """A config field has the wrong type, e.g. a float where an int is needed (also a TypeError)."""


class QuantSaveError(AccelError, RuntimeError):
    """`save_pretrained` was called on a model (or pipeline) holding accel's 4-bit layers, which the plain
    diffusers/transformers format cannot hold; the message points at `accel.quant.save_quantized`."""


class QuantFileError(AccelError, ValueError):
    """A file given to `accel.quant.load_quantized` is damaged, tampered with or does not fit the model;
    the message names the tensor or metadata field. The model is left as it was."""


class NotApplicableError(AccelError, ValueError):
    """An accelerator asked for by keyword cannot serve this model (the message says why); a preset would
    have skipped it."""


class ModelStateError(AccelError, ValueError):
    """The model is not in a state this call can work on: it already holds accel's 4-bit layers (or has none
    to save), its weights are offloaded, or its attention runs on a diffusers backend accel cannot reroute.
    The message says what to change first."""


class IrreversibleError(AccelError, RuntimeError):
    """Undoing a one-way change was asked for (4-bit quantization with `keep_original=False` freed the 16-bit
    weights); the message says how to get them back."""


class KernelInputError(AccelError, ValueError):
    """Arguments a kernel cannot take (shape, dtype, device, head dim, tile size); the message names the fix."""


class ParallelismError(AccelError, RuntimeError):
    """accel and diffusers' parallelism (`enable_parallelism`) were combined in a way accel cannot serve: enabled
    after `accel.patch` (enable it first), or tensor parallelism; the message says what to do instead."""
