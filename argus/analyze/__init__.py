"""Analysing: pure functions over long-format polars frames read from recordings.

timeline (events of all recordings on one clock) -> matching (collectives across ranks) ->
steps (cycles: each rank's repeating pattern) -> align (clocks of several nodes): the opening
of `evidence` -> detectors (anomaly, straggler, stall, hang, hotspot, gpu, host, pipeline)
-> report (`assemble_report`, the argus.report/1 object). `diagnosis.diagnose` is the entry
point over recordings or their summaries (`compress` builds those). Nothing here imports
collecting.
"""

# blocked this long at the end of a recording = hung (`argus attach --hang-after`): here, not
# in report, so the CLI's option default costs no import of the analyzers
DEFAULT_HANG_AFTER_S = 10.0
