"""The single adapter around bcc: the only module in argus that imports bcc.

It turns bcc's bare exceptions (and what libbcc prints on stderr) into `argus.errors` types
with a remedy. bcc comes from Debian's python3-bpfcc, not PyPI.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass

from argus.errors import ArgusError, KernelFeatureMissing, PermissionDenied, ProbeAttachFailed

HEADERS_REMEDY = (
    "Install kernel headers (make setup does this: linux-headers-amd64 and the "
    "/lib/modules/$(uname -r)/build,source links)."
)
BCC_MISSING_REMEDY = (
    "Install Debian's python3-bpfcc (apt-get install -y python3-bpfcc) and use a venv made "
    "with --system-site-packages (make setup does both)."
)

_HEADER_MARKERS = ("Unable to find kernel headers", "kconfig.h", "linux/kconfig.h")

SELFTEST_SOURCE = "int argus_selftest(struct pt_regs *ctx) { return 0; }\n"


@dataclass(frozen=True)
class SelftestResult:
    """bcc compiled and loaded a trivial program: its version and how long that took."""

    bcc_version: str
    compile_load_s: float


class _CaptureOutput:
    """Capture file descriptors 1 and 2: libbcc prints "Unable to find kernel headers" on
    stdout and clang its diagnostics on stderr; neither must reach argus's own output."""

    def __enter__(self) -> _CaptureOutput:
        sys.stdout.flush()
        sys.stderr.flush()
        self._tmp = tempfile.TemporaryFile()
        self._saved = {fd: os.dup(fd) for fd in (1, 2)}
        for fd in (1, 2):
            os.dup2(self._tmp.fileno(), fd)
        self.text = ""
        return self

    def __exit__(self, *exc: object) -> None:
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode("utf-8", "replace")
        self._tmp.close()


def _last_lines(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " / ".join(lines[-n:])


def bcc_selftest() -> SelftestResult:
    """Import bcc, compile a one-line BPF program and load it into the kernel (no attach).

    Loading it as a kprobe-type program proves clang, the kernel headers and the verifier
    without needing CONFIG_KPROBES (nothing is attached). Raises ProbeAttachFailed (bcc
    missing or compile/load error), KernelFeatureMissing (no kernel headers) or
    PermissionDenied (the kernel refused the load).
    """
    try:
        import bcc  # noqa: PLC0415  (the only import of bcc in argus)
    except ImportError as e:
        raise ProbeAttachFailed(f"bcc is not importable ({e})", remedy=BCC_MISSING_REMEDY) from e
    version = str(getattr(bcc, "__version__", "unknown"))
    t0 = time.monotonic()
    capture = _CaptureOutput()
    try:
        with capture:
            prog = bcc.BPF(text=SELFTEST_SOURCE)
    except Exception as e:  # bcc raises bare Exception on compile failure
        text = capture.text + "\n" + str(e)
        if any(marker in text for marker in _HEADER_MARKERS):
            raise KernelFeatureMissing(
                "bcc cannot compile BPF programs: kernel headers for this kernel were not found",
                remedy=HEADERS_REMEDY,
            ) from e
        detail = _last_lines(capture.text) or str(e)
        raise ProbeAttachFailed(f"bcc failed to compile a test program: {detail}") from e
    try:
        try:
            with _CaptureOutput():
                prog.load_func("argus_selftest", bcc.BPF.KPROBE)
        except Exception as e:
            raise _load_error(e) from e
    finally:
        try:
            prog.cleanup()
        except Exception:  # noqa: BLE001 - cleanup of a test program must not mask the result
            pass
    return SelftestResult(bcc_version=version, compile_load_s=time.monotonic() - t0)


def _load_error(e: Exception) -> ArgusError:
    text = str(e)
    if "Operation not permitted" in text or "Permission denied" in text:
        return PermissionDenied(f"the kernel refused to load a BPF program ({text.strip()})")
    return ProbeAttachFailed(f"the kernel refused a test BPF program: {text.strip()}")
