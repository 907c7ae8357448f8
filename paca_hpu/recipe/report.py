"""What a training run shows: its log records on stdout, the loss plot, and the printed summary."""

import logging
import os
import sys
from typing import Any, Dict, List, Optional

logger = logging.getLogger("paca_hpu.run_paca_clm")

class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (main() may run repeatedly in one process)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(training_args=None) -> None:
    """paca_hpu's log records to stdout; INFO on the main process once ``training_args`` are known, WARNING before
    (so the warnings of argument parsing are printed too)."""
    root = logging.getLogger("paca_hpu")
    if not any(isinstance(h, _StdoutHandler) for h in root.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    if training_args is None:
        root.setLevel(logging.WARNING)
        return
    import transformers

    root.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()


def quantization_metrics(model) -> Dict[str, Any]:
    """``{"quantization": "bitsandbytes 4-bit nf4 ..."}`` for a model loaded with ``--load_in_4bit``, else ``{}``."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None or not getattr(qc, "load_in_4bit", False):
        return {}
    return {"quantization": f"bitsandbytes 4-bit {qc.bnb_4bit_quant_type}"
                            f"{' + double quant' if qc.bnb_4bit_use_double_quant else ''}, compute "
                            f"{str(qc.bnb_4bit_compute_dtype).replace('torch.', '')}"}


def plot_title(metrics: Dict[str, Any]) -> str:
    """``"<model> · <method> (r=<r>) · <steps> steps"`` for the loss plot (model: the directory's or hub name's last
    part; method paca / lora / full fine-tuning; steps: the last optimizer step, ``global_step``, which after a
    resume counts the checkpoint's steps too, else ``train_steps``)."""
    model = str(metrics.get("model", "")).rstrip("/\\")
    model = model.split(":", 1)[1] if model.startswith("embedded:") else os.path.basename(model) or model
    method = {"paca": "PaCA", "lora": "LoRA", "none": "full fine-tuning"}.get(metrics.get("peft_type"), "?")
    if metrics.get("r") is not None:
        method += f" (r={metrics['r']})"
    steps = metrics.get("global_step", metrics.get("train_steps"))  # the plot shows a resumed run's earlier steps too
    return f"{model} · {method}" + (f" · {steps} steps" if steps is not None else "")


def loss_figure(log_history: List[Dict[str, Any]], eval_before: Optional[float], title: str):
    """Matplotlib figure of training loss (per logged step) and held-out loss (step 0 = before training) against
    the optimizer step, with ``title`` and integer step ticks."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if eval_before is not None and not any(s == 0 for s, _ in evals):
        evals = [(0, eval_before)] + evals
    evals = sorted(dict(evals).items())
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="training loss", color="tab:blue", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), label="held-out loss", color="tab:orange", marker="o", linewidth=1.5)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_losses(log_history: List[Dict[str, Any]], eval_before: Optional[float], path: str,
                 title: str) -> Optional[str]:
    try:
        fig = loss_figure(log_history, eval_before, title)
    except ImportError:  # matplotlib is in the train / demo extras, not in the core install
        logger.warning("matplotlib is not installed (pip install 'paca_hpu[train]'); no loss plot written")
        return None
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def print_summary(m: Dict[str, Any], out: str) -> None:
    """Print the run's summary (device, method, parameters, held-out losses, times, memory) from its metrics."""
    def f(x, spec=".4f"):
        return "n/a" if x is None else format(x, spec)

    loss_on = "prompt and response" if m.get("train_on_inputs") else "responses only"
    targets = m.get("target_modules") or []  # PaCAConfig's: "all-linear", one regular expression, or names
    targets = targets if isinstance(targets, str) else " ".join(targets)
    lines = [
        "",
        "=" * 64,
        "run_paca_clm summary",
        "-" * 64,
        f"device                : {m['device_description']}  [{m['trainer']}]",
        f"method                : {m['peft_type']}"
        + (f" (r={m.get('r')}, alpha={m.get('alpha')}, targets={targets})"
           if m["peft_type"] != "none" else " (full fine-tuning)"),
        *([f"base weights          : {m['quantization']}"] if m.get("quantization") else []),
        f"trainable parameters  : {m['trainable_params']:,} of {m['total_params']:,} ({m['trainable_percent']:.4f} %)",
        f"held-out loss         : {f(m.get('eval_loss_before'))} -> {f(m.get('eval_loss_after'))}"
        + (f"  ({m['eval_samples']} examples, loss on {loss_on})" if m.get("eval_samples") else ""),
    ]
    if "eval_loss_reloaded" in m:
        lines.append(f"saved adapter reloaded: held-out loss {f(m['eval_loss_reloaded'])} on a fresh base model")
    if "train_runtime" in m:
        steps, start = m.get("train_steps") or 0, m.get("resumed_from_step") or 0
        per_step = f", {m['train_seconds'] / steps:.2f} s/step" if steps else ""
        resumed = f" ({start + 1} to {start + steps}, resumed at step {start})" if start and steps else ""
        lines += [
            f"training              : {steps} step{'' if steps == 1 else 's'}{resumed} in {f(m.get('train_seconds'), '.1f')} s{per_step} "
            "(optimizer steps only)",
            f"train tokens/s        : {f(m.get('train_tokens_per_second'), ',.1f')} (input tokens incl. padding; "
            f"{m.get('throughput_measured_steps')} steps after {m.get('throughput_warmup_steps')} warm-up, "
            "evaluation and checkpoint time excluded)",
            f"peak memory           : {_fmt_bytes(m.get('peak_memory_bytes'))} ({m.get('peak_memory_kind')})",
        ]
    lines += [
        f"held-out evaluation   : {m.get('evaluations', 0)} evaluations in {f(m.get('eval_seconds'), '.1f')} s",
        f"wall time             : {f(m.get('total_seconds'), '.1f')} s in all (training, evaluation, "
        f"checkpoints {f(m.get('checkpoint_seconds'), '.1f')} s, loading and saving)",
        f"output                : {out}",
        "=" * 64,
    ]
    print("\n".join(lines), flush=True)
