"""Analysing: pure functions over long-format polars frames read from recordings.

timeline (events of all recordings on one clock) -> matching (collectives across ranks) ->
steps -> align (clocks of several nodes) -> detectors (anomaly, straggler, stall, hang,
hotspot) -> report (`diagnose`, the argus.report/1 object). Nothing here imports collecting.
"""
