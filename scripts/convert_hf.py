"""Converts a Hugging Face Qwen3-MoE or Mixtral checkpoint into a run directory that
scripts/train.py continues (step-0 checkpoint, config YAML, tokenizer.json). Options:
--help, or models/hf.py, which holds the command line (importable by tests).

  python scripts/convert_hf.py --hf-dir ckpt/Qwen3-30B-A3B --run-dir runs/qwen3 --mesh 4x8
  python scripts/train.py --config runs/qwen3/config.yaml --run-dir runs/qwen3 --data corpus/
"""

import sys

from models.hf import main

if __name__ == "__main__":
  sys.exit(main())
