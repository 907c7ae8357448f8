"""``--merge``: keep the sections of an earlier run in the same output folder that this invocation does not rerun
(same model, dtype, batch and seq_len required)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from .arguments import QPACA_PARTS, SECTIONS, _csv

_MERGE_KEYS = {"timing": ["timing"], "saved": ["saved"], "memory": ["memory", "memory_plain_rss"],
               "maxseq": ["maxseq", "maxseq_max_position_embeddings"], "maxbatch": ["maxbatch"],
               "quality": ["quality"], "profile": ["profile"],
               "qpaca": ["qpaca"]}


def _previous_qpaca(args, results: dict, out_dir: Path, log) -> Optional[dict]:
    """With ``--merge``: the ``qpaca`` section of the earlier run in ``out_dir`` (its parts that ``--qpaca_parts``
    does not rerun are kept), or None. Another model/dtype/shape (:func:`_check_merge_target`) or quantization is
    refused."""
    path = out_dir / "results.json"
    if not args.merge or not path.is_file():
        return None
    old = _check_merge_target(path, results)
    prev = old.get("qpaca")
    if not prev:
        return None
    quant = {"quant_type": args.bnb_4bit_quant_type, "double_quant": bool(args.bnb_4bit_use_double_quant)}
    if any(prev.get("quant", {}).get(k) != v for k, v in quant.items()):
        raise SystemExit(f"--merge: {path} holds a qpaca section of another model/dtype/shape/quantization; "
                         "use another --output_dir")
    kept = [part for part in QPACA_PARTS if part not in _csv(args.qpaca_parts) and part in prev]
    log(f"qpaca: keeping parts {kept} of {path}")
    old_cmds = prev.get("part_commands") or {part: old.get("meta", {}).get("command") for part in kept}
    return dict({part: prev[part] for part in kept}, part_commands={part: old_cmds.get(part) for part in kept})


def _check_merge_target(path: Path, results: dict) -> dict:
    """The earlier run at ``path`` as a dict, if it has this run's model, dtype, batch and seq_len; else exit with
    the fields that differ."""
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    keys = ("model", "dtype", "batch", "seq_len")
    before = old.get("config", {})
    differ = [k for k in keys if before.get(k) != results["config"].get(k)]
    if differ:
        was = ", ".join(f"{k} {before.get(k)!r} there, {results['config'].get(k)!r} now" for k in differ)
        raise SystemExit(f"--merge: {path} was made with a different {'/'.join(differ)} ({was}); "
                         "use another --output_dir")
    return old


def _merge_previous(results: dict, path: Path, sections: List[str], log) -> None:
    """Copy into ``results`` the sections of the earlier run at ``path`` that were not rerun now."""
    old = _check_merge_target(path, results)
    kept = []
    for sec, ks in _MERGE_KEYS.items():
        if sec in sections or ks[0] not in old:
            continue
        for k in ks:
            if k in old:
                results[k] = old[k]
        om = old.get("meta", {})
        results["meta"]["section_commands"][sec] = om.get("section_commands", {}).get(sec, om.get("command"))
        results["meta"]["section_busy"][sec] = om.get("section_busy", {}).get(sec, om.get("busy_warning"))
        kept.append(sec)
    busy = {w for w in results["meta"]["section_busy"].values() if w}
    if busy:
        results["meta"]["busy_warning"] = " ".join(sorted(busy))
    else:
        results["meta"].pop("busy_warning", None)
    results["config"]["sections"] = [s for s in SECTIONS if s in sections or s in kept]
    log(f"merged sections {kept} from {path}")
