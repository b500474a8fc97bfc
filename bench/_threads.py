"""Thread count for a benchmark script, applied before numpy/BLAS is imported.

BLAS reads OMP/OPENBLAS/MKL_NUM_THREADS once, at import, so a script imports this module
first (it sits beside the scripts, which Python puts on sys.path) and reads ``THREADS``.
"""

from __future__ import annotations

import os
import sys


def threads_from_argv(default: int = 1) -> int:
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return default


THREADS = threads_from_argv()
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)
