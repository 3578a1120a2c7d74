"""The bpf tier needs root and bcc; without them every test here is skipped, saying why.

The zoo tier (`zoo` marker: real PyTorch jobs of every shape, ~40 s a run) runs with
`make test-zoo` (ARGUS_ZOO=1) or `-m zoo`; `make test` skips it, saying so: it would double
the suite's time (README, "Tests")."""

import os
import signal
import time

import pytest

from argus.collect import procfs


def pytest_collection_modifyitems(config, items):
    reason = None
    if os.geteuid() != 0:
        reason = "bpf tier: needs root (real probes on real processes); run `sudo make test-bpf`"
    else:
        try:
            import bcc  # noqa: F401
        except ImportError:
            reason = "bpf tier: bcc is not importable; run `make setup`"
    zoo = os.environ.get("ARGUS_ZOO") == "1" or "zoo" in (config.getoption("markexpr") or "")
    for item in items:
        if "bpf" in item.keywords and reason:
            item.add_marker(pytest.mark.skip(reason=reason))
        elif "zoo" in item.keywords and not zoo:
            item.add_marker(pytest.mark.skip(reason="zoo tier: real PyTorch job shapes, "
                                             "run by `make test-zoo`"))


def pytest_generate_tests(metafunc):
    """A zoo module's checks (`workloads.checks.ZooCells`): one test per shape of its
    FAULTS, known-wrong cells marked."""
    check = getattr(metafunc.function, "zoo_check", None)
    if check is not None and "shape" in metafunc.fixturenames:
        from workloads.checks import shape_params

        cls = metafunc.cls
        metafunc.parametrize("shape", shape_params(list(cls.FAULTS), check, cls.KNOWN))


def _live_children(pid: int) -> set[int]:
    return {c for c in procfs.children(pid) if procfs.alive(c)}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call":
        item.argus_call_failed = rep.failed
    return rep


@pytest.fixture(autouse=True)
def _no_process_left(request):
    """Every process a bpf test starts ends with it. A test that failed half-way had left its
    jobs running (5 simulated jobs, 10 ranks, for the rest of a `make test-stress` run), and
    every later test ran beside them: here they are stopped (SIGTERM, then SIGKILL, the
    whole tree), and a test that passed but left some fails (in its teardown), naming
    them. Processes of wider-scoped fixtures (a module's daemon) were there before and are
    left alone."""
    before = _live_children(os.getpid())
    yield
    deadline = time.monotonic() + 10.0  # what the test stopped may still be exiting
    while (left := _live_children(os.getpid()) - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not left:
        return
    tree = [*left, *(d for p in left for d in procfs.descendants(p))]
    names = [f"{p}: {' '.join(procfs.cmdline(p))[:160]}" for p in tree]
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for p in tree:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while time.monotonic() < end and any(procfs.alive(p) for p in tree):
            time.sleep(0.1)
    for p in left:  # reap our own children (their children are reparented and reaped)
        try:
            os.waitpid(p, os.WNOHANG)
        except ChildProcessError:
            pass
    if not getattr(request.node, "argus_call_failed", True):
        # an error of the test (its teardown): none left over the whole tier, on a quiet
        # machine (fresh-check) and beside a CPU hog per core (make test-stress)
        pytest.fail(f"the test left {len(tree)} process(es) running (now stopped): {names}",
                    pytrace=False)
