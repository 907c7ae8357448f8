#!/usr/bin/env python
"""Benchmark PaCA against the frozen floor, peft LoRA and full fine-tuning; see ``--help`` and docs/benchmarks.md.

Examples::

    python scripts/benchmark.py                                   # all default sections, fp32, batch 4 x 256
    python scripts/benchmark.py --dtype bf16 --batch 2 --seq_len 512
    python scripts/benchmark.py --sections profile --variants floor,paca --profile_rounds 3
    python scripts/benchmark.py --tiny --rounds 2 --steps 2 --output_dir /tmp/bench   # smoke test
    python scripts/benchmark.py --docs_only                       # rebuild docs/benchmarks.md
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
