"""argus: always-on eBPF tracer and diagnosis for distributed GPU training jobs."""

__version__ = "0.1.0"
