"""The bpf tier needs root and bcc; without them every test here is skipped, saying why.

The zoo tier (`zoo` marker: real PyTorch jobs of every shape, ~40 s a run) runs with
`make test-zoo` (ARGUS_ZOO=1) or `-m zoo`; `make test` skips it, saying so: it would double
the suite's time (README, "Tests")."""

import os

import pytest


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
