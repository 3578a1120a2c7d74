"""The host-context analyzers' old module name (issue 15: `Recording.host` is the hostname),
kept while report.py and summary.py import it: they are `host_context` (the metric and the
findings) and `host_windows` (the windows and short stragglers the nodes' CPUs explain)."""

from argus.analyze.host_context import HostContext, contention, context, detect, rank_maps
from argus.analyze.host_windows import explain_stragglers, explain_windows

__all__ = ["HostContext", "contention", "context", "detect", "explain_stragglers",
           "explain_windows", "rank_maps"]
