"""The one place where an exception becomes the ``camanim`` command's message and exit code."""

from __future__ import annotations

from camanim.errors import CamanimError


def error_line(exc: BaseException) -> tuple[str | None, int]:
    """The one place where an exception becomes the message and exit code of the ``camanim`` command.

    A camanim error (anything the user can correct: a name, a value, a file, the output folder) and an
    operating-system error (a full disk, a read-only folder) exit with 2; running out of memory says so and
    exits with 2; an interruption exits with 130; anything else is a bug: exit code 1 and a pointer to
    ``--debug``. The message is always one line.
    """
    if isinstance(exc, BrokenPipeError):  # output piped into `head` and the like
        return None, 0
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(exc, CamanimError):
        message, code = str(exc), 2
    elif isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        message, code = (
            "out of memory: explain fewer layers (--layers), a smaller input, or fewer methods at once",
            2,
        )
    elif isinstance(exc, OSError):
        where = f" {str(exc.filename)!r}" if exc.filename else ""
        message, code = f"could not access{where}: {exc.strerror or exc}", 2
    else:
        message = f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback"
        code = 1
    return " ".join(message.split()), code
