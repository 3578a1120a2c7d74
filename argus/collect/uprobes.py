"""Reference-counted uprobe placement: one uprobe per (library file, address, entry/return)
node-wide, shared by every traced process that maps the file.

Uprobes live on the file (inode), not the process: one attachment serves every rank that
maps the library, including ranks that start later, whose calls are recorded from the
moment their probe-table entries exist (the in-kernel filter, calls.bpf.c). Processes argus
does not trace pay only the trap and one hash lookup while argus is attached. Each traced
process holds a reference per probe; the uprobe is removed when the last one is released
(in the background: the kernel takes ~0.2 s per removal).
"""

from __future__ import annotations

import os

ENTRY_PROGRAM = "argus_call_entry"
RETURN_PROGRAM = "argus_call_return"

UprobeKey = tuple[int, int, int, bool]  # (st_dev, st_ino, vaddr, ret)


class SharedUprobes:
    """The uprobes of one BPF session, by (device, inode, vaddr, ret), with their holders."""

    def __init__(self, session):
        self.session = session
        self.held: dict[UprobeKey, list] = {}  # key -> [path, references]

    def __len__(self) -> int:
        return len(self.held)

    def acquire(self, path: str, vaddr: int, ret: bool) -> UprobeKey:
        """Attach (once per file, node-wide) the generic program at vaddr of the file at
        path, or take one more reference to the uprobe already there."""
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, vaddr, ret)
        entry = self.held.get(key)
        if entry is None:
            fn = RETURN_PROGRAM if ret else ENTRY_PROGRAM
            self.session.attach_uprobe(path, vaddr, fn, -1, ret=ret)
            entry = self.held[key] = [path, 0]
        entry[1] += 1
        return key

    def release(self, key: UprobeKey) -> None:
        """Drop one reference; the last one detaches the uprobe (in the background)."""
        entry = self.held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self.held[key]
            self.session.detach_uprobe(entry[0], key[2], -1, ret=key[3], background=True)
