"""Why a training run cannot start or go on. Library code raises these; only the command-line ``main()``
functions turn one into a message and an exit status, with :func:`exit_for`."""

from __future__ import annotations

import sys


class TrainingError(Exception):
    """Base class; the message says what to do. Exit status 1, the message on stderr."""

    exit_code = 1


class InputError(TrainingError):
    """A backbone, image encoder, data folder or option that cannot be used (checked before any long work)."""


class RunRefused(TrainingError):
    """The output folder or its checkpoint does not allow this run (re-run, resume with other settings, ...).
    Exit status 2 and one line, as for a bad option."""

    exit_code = 2


class TrainingStopped(TrainingError):
    """Training stopped mid-run after saving a checkpoint of whole steps: a signal (exit status 128 + its number)
    or training data that became unreadable (1). The message, on stdout, says how to continue (the main process's;
    the others' is empty)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def exit_for(error: TrainingError, prog: str = "python -m training.train") -> SystemExit:
    """Print ``error`` where its kind goes and return the SystemExit carrying its status (for ``raise``). An empty
    message (the other processes of a multi-process run) prints nothing."""
    if not str(error):
        pass
    elif isinstance(error, RunRefused):
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    elif isinstance(error, TrainingStopped):
        print(f"\n{error}", flush=True)
    else:
        print(error, file=sys.stderr, flush=True)
    return SystemExit(error.exit_code)
