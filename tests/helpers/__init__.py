"""Test helpers shared by the unit and bpf tiers (fake /proc trees, real library paths)."""
