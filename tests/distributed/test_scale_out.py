"""``scripts/scale_out.py`` on the command line: ``--config`` prints the same table as the built-in models (``--json``
the numbers), and an ``--r`` above a targeted projection's ``in_features`` is refused with one line."""

import json

import pytest

from benchmarks.scale_out import LLAMA3_8B, main

#: LLaMA-3-8B under PaCA r=8, counted by hand: 32 layers x r x the sum of the seven projections' out_features
#: (q 4096, k 1024, v 1024, o 4096, gate 14336, up 14336, down 4096 = 43,008) trainable float32 elements.
PACA_8B_R8 = 32 * 8 * 43008


def _write_config(tmp_path, cfg, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def _rows(table, label):
    return [ln.split("|", 2)[2] for ln in table.splitlines() if ln.startswith(f"| {label} |")]


def test_config_prints_the_table_of_that_model(tmp_path, capsys):
    assert main([]) == 0
    builtin = capsys.readouterr().out
    path = _write_config(tmp_path, dict(LLAMA3_8B, _name_or_path="meta-llama/Meta-Llama-3-8B"))
    assert main(["--config", path]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == builtin.splitlines()[0]  # the same table, not JSON
    rows = _rows(printed, "meta-llama/Meta-Llama-3-8B")
    assert len(rows) == 3 * 2 * 2 and rows == _rows(builtin, "LLaMA-3-8B")  # 3 methods x 2 engines x 2 world sizes
    assert f"| PaCA r=8 | {PACA_8B_R8 / 1e6:,.1f} M |" in printed  # 11.0 M
    assert main(["--config", path, "--json", "--world", "8", "--engines", "zero2"]) == 0
    numbers = json.loads(capsys.readouterr().out)
    comm = numbers["meta-llama/Meta-Llama-3-8B"]["paca"]["zero2"]["8"]["communication"]
    assert comm == {"all_reduce": PACA_8B_R8 * 2, "reduce_scatter": 0, "all_gather": PACA_8B_R8 * 4}  # bf16 / fp32


TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 100}


@pytest.mark.parametrize("args, expected", [
    (["--r", "65"], "error: --r 65 exceeds in_features=64 of tiny's q_proj"),
    (["--r", "5000"], "error: --r 5000 exceeds in_features=4096 of LLaMA-3-8B's q_proj"),
])
def test_r_above_in_features_is_one_line(tmp_path, capsys, args, expected):
    cfg = [] if "5000" in args else ["--config", _write_config(tmp_path, TINY, "tiny.json")]
    assert main(cfg + args) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith(expected), err
    assert "pass --r" in err
    if cfg:  # r up to the smallest in_features is fine
        assert main(cfg + ["--r", "64"]) == 0
        assert "| tiny | PaCA r=64 |" in capsys.readouterr().out
