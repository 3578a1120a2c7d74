"""The single adapter around bcc: the only module in argus that imports bcc.

It turns bcc's bare exceptions (and what libbcc prints on stderr) into `argus.errors` types
with a remedy. bcc comes from Debian's python3-bpfcc, not PyPI.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from argus.errors import ArgusError, KernelFeatureMissing, PermissionDenied, ProbeAttachFailed

HEADERS_REMEDY = (
    "Install kernel headers (make setup does this: linux-headers-amd64 and the "
    "/lib/modules/$(uname -r)/build,source links)."
)
BCC_MISSING_REMEDY = (
    "Install Debian's python3-bpfcc (apt-get install -y python3-bpfcc) and use a venv made "
    "from /usr/bin/python3 with --system-site-packages (make setup does both)."
)
DEBIAN_PYTHON = "/usr/bin/python3"


def bcc_missing_remedy(base_prefix: str | None = None, version: str | None = None) -> str:
    """The remedy for `import bcc` failing. Debian installs bcc for its own /usr/bin/python3
    only: a venv made by another python3 that comes first on PATH (pyenv, conda, a
    self-built one) never sees it, with or without --system-site-packages."""
    base = sys.base_prefix if base_prefix is None else base_prefix
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}" if version is None else version
    if os.path.realpath(base) != "/usr":
        return (f"argus runs on {base}/bin/python{ver}, which cannot see Debian's bcc (it is "
                f"installed for {DEBIAN_PYTHON} only): install python3-bpfcc, then make the "
                f"venv with `{DEBIAN_PYTHON} -m venv --system-site-packages .venv` (not "
                f"`python3 -m venv`, which here is another Python) and reinstall argus in it.")
    return BCC_MISSING_REMEDY

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


def _compile(bcc, text: str, cflags: list[str], what: str, detail_lines: int):
    """bcc.BPF(text) with libbcc's and clang's output captured, every failure typed: no
    kernel headers, a refused load, or a compile error quoting the compiler's last lines."""
    capture = _CaptureOutput()
    try:
        with capture:
            return bcc.BPF(text=text.encode(), **({"cflags": cflags} if cflags else {}))
    except Exception as e:  # bcc raises bare Exception on compile failure
        out = capture.text + "\n" + str(e)
        if any(marker in out for marker in _HEADER_MARKERS):
            raise KernelFeatureMissing(
                "bcc cannot compile BPF programs: kernel headers for this kernel were not found",
                remedy=HEADERS_REMEDY,
            ) from e
        if "Operation not permitted" in out or "Permission denied" in out:
            raise PermissionDenied(f"the kernel refused to load {what}") from e
        detail = _last_lines(capture.text, detail_lines) or str(e)
        raise ProbeAttachFailed(f"bcc failed to compile {what}: {detail}") from e


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
        raise ProbeAttachFailed(f"bcc is not importable ({e})", remedy=bcc_missing_remedy()) from e
    version = str(getattr(bcc, "__version__", "unknown"))
    t0 = time.monotonic()
    prog = _compile(bcc, SELFTEST_SOURCE, [], "a test program", detail_lines=3)
    try:
        try:
            with _CaptureOutput():
                prog.load_func(b"argus_selftest", bcc.BPF.KPROBE)
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
    if any(m in text for m in ("Operation not permitted", "Permission denied", "super-user")):
        return PermissionDenied(
            f"BPF programs cannot be loaded without privileges ({text.strip()})"
        )
    return ProbeAttachFailed(
        f"the kernel refused a test BPF program: {text.strip()}",
        remedy="Check `dmesg` and the kernel's BPF settings (kernel.unprivileged_bpf_disabled, "
        "lockdown).",
    )


# --- Loading and attaching the argus program set -------------------------------------------


def _import_bcc():
    try:
        import bcc  # noqa: PLC0415  (the only import of bcc in argus)
    except ImportError as e:
        raise ProbeAttachFailed(f"bcc is not importable ({e})", remedy=bcc_missing_remedy()) from e
    return bcc


