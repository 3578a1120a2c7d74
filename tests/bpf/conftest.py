"""The bpf tier needs root and bcc; without them every test here is skipped, saying why."""

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
    for item in items:
        if "bpf" in item.keywords and reason:
            item.add_marker(pytest.mark.skip(reason=reason))
