#!/usr/bin/env python
"""Per-step communication volume and per-card memory of PaCA vs LoRA vs full fine-tuning under DeepSpeed ZeRO-2/3
for LLaMA-3-8B and 70B on 8 and 64 Gaudi 2 cards (docs/scale-out.md). ``--help`` for options."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.scale_out import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
