#!/usr/bin/env python
"""Train a preset N times, report test accuracy mean ± std and the training time:
`python scripts/speedrun.py --runs 10` (= `fashion-func speedrun --runs 10`; `--help` for more).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fashion_func.cli.speedrun import main

if __name__ == "__main__":
    sys.exit(main())
