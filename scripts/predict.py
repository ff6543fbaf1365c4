#!/usr/bin/env python
"""Evaluate weights on the Fashion-MNIST test set, or classify images.

`python scripts/predict.py --weights runs/a/checkpoints/best.safetensors [--out DIR] [--json]`
`python scripts/predict.py --weights W --images photo.jpg shots/ [--invert]`
`--help` lists every option; exit code 2 means a usage or input error.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fashion_func.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
