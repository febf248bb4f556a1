"""The errors fastft raises for bad *user* input, and the CLI's exit codes (docs/errors.md).

A ``FastftUserError`` is a problem with what the user gave (an option, a config file, a data file, a
model or adapter directory, an output location): the CLI prints it as one line, without a traceback
(``--debug`` shows it), and exits with the class's ``exit_code``. Anything else that escapes is a bug
in fastft: the CLI keeps its traceback and exits 1.

Every class also derives from the builtin exception a Python caller would expect (``ValueError``,
``TypeError``, ``FileNotFoundError``, ``OSError``, ``FloatingPointError``), so ``except ValueError``
around the API keeps working.

This module imports nothing from fastft (any layer may use it).
"""
from __future__ import annotations

# Exit codes of the ``fastft`` command (documented in docs/errors.md).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug in fastft: the traceback is printed
EXIT_USAGE = 2  # a bad option, option value or config file
EXIT_INPUT = 3  # a bad input: data file, model / tokenizer / adapter / checkpoint directory
EXIT_OUTPUT = 4  # the output location: not writable, full, or holding another run
EXIT_DIVERGED = 5  # training stopped: non-finite loss or gradient (the last good checkpoint is kept)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT); training saves a resumable checkpoint first

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug in fastft: please report it with the traceback)",
    EXIT_USAGE: "bad option, option value or config file",
    EXIT_INPUT: "bad input: data file, model, tokenizer, adapter or checkpoint",
    EXIT_OUTPUT: "output location unusable: not writable, full, or holding another run's outputs",
    EXIT_DIVERGED: "training stopped on a non-finite loss or gradient",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); a resumable checkpoint was saved",
}


class FastftUserError(Exception):
    """Base of every error caused by user input; ``str(e)`` names the option or path and the problem."""

    exit_code = EXIT_USAGE


class UsageError(FastftUserError, ValueError):
    """A bad option or argument value (CLI flag, API keyword, TrainingArguments field)."""

    exit_code = EXIT_USAGE


class ArgumentTypeError(FastftUserError, TypeError):
    """An option or argument of the wrong type."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A config file that cannot be read, parsed or holds unknown / ill-typed keys (names file, key, line)."""


class InputError(FastftUserError, ValueError):
    """A bad input file or directory (data, model, tokenizer, adapter, checkpoint)."""

    exit_code = EXIT_INPUT


class InputNotFoundError(FastftUserError, FileNotFoundError):
    """An input path that does not exist."""

    exit_code = EXIT_INPUT


class DataError(InputError):
    """A training / evaluation data file that cannot be used (names file and line)."""


class ModelError(InputError):
    """A model or tokenizer directory that cannot be used."""


class CheckpointError(InputError):
    """A checkpoint, adapter, optimizer or trainer state that cannot be loaded (names file and key)."""


class OutputError(FastftUserError, OSError):
    """An output location that cannot be written (not a directory, not writable, full, another run's)."""

    exit_code = EXIT_OUTPUT


class OutputConflictError(FastftUserError, ValueError):
    """An output path holding something that writing it would wrongly replace (another run, a non-GGUF
    file, a non-checkpoint directory)."""

    exit_code = EXIT_OUTPUT


class OutputNotADirectoryError(OutputError, NotADirectoryError):
    """An output path that must be a directory but is a file."""


class NonFiniteError(FastftUserError, FloatingPointError):
    """Training produced a NaN/inf loss or gradient (names step and batch)."""

    exit_code = EXIT_DIVERGED


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, FastftUserError):
        return exc.exit_code
    return EXIT_INTERNAL


__all__ = [
    "FastftUserError", "UsageError", "ArgumentTypeError", "ConfigError", "InputError", "InputNotFoundError",
    "DataError", "ModelError", "CheckpointError", "OutputError", "OutputNotADirectoryError", "OutputConflictError", "NonFiniteError", "exit_code_for", "EXIT_CODES",
    "EXIT_OK", "EXIT_INTERNAL", "EXIT_USAGE", "EXIT_INPUT", "EXIT_OUTPUT", "EXIT_DIVERGED", "EXIT_INTERRUPTED",
]
