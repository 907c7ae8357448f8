"""``python -m paca_hpu COMMAND``: tools that work on saved adapters.

    python -m paca_hpu export ADAPTER_DIR --to {lora,merged} --output OUT_DIR [--base_model PATH_OR_NAME]
                              [--dtype {fp32,bf16,fp16}]

Exit status: 0 done; 2 bad input, a base model path that does not exist, or a full / read-only output disk (one-line
``error:`` message on stderr); 1 anything unexpected (traceback).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``prog: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m paca_hpu", description="Tools for paca_hpu adapters.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    export = commands.add_parser(
        "export", help="convert a PaCA adapter into a peft LoRA adapter or a merged checkpoint",
        description="Convert a paca_hpu adapter directory into a peft LoRA adapter (exact; peft, vLLM, TGI, SGLang "
                    "load it) or a plain merged transformers checkpoint.")
    export.add_argument("adapter_dir", help="a paca_hpu adapter directory (Trainer output or checkpoint-N)")
    export.add_argument("--to", required=True, choices=("lora", "merged"), help="what to write")
    export.add_argument("--output", required=True, help="new or empty directory to write (atomically)")
    export.add_argument("--base_model", default=None,
                        help="base model path or hub name (default: base_model_name_or_path in the adapter)")
    export.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                        help="lora: dtype of the LoRA matrices (default fp32); merged: dtype of the weights "
                             "(default: the base checkpoint's)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    from .export import ExportError, export_lora, export_merged

    run = export_lora if args.to == "lora" else export_merged
    try:
        out = run(args.adapter_dir, args.output, base_model=args.base_model, dtype=args.dtype)
    except (ExportError, ImportError) as err:
        print(f"python -m paca_hpu export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.to} export of {args.adapter_dir} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
