"""The one protocol every channel implements (see channels/__init__.py for the registry).

A channel is one kind of thing argus collects (calls, CPU stacks, host context, process
lifecycle, device kernel times, GPU counters). It says which switches turn it on (the names of
`TraceOptions.channels` and of the `--no-NAME` flags), which BPF files and -D flags it adds
to the node's one program set, and what it does at each step of the session loop that
`Tracer` runs: attach (the program set is loaded), start (the targets are watched), poll
(every pass of the loop), finish (the session ends: drain the kernel), and its part of the
manifest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from argus.collect.targets import Target
    from argus.collect.tracer import TraceOptions, Tracer


class Channel:
    """One collector. Subclasses set the class attributes and override what they use;
    every hook defaults to doing nothing."""

    name: ClassVar[str]
    # the names that turn it on (TraceOptions.channels, `argus attach --no-NAME`), with the
    # flag's help; () with `always`: on in every session
    switches: ClassVar[dict[str, str]] = {}
    always: ClassVar[bool] = False
    # alone it explains nothing (host context): some other switch must be on
    context_only: ClassVar[bool] = False
    # BPF files (in BPF_DIR) it adds to the program set; () for a channel with no BPF side
    sources: ClassVar[tuple[str, ...]] = ()
    # its rows name user addresses: the symbol tables are built while the programs compile
    symbolizes: ClassVar[bool] = False
    # composed by the Tracer (its hooks run in the session loop); False: runs beside it
    in_tracer: ClassVar[bool] = True

    def __init__(self, tracer: Tracer):
        self.tracer = tracer
        self.on = self.wanted(tracer.opts)

    @classmethod
    def wanted(cls, opts: TraceOptions) -> bool:
        return cls.always or any(s in opts.channels for s in cls.switches)

    def cflags(self) -> list[str]:
        """-D flags of its BPF files (computed before the program set is compiled)."""
        return []

    def attach(self, session) -> None:
        """The program set is loaded: attach its programs, open its ring buffers."""

    def start(self) -> None:
        """The planned targets are watched: begin sampling."""

    def poll(self, now: float) -> None:
        """One pass of the session loop (`now`: time.monotonic())."""

    def finish(self) -> None:
        """The session ends: drain what is still in the kernel."""

    def on_traced(self, target: Target) -> None:
        """A target is (still) traced after a scan of its mappings."""

    def on_gone(self, target: Target) -> None:
        """A target exited or exec'd a new image: release what it held."""

    def forget(self, tgids: set[int]) -> None:
        """Processes dropped from the session: drop their state."""

    def manifest(self) -> dict:
        """Its keys of the recording's manifest."""
        return {}
