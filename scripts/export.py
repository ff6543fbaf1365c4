#!/usr/bin/env python
"""Export weights for PyTorch, JAX/Flax or numpy.

`python scripts/export.py --weights runs/a/checkpoints/best.safetensors --format flax --out w.safetensors`
`--format torch|flax|numpy|onnx`, `--bf16-as float32|uint16|bfloat16`; `--help` lists every option.
Exit code 2 means a usage or input error.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fashion_func.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
