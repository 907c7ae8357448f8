"""paca_hpu.atomic, the one writer of files and folders (issue 21 item 3): a failure mid-write leaves the old file
intact and no temporary behind, concurrent writers never share a temporary name, data and rename are flushed in the
right order, and a new file gets the permissions ``open()`` gives; plus the two shared rules of paca_hpu.selection."""
import errno
import json
import os
import re
import threading

import pytest
import torch

from paca_hpu import atomic
from paca_hpu.selection import check_indices, check_r


def _entries(folder):
    return sorted(os.listdir(folder))


def _umask():
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith("Umask:")).split()[1], 8)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, failure):
    target = tmp_path / "metrics.json"
    atomic.write_json_atomic(target, {"old": 1})
    old = target.read_bytes()

    def half_then_fail(tmp):
        with open(tmp, "w") as fh:
            fh.write('{"new": ')  # a torn file, had it been written in place
        raise failure

    with pytest.raises(type(failure)):
        atomic.write_atomic(target, half_then_fail)
    assert target.read_bytes() == old and _entries(tmp_path) == ["metrics.json"]


def test_unserialisable_json_writes_nothing(tmp_path):
    target = tmp_path / "results.json"
    atomic.write_json_atomic(target, [1, 2], indent=1)
    with pytest.raises(TypeError):
        atomic.write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == [1, 2] and _entries(tmp_path) == ["results.json"]


def test_json_text_is_what_json_dumps_gives_plus_a_newline(tmp_path):
    obj = {"b": [1.5, None], "a": "é"}
    atomic.write_json_atomic(tmp_path / "x.json", obj, indent=2, sort_keys=True)
    assert (tmp_path / "x.json").read_text(encoding="utf-8") == json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic.write_json_atomic(tmp_path / "y.json", {"t": torch.float32}, default=str)
    assert json.loads((tmp_path / "y.json").read_text()) == {"t": "torch.float32"}


def test_concurrent_writers_get_their_own_temporary(tmp_path):
    """A second writer of the same file starts while the first one is mid-write (the benchmark's and the study's
    writers used one fixed ``<name>.tmp``: the second truncated the first's data and renamed it away)."""
    target = tmp_path / "run.json"
    seen = []

    def inner(tmp):
        seen.append(tmp)
        with open(tmp, "w") as fh:
            fh.write("inner")

    def outer(tmp):
        seen.append(tmp)
        with open(tmp, "w") as fh:
            fh.write("out")
        atomic.write_atomic(target, inner)  # the other writer, start to finish
        with open(tmp, "a") as fh:
            fh.write("er")

    atomic.write_atomic(target, outer)
    assert len(set(seen)) == 2 and all(os.path.dirname(t) == str(tmp_path) for t in seen)
    assert all(os.path.basename(t).startswith(".run.json.") and t.endswith(".tmp") for t in seen)
    assert target.read_text() == "outer" and _entries(tmp_path) == ["run.json"]


def test_many_threads_writing_one_file_leave_one_whole_version(tmp_path):
    target = tmp_path / "state.json"
    payloads = [{"writer": w, "data": list(range(w * 100, w * 100 + 2000))} for w in range(6)]
    errors = []

    def work(payload):
        try:
            for _ in range(15):
                atomic.write_json_atomic(target, payload)
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(target.read_text()) in payloads and _entries(tmp_path) == ["state.json"]


def test_data_is_flushed_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "adapter_config.json"
    atomic.write_text_atomic(target, "{}\n")
    kinds = [kind for kind, _ in calls]
    assert kinds == ["fsync", "replace", "fsync"], calls
    assert os.path.basename(calls[0][1]).startswith(".adapter_config.json.")  # the temporary, before the rename
    assert calls[1][1] == str(target) and calls[2][1] == str(tmp_path)


def test_a_writer_that_replaces_the_file_still_gets_open_permissions(tmp_path):
    """safetensors' ``save_file`` replaces the file it is given by one of mode 0o600; the result gets the mode a new
    file gets from ``open()`` (0o666 less the umask), as a file written in place would."""
    from safetensors.torch import load_file, save_file

    target = tmp_path / "adapter_model.safetensors"
    atomic.write_atomic(target, lambda tmp: save_file({"w": torch.arange(4.0)}, tmp))
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~_umask()
    assert torch.equal(load_file(str(target))["w"], torch.arange(4.0))


