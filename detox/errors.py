"""Errors a user fixes from the message alone: one line, no traceback (detox.train prints them); and how a signal
handler's exception travels out of a job: carried (HandlerError) or wrapped by CPython, and found again
(``signalled``)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


class HandlerError(BaseException):
    """An error a signal handler raised, carried as a BaseException so that no ``except Exception`` on its way out
    (logging's, a library's) can swallow it: submitit's UncompletedJobError, when a timed-out job cannot be
    requeued, must end the job wherever the signal lands. ``signalled`` gives the error back."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


_MASKED = "returned a result with an exception set"


def signalled(err: BaseException) -> BaseException:
    """``err``, or the exception a signal handler raised if it came wrapped: in a HandlerError, or in CPython's
    SystemError.

    A Python signal handler runs wherever Python code next runs. When that is inside a C call which then returns
    a result anyway (numba runs Python while boxing an array its compiled function returns), CPython raises
    ``SystemError("... returned a result with an exception set")`` from the handler's exception. Ctrl-C's
    KeyboardInterrupt or submitit's requeue on USR2 (SystemExit) would then look like a failed job (seen in CI:
    tests/test_slurm.py's preempted job)."""
    seen = set()
    while id(err) not in seen:  # a cause chain can loop
        seen.add(id(err))
        if isinstance(err, HandlerError):
            err = err.error
        elif isinstance(err, SystemError) and err.__cause__ is not None and _MASKED in str(err):
            err = err.__cause__
        else:
            break
    return err
