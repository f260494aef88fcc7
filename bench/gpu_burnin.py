"""GPU burn-in from a checkout: the same script the deploy copies into the engine container.

    python3 bench/gpu_burnin.py [--json] [--output FILE] [--sequential] [--sizes 1M,64M,1G]

Needs a python3 with torch (the SGLang image's, or any CUDA build). On a node, prefer the
container form in docs/acceptance.md. Judge a report with:

    .venv/bin/python -m infra.acceptance.verdict FILE --model H100 --count 8
"""

from __future__ import annotations

import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

# Imported as a module (not run as a path) so that the all-reduce ranks, started with the
# "spawn" method, find their worker function by its module name.
from infra.acceptance import burnin  # noqa: E402

if __name__ == "__main__":
    sys.exit(burnin.main())