def test_a_folder_written_by_safetensors_gets_open_permissions(tmp_path):
    """An export folder (safetensors writes its file as 0o600) ends up with the files' mode ``open()`` gives, so that
    another user who may read the folder (a serving process) can read the weights too; the folder's mode is mkdir's."""
    from safetensors.torch import save_file

    with atomic.atomic_directory(tmp_path / "export") as tmp:
        save_file({"w": torch.arange(4.0)}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text("{}")
    for name in ("model.safetensors", "config.json"):
        assert os.stat(tmp_path / "export" / name).st_mode & 0o777 == 0o666 & ~_umask()
    assert os.stat(tmp_path / "export").st_mode & 0o777 == 0o777 & ~_umask()


def test_directory_replaces_the_old_one_only_when_complete(tmp_path):
    final = tmp_path / "export"
    with atomic.atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("one")
    assert _entries(final) == ["a.txt"] and _entries(tmp_path) == ["export"]
    assert os.stat(final).st_mode & 0o777 == 0o777 & ~_umask()  # what mkdir gives, not mkdtemp's 0o700

    with pytest.raises(RuntimeError):
        with atomic.atomic_directory(final) as tmp:
            (tmp / "b.txt").write_text("partial")
            raise RuntimeError("conversion failed")
    assert _entries(final) == ["a.txt"] and _entries(tmp_path) == ["export"]

    with atomic.atomic_directory(final) as tmp:
        (tmp / "b.txt").write_text("two")
    assert _entries(final) == ["b.txt"] and _entries(tmp_path) == ["export"]


def test_directory_rename_failure_puts_the_old_one_back(tmp_path, monkeypatch):
    final = tmp_path / "checkpoint-3"
    final.mkdir()
    (final / "trainer_state.json").write_text("{}")
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(os.fspath(src)).startswith(".checkpoint-3.tmp-"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        with atomic.atomic_directory(final) as tmp:
            (tmp / "trainer_state.json").write_text('{"new": 1}')
    assert (final / "trainer_state.json").read_text() == "{}" and _entries(tmp_path) == ["checkpoint-3"]


# ---------------------------------------------------------------------------------------------- the shared rules


@pytest.mark.parametrize("r", [0, -1, 2.0, True, "8", None])
def test_check_r_refuses_what_is_no_positive_integer(r):
    with pytest.raises(ValueError, match=r"PaCAConfig\.r must be an integer >= 1"):
        check_r(r)


def test_check_r_against_in_features_names_the_layer():
    assert check_r(16, 16, "proj") == 16
    with pytest.raises(ValueError, match=r"r=17 must be between 1 and in_features=16 of layer 'proj'"):
        check_r(17, 16, "proj")


@pytest.mark.parametrize("indices,r,needle", [
    (torch.tensor([3, 1, 3]), None, "must be distinct columns, got column 3 2 times"),
    (torch.tensor([0, 16]), None, r"must lie in \[0, 16\), got min 0 max 16"),
    (torch.tensor([-1, 2]), None, r"must lie in \[0, 16\), got min -1 max 2"),
    (torch.tensor([1, 2]), 3, r"tensor of 3 entries, got torch.int64 of shape \(2,\)"),
    (torch.tensor([1.0, 2.0]), None, "int32/int64 tensor of at least one entry, got torch.float32"),
    (torch.tensor([], dtype=torch.int64), None, "of at least one entry"),
    (torch.tensor([[1, 2]]), None, r"of shape \(1, 2\)"),
])
def test_check_indices_names_the_rule_broken(indices, r, needle):
    with pytest.raises(ValueError) as info:
        check_indices(indices, 16, r, what="the indices of 'q_proj'")
    msg = str(info.value)
    assert msg.startswith("the indices of 'q_proj' ") and re.search(needle, msg), msg


def test_check_indices_returns_int64_cpu_in_the_given_order():
    got = check_indices(torch.tensor([5, 0, 9], dtype=torch.int32), 10, 3)
    assert got.dtype == torch.int64 and got.tolist() == [5, 0, 9]
