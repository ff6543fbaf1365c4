#!/usr/bin/env python
"""Train a model on Fashion-MNIST: `python scripts/train.py [--model simplenet] [--epochs 4] ...`.

Writes `<out>/` (default `output/<model>`): config.json, train.log, summary.txt,
history.json, loss.png, accuracy.png, tensorboard/, checkpoints/{last,best}.safetensors.
`--help` lists every option; exit code 2 means a usage or input error.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fashion_func.cli.train import finish_rank, main_train

if __name__ == "__main__":
    sys.exit(finish_rank(main_train()))
