"""Which uprobe breakpoints are in a live process's text: the bytes of its executable mappings
of some libraries that differ from those libraries' files (root: reads /proc/PID/mem)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np


def breakpoints(pid: int, under: Path) -> list[tuple[str, int]]:
    """(library name, file offset) of every byte of the r-xp mappings of files under `under`
    that is not the file's byte: on x86 a uprobe writes one int3 (0xcc) at its address, and
    the kernel writes the original byte back when the probe's last reference goes. This is
    the probe itself, not a side effect of it. After the restore the kernel maps the file's
    page back only when it can (kernel/events/uprobes.c, orig_page_is_identical on 6.1x,
    and a reference-count test: the file page is in the page cache and up to date, and
    nothing else holds the private copy at that moment); otherwise the private (anonymous)
    copy stays, with the original bytes. So anonymous kB in the text is not a test: one
    page per rank stayed in a fresh-check run of 2026-12-07 (that check could not say
    whether a probe stayed with it; this one names the bytes)."""
    found: list[tuple[str, int]] = []
    prefix = str(under).rstrip("/") + "/"
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or parts[1] != "r-xp" or not parts[5].startswith(prefix):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            offset, path = int(parts[2], 16), parts[5].removesuffix(" (deleted)")
            with open(path, "rb") as f:
                f.seek(offset)
                want = f.read(end - start)
            mem.seek(start)
            have = mem.read(len(want))
            diff = np.flatnonzero(np.frombuffer(have, np.uint8) != np.frombuffer(want, np.uint8))
            found += [(Path(path).name, offset + int(i)) for i in diff]
    return found


def anonymous_text_kb(pid: int, under: Path) -> int:
    """Anonymous kB in the r-xp mappings of files under `under` (for failure messages)."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = " r-xp " in line and str(under) in line
        elif inside and line.startswith("Anonymous:"):
            total += int(line.split()[1])
    return total
