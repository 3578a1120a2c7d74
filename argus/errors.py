"""Typed errors. Every failure a user can meet is one of these, with a remedy.

`main()` prints `str(err)` (one sentence) and `err.remedy`; a traceback only with `-v`.
"""

from __future__ import annotations


class ArgusError(Exception):
    """Base of every error argus reports to a user.

    `message` says what went wrong in one sentence; `remedy` says what to do about it.
    `exit_code` is what `main()` returns: 1 runtime failure, 2 usage error.
    """

    exit_code = 1
    default_remedy = ""

    def __init__(self, message: str, remedy: str | None = None):
        super().__init__(message)
        self.message = message
        self.remedy = remedy if remedy is not None else self.default_remedy

    def __str__(self) -> str:
        return self.message


class UsageError(ArgusError):
    """Bad command-line input."""

    exit_code = 2
    default_remedy = "Run `argus --help` for usage."


class PermissionDenied(ArgusError):
    """Not enough privileges (root, or CAP_BPF + CAP_PERFMON)."""

    default_remedy = "Run as root (sudo argus ...) or grant CAP_BPF and CAP_PERFMON."


class KernelFeatureMissing(ArgusError):
    """The running kernel lacks something tracing needs (uprobes, BPF, perf events...)."""

    default_remedy = (
        "Run `argus doctor` to see which kernel feature is missing and how to enable it."
    )


class TargetNotFound(ArgusError):
    """A PID that does not exist, or exists but cannot be traced."""

    default_remedy = "Check the PID with `ps -p PID`; run `argus doctor -p PID` for details."


class NotATrainingProcess(ArgusError):
    """The target maps none of the libraries argus probes."""

    default_remedy = (
        "Point argus at a rank or its launcher (torchrun); `argus doctor -p PID` lists "
        "which CUDA/NCCL/torch libraries a process maps."
    )


class ProbeAttachFailed(ArgusError):
    """A BPF program failed to compile, load or attach."""

    default_remedy = "Run `argus doctor` to check bcc, kernel headers and tracefs."


class SpecInvalid(ArgusError):
    """A probe spec file is malformed; the message names the entry and the field."""

    default_remedy = "Fix the named entry in the probe spec file."


class RecordingInvalid(ArgusError):
    """A recording directory is missing, truncated or of an unknown version."""

    default_remedy = (
        "Point argus at a directory written by `argus attach` (it holds manifest.json)."
    )


class RecordingDamaged(RecordingInvalid):
    """A file of a recording (or of its summaries) is truncated, corrupt or malformed: the
    message names the file and what is wrong with it."""

    default_remedy = "Record it again (argus attach -o DIR), or restore the directory from a copy."


def cannot_read(err: OSError) -> RecordingInvalid:
    """The one sentence for a file or folder of a recording that this user may not read (a
    PermissionError while loading: `sudo argus attach` writes 0700 folders)."""
    return RecordingInvalid(
        f"{err.filename} cannot be read ({err.strerror}).",
        "Run argus as a user that may read the recording (its owner, or root).",
    )


class OutputNotWritable(ArgusError):
    """The output directory cannot be created or written."""

    default_remedy = "Choose a writable directory with -o/--output."
