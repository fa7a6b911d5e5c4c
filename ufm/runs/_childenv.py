"""Imported by the run/task process server (:mod:`ufm.runs.worker`) before torch: OpenMP reads its
wait policy once, when torch loads it. PASSIVE: threads waiting for work sleep instead of
spinning, so two runs (or a run and the web server) on few cores do not steal each other's time."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
