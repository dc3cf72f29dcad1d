"""Errors raised by maskprune. Each says what was wrong and what is valid."""


class MaskpruneError(Exception):
    """Base class of maskprune's errors."""


class TraceError(MaskpruneError, ValueError):
    """The model could not be traced on the example inputs (the model's own error is chained)."""


class NothingToPruneError(MaskpruneError, ValueError):
    """The model has no channel that can be removed."""


class NotMadeError(MaskpruneError, RuntimeError):
    """A Mask method needs :meth:`Mask.make` first."""


class ExportError(MaskpruneError, RuntimeError):
    """The exported model does not compute what the masked model computes."""


class DataDependentError(TraceError):
    """The forward decides Python control flow by tensor values and ``Mask(..., strict=True)`` refuses that: the
    trace saw only the branches the example inputs take (the sites are named)."""


class DataDependentWarning(UserWarning):
    """The forward decides Python control flow by tensor values: the trace saw only the branches the example
    inputs take (the sites are named). Verify the export on inputs that take the others."""


class SpecError(MaskpruneError, ValueError):
    """A pruning spec is malformed or does not fit the model it is applied to (the module is named)."""


class SpecNotFoundError(SpecError, FileNotFoundError):
    """A saved folder, its spec or its weights file is missing."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """``error``'s type and the first line of its message (at most ``limit`` characters): a model's own error as
    a reason. A bare ``assert`` has no message.

    Examples:
        >>> first_line(ValueError("bad width\\nsecond line")), first_line(AssertionError())
        ('ValueError: bad width', 'AssertionError')
    """
    message = next(iter(str(error).splitlines()), "")[:limit]
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
