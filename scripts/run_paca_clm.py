#!/usr/bin/env python
"""Fine-tune a causal LM with PaCA (or peft LoRA, or fully) on Intel Gaudi, CUDA or CPU.

Flags follow optimum-habana's examples/language-modeling/run_lora_clm.py; run with --help for the list.
Without arguments it fine-tunes the embedded default (SmolLM2-135M-Instruct on GSM8K).
All logic lives in paca_hpu.recipe (paca_hpu.cli keeps its names).
"""
import os
import sys

if __name__ == "__main__":
    # allow running from a source checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from paca_hpu.cli import main

    sys.exit(main())