class BpfSession:
    """One compiled BPF object and everything attached to it.

    `sources` are compiled as one translation unit, in order, each preceded by a #line
    directive so compiler messages name the real file and line.

    Collectors use this instead of bcc: uprobes by (file, ELF address, tgid), the cpu-clock
    perf event, tables by name, ring buffers, symbolization. Every bcc failure becomes an
    ArgusError naming what failed.
    """

    def __init__(self, sources: list[str], cflags: list[str], text: str | None = None):
        bcc = _import_bcc()
        if text is None:
            text = "".join(f'#line 1 "{src}"\n' + Path(src).read_text() + "\n" for src in sources)
        src_file = ", ".join(Path(src).name for src in sources) or "<text>"
        self._bcc = bcc
        self._b = _compile(bcc, text, cflags, src_file, detail_lines=6)
        self._rings: list[str] = []
        self._batch = True  # batch map operations work (off after the first EINVAL)
        self._closer = None  # detaches in the background (detach_uprobe(background=True))
        self._pending: dict[bytes, int] = {}  # ev_name -> fd handed to the closer, not closed
        self._pending_lock = threading.Lock()

    @classmethod
    def from_text(cls, text: str, cflags: list[str]) -> BpfSession:
        """A program given as text (benchmarks' empty programs; argus itself uses files)."""
        return cls([], cflags, text=text)

    # uprobes ---------------------------------------------------------------------------
    def attach_uprobe(self, path: str, addr: int, fn_name: str, tgid: int, ret: bool = False):
        """Attach fn_name at ELF virtual address `addr` of `path`, only in process `tgid`."""
        attach = self._b.attach_uretprobe if ret else self._b.attach_uprobe
        capture = _CaptureOutput()
        try:
            with capture:
                attach(name=path.encode(), addr=addr, fn_name=fn_name.encode(), pid=tgid)
        except Exception as e:
            detail = _last_lines(capture.text) or str(e)
            raise ProbeAttachFailed(
                f"cannot attach {'uretprobe' if ret else 'uprobe'} at {path}+{addr:#x} "
                f"in {tgid}: {detail}"
            ) from e

    def detach_uprobe(self, path: str, addr: int, tgid: int, ret: bool = False,
                      background: bool = False) -> None:
        """Detach one uprobe. `background`: forget it now and close its perf event in a
        worker thread: the kernel's removal of a uprobe waits for a synchronisation (about
        0.23 s per probe measured here), which must not stall a poll loop when a job's last
        rank exits; `close()` waits for the pending ones."""
        b = self._b
        if background:
            try:
                path_b, vaddr = b._check_path_symbol(path.encode(), b"", addr, tgid)
                ev_name = b._get_uprobe_evname(b"r" if ret else b"p", path_b, vaddr, tgid)
                fd = b.uprobe_fds.get(ev_name)
                if fd is None:
                    return
                b._del_uprobe_fd(ev_name)
            except Exception:  # noqa: BLE001 - already gone: nothing to undo
                return
            if self._closer is None:
                from concurrent.futures import ThreadPoolExecutor

                self._closer = ThreadPoolExecutor(max_workers=8,
                                                  thread_name_prefix="argus-detach")
            with self._pending_lock:
                self._pending[ev_name] = fd
            self._closer.submit(self._close_uprobe, ev_name)
            return
        detach = b.detach_uretprobe if ret else b.detach_uprobe
        try:
            with _CaptureOutput():
                detach(name=path.encode(), addr=addr, pid=tgid)
        except Exception:  # noqa: BLE001 - already gone (process exited): nothing to undo
            pass

    def _close_uprobe(self, ev_name: bytes) -> None:
        with self._pending_lock:
            fd = self._pending.pop(ev_name, None)
        if fd is None:
            return  # closed by close(background=True) meanwhile
        lib = self._bcc.lib
        lib.bpf_close_perf_event_fd(fd)  # ctypes: the GIL is released while the kernel works
        lib.bpf_detach_uprobe(ev_name)  # a tracefs-created event: removed; else nothing

    def uprobe_count(self) -> int:
        return len(self._b.uprobe_fds)

    # tracepoints -----------------------------------------------------------------------------
    def attach_tracepoint(self, tp: str, fn_name: str) -> None:
        try:
            with _CaptureOutput():
                self._b.attach_tracepoint(tp=tp.encode(), fn_name=fn_name.encode())
        except Exception as e:
            raise ProbeAttachFailed(f"cannot attach tracepoint {tp}: {e}") from e

    # perf events -------------------------------------------------------------------------
    def attach_cpu_clock(self, fn_name: str, hz: int) -> None:
        """Sample every CPU with the software cpu-clock event at `hz` (filtered in BPF)."""
        bcc = self._bcc
        try:
            with _CaptureOutput():
                self._b.attach_perf_event(
                    ev_type=bcc.PerfType.SOFTWARE,
                    ev_config=bcc.PerfSWConfig.CPU_CLOCK,
                    fn_name=fn_name.encode(),
                    sample_freq=hz,
                    cpu=-1,
                )
        except Exception as e:
            raise ProbeAttachFailed(f"cannot open the cpu-clock perf event at {hz} Hz: {e}") from e

    def prog_stats(self, fn_name: str) -> tuple[int, int]:
        """(runs, total run time in ns) of a loaded program, from its fdinfo; both stay 0
        unless the kernel counts them (sysctl kernel.bpf_stats_enabled=1; benchmarks)."""
        fn = self._b.funcs.get(fn_name.encode())
        if fn is None:
            raise ProbeAttachFailed(f"program {fn_name} is not loaded")
        stats = {}
        for line in Path(f"/proc/self/fdinfo/{fn.fd}").read_text().splitlines():
            key, _, value = line.partition(":")
            stats[key.strip()] = value.strip()
        return int(stats.get("run_cnt", 0)), int(stats.get("run_time_ns", 0))

    # maps ----------------------------------------------------------------------------------
    def table(self, name: str):
        """The map `name`, one object per map for the session: its Key/Leaf types are the
        same on every call (bcc's get_table makes new ones each time, and the keys read
        through one are refused by another's batch delete: every delete went key by key)."""
        return self._b[name.encode()]

    def open_ring_buffer(self, name: str, callback) -> None:
        """callback(ctx, data_ptr, size) for every record; drain with poll()."""
        self._b[name.encode()].open_ring_buffer(callback)
        self._rings.append(name)

    def items(self, name: str, delete: bool = False) -> list[tuple]:
        """Every (key, value) of a hash map, read BATCH entries per syscall
        (BPF_MAP_LOOKUP_BATCH, or ..._AND_DELETE_BATCH with `delete`) where the kernel has
        them (5.6+), else key by key (two syscalls per entry). Keys and values are copies,
        a scalar as an int. (bcc's own batch call sizes its buffers to the map's capacity:
        11 MB zeroed per call for the 16,384 off-CPU stacks, a third of argus's Python
        samples on a 4-rank torch job.)"""
        t = self.table(name)
        if self._batch:
            try:
                return self._batched(t, delete)
            except OSError:  # EINVAL/ENOTSUPP: no batch operations on this kernel
                self._batch = False
        got = [(_copy(k), _copy(v)) for k, v in t.items()]
        if delete:
            _delete_each(t, [k for k, _v in got])
        return got

    def _batched(self, t, delete: bool) -> list[tuple]:
        lib = self._bcc.libbcc.lib
        call = lib.bpf_lookup_and_delete_batch if delete else lib.bpf_lookup_batch
        n = BATCH
        keys, values = (t.Key * n)(), (t.Leaf * n)()
        token, count = ct.c_uint32(0), ct.c_uint32(0)
        out: list[tuple] = []
        first = True
        while True:
            count.value = n
            res = call(t.map_fd, None if first else ct.byref(token), ct.byref(token),
                       ct.byref(keys), ct.byref(values), ct.byref(count))
            err = ct.get_errno()
            if res != 0 and err == errno.ENOSPC and n < (1 << 20):
                n *= 4  # one hash bucket holds more than n entries: a bigger buffer
                keys, values = (t.Key * n)(), (t.Leaf * n)()
                continue
            if res != 0 and err != errno.ENOENT:
                raise OSError(err, f"batch lookup of a BPF map: {os.strerror(err)}")
            out.extend((_copy(keys[i]), _copy(values[i])) for i in range(count.value))
            if res != 0 or count.value == 0:
                return out  # ENOENT: the end of the map
            first = False

    def delete_keys(self, name: str, keys: list) -> None:
        """Delete these keys of a hash map (one batch syscall where the kernel has it)."""
        if not keys:
            return
        t = self.table(name)
        if self._batch:
            try:
                t.items_delete_batch((t.Key * len(keys))(*keys))
                return
            except Exception:  # one key gone meanwhile (ENOENT) or no batch: key by key
                pass
        _delete_each(t, keys)

    def poll(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms for a ring buffer's wakeup, then drain every ring."""
        if self._rings:
            self._b.ring_buffer_poll(timeout_ms)

    def consume(self) -> None:
        if self._rings:
            self._b.ring_buffer_consume()

    # symbols -------------------------------------------------------------------------------
    def usym(self, addr: int, tgid: int) -> tuple[str, str]:
        """(module, function) of a user address in a live process, '[unknown]' when not found."""
        raw = self._b.sym(addr, tgid, show_module=True, show_offset=False)
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return _split_sym(text)

    def ksym(self, addr: int) -> str:
        raw = self._b.ksym(addr, show_module=False, show_offset=False)
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)

    def close(self, wait: bool = True, background: bool = False) -> None:
        """Detach everything and free the maps (idempotent). `wait=False`: background
        detaches not started yet are dropped (their fds close with the process: argus top's
        quit, whose holder process releases them). `background=True`: return at once and
        let a holder process pay the kernel's removal of every probe (`_hold_in_background`);
        the probes are inert meanwhile only if their filter entries are gone."""
        b = getattr(self, "_b", None)
        if b is None:
            return
        done = _hold_in_background() if background else None
        closer, self._closer = getattr(self, "_closer", None), None
        if closer is not None:
            closer.shutdown(wait=wait and not background, cancel_futures=not wait or background)
        if background:
            with self._pending_lock:
                pending, self._pending = self._pending, {}
            for fd in pending.values():  # fast: the holder keeps a reference
                self._bcc.lib.bpf_close_perf_event_fd(fd)
        self._b = None
        try:
            with _CaptureOutput():
                b.cleanup()
        except Exception:  # noqa: BLE001 - teardown must not hide the original error
            pass
        if done is not None:
            done()


