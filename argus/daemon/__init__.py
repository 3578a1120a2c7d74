"""`argus daemon`: the node-wide service (discover -> one Tracer -> per-job windows ->
summaries on disk, diagnosis, Prometheus metrics and the live state). Composes collecting,
analysing and presenting; nothing imports it but its CLI command."""
