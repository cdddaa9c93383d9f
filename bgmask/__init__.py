"""bgmask: masking strategies for background bias removal (baseline, early and late masking).

Mask convention, everywhere in this package: 1 = foreground (bird), 0 = background.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# OpenMP threads that spin while waiting collapse throughput when a CPU is shared with DataLoader
# workers or another job (benchmarks/README.md, "Measurement notes"); passive waiting costs little on a
# dedicated machine. Only a default: set OMP_WAIT_POLICY yourself to override, and it has no effect
# once torch is imported.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