_KERNEL_OBJECTS = ("anon_inode:[perf_event]", "anon_inode:bpf-map", "anon_inode:bpf-prog",
                   "anon_inode:bpf_link", "anon_inode:[eventpoll]")


def _hold_in_background():
    """Fork a holder that keeps a reference to every perf event and BPF object of this
    process, so that closing ours is fast; returns done(), to call once ours are closed.

    The kernel removes a uprobe when the last reference to its perf event goes, and that
    waits for a synchronisation (about 0.23 s per probe measured here: 9 s for the 38 probes
    of a 4-rank simulated job). With a holder, this process's closes are not the last ones;
    the holder exits when done() is called (or this process dies) and the removal happens in
    its exit, in the background. The holder is a grandchild (reaped by init, never a zombie
    of ours), in a session of its own, with only those kernel objects kept: its stdio is
    /dev/null and every other descriptor (pipes a caller reads to EOF) is closed. It runs
    nothing but os calls (forked from a threaded process)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if os.fork():
                os._exit(0)  # the intermediate child: the holder is reparented to init
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                if fd <= 2 or fd == r:
                    continue
                try:
                    if not os.readlink(f"/proc/self/fd/{fd}").startswith(_KERNEL_OBJECTS):
                        os.close(fd)
                except OSError:
                    pass
            os.read(r, 1)  # a byte or EOF: the parent's references are closed (or it died)
        finally:
            os._exit(0)
    os.close(r)
    os.waitpid(pid, 0)

    def done() -> None:
        try:
            os.write(w, b"x")
        finally:
            os.close(w)

    return done


BATCH = 256  # map entries per batch syscall (BpfSession.items)


def warm_kernel_symbols() -> None:
    """Load bcc's kernel symbol cache (/proc/kallsyms sorted: ~0.13 s of CPU, in C with the
    GIL released) now, so that the first stack drain does not pay for it while tracing."""
    try:
        _import_bcc().BPF.ksym(0)
    except Exception:  # noqa: BLE001 - a failure here is only a slower first drain
        pass


def _delete_each(t, keys: list) -> None:
    """Delete keys one syscall each (an int key as the table's key type); gone ones skipped."""
    for k in keys:
        try:
            del t[t.Key(k) if isinstance(k, int) else k]
        except KeyError:
            pass


def _copy(c):
    """A map key or value as items() returns it: a scalar as an int, a struct copied."""
    if isinstance(c, int):
        return c
    if isinstance(c, ct._SimpleCData):
        return c.value
    return type(c).from_buffer_copy(c)


def _split_sym(text: str) -> tuple[str, str]:
    # bcc formats "function [module]"; unknown frames are "[unknown]" or "0x... [module]".
    text = text.strip()
    if text.endswith("]") and " [" in text:
        fn, mod = text.rsplit(" [", 1)
        return mod[:-1], fn
    return "[unknown]", text
