"""`python -m argus.sim ...` is scripts/simulate (start_job runs the launcher this way)."""

import sys

from argus.sim.launcher import main

sys.exit(main())
