"""CheckpointPool: formats, validation errors that name file and key, streaming, residency, round trips."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

import soupkit
from soupkit import CheckpointError, CheckpointPool
from conftest import BNNet, save_files


def _save_all(states, tmp_path, fmt):
    return save_files(states, tmp_path, fmt)


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pth"])
def test_files_and_dicts_give_the_same_models(bn_setup, tmp_path, fmt):
    base, states, _ = bn_setup
    pool = CheckpointPool(_save_all(states, tmp_path, fmt), model=base)
    assert len(pool) == len(states)
    for i, s in enumerate(states):
        loaded = pool.load(i)
        assert loaded.keys() == s.keys()
        for k in s:
            assert torch.equal(loaded[k], s[k])


def test_center_is_the_mean_and_streams_one_model(bn_setup):
    base, states, _ = bn_setup
    pool = CheckpointPool(states)
    centre = pool.center()
    for k, v in states[0].items():
        if v.is_floating_point():
            assert torch.allclose(centre[k], torch.stack([s[k] for s in states]).mean(0), atol=1e-6)
        else:
            assert torch.equal(centre[k], v)  # integer buffers come from the first model
    assert pool.max_resident == 1


def test_load_stack_subtracts_and_counts_b_models(bn_setup):
    _, states, _ = bn_setup
    pool = CheckpointPool(states)
    centre = pool.center()
    stack = pool.load_stack([1, 3], subtract=centre, keys=["fc1.weight"])
    assert stack["fc1.weight"].shape == (2, 16, 8)
    assert torch.allclose(stack["fc1.weight"][1], states[3]["fc1.weight"] - centre["fc1.weight"])
    assert pool.resident == 2  # the stack is alive and counts as two models
    del stack
    assert pool.resident == 0
    assert pool.max_resident == 3  # the stack plus the one model being read into it


def test_prefetch_returns_the_same_stack(bn_setup):
    _, states, _ = bn_setup
    pool = CheckpointPool(states)
    fut = pool.prefetch_stack([0, 2], keys=["fc2.bias"])
    assert torch.equal(fut.result()["fc2.bias"], pool.load_stack([0, 2], keys=["fc2.bias"])["fc2.bias"])


def test_cast_on_load(bn_setup):
    _, states, _ = bn_setup
    s = CheckpointPool(states).load(0, dtype=torch.float64)
    assert s["fc1.weight"].dtype == torch.float64
    assert s["bn.num_batches_tracked"].dtype == torch.int64  # integers are never cast


def test_mismatched_key_names_file_and_key(bn_setup, tmp_path):
    _, states, _ = bn_setup
    bad = dict(states[1])
    bad["extra.weight"] = bad.pop("fc2.bias")
    paths = _save_all([states[0], bad], tmp_path, "safetensors")
    with pytest.raises(CheckpointError, match=r"m1\.safetensors.*fc2\.bias"):
        CheckpointPool(paths)


def test_mismatched_shape_names_file_and_key(bn_setup, tmp_path):
    _, states, _ = bn_setup
    bad = dict(states[1])
    bad["fc2.weight"] = torch.zeros(4, 16)
    paths = _save_all([states[0], bad], tmp_path, "pt")
    with pytest.raises(CheckpointError, match=r"m1\.pt.*'fc2\.weight'.*shape \[4, 16\]"):
        CheckpointPool(paths)


def test_dtype_mismatch_needs_explicit_cast(bn_setup):
    _, states, _ = bn_setup
    half = {k: v.half() if v.is_floating_point() else v for k, v in states[1].items()}
    with pytest.raises(CheckpointError, match="dtype"):
        CheckpointPool([states[0], half])
    pool = CheckpointPool([states[0], half], cast_dtype=torch.float32)
    assert pool.load(1)["fc1.weight"].dtype == torch.float32


def test_model_mismatch(bn_setup):
    _, states, _ = bn_setup
    with pytest.raises(CheckpointError, match="key"):
        CheckpointPool(states, model=torch.nn.Linear(8, 3))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_run_code_is_refused(tmp_path, bn_setup):
    _, states, _ = bn_setup
    path = tmp_path / "evil.pt"
    torch.save({"fc1.weight": states[0]["fc1.weight"], "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        CheckpointPool([path])
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match="raw.pt"):
        soupkit.load_state_dict(raw)


def test_missing_and_empty():
    with pytest.raises(CheckpointError, match="K = 0"):
        CheckpointPool([])
    with pytest.raises(CheckpointError, match="nowhere.safetensors: file not found"):
        CheckpointPool(["nowhere.safetensors"])


def test_state_dict_round_trip(tmp_path, bn_setup):
    _, states, _ = bn_setup
    p = soupkit.save_state_dict(states[2], tmp_path / "sub" / "soup.safetensors")
    back = soupkit.load_state_dict(p)
    assert back.keys() == states[2].keys()
    assert all(torch.equal(back[k], states[2][k]) for k in back)
    assert not any(f.name.startswith(".") for f in p.parent.iterdir())  # no temp file left behind


def test_peak_memory_sees_an_allocation():
    """In a fresh interpreter: this machine's kernel pages out cold memory (DAMON "pageout"), and in a long test
    session the pages it takes from the process during the block can offset the 64 MiB the block adds to the
    resident set; a young process has no cold pages yet."""
    code = ("import soupkit, torch\n"
            "with soupkit.PeakMemory('cpu') as meter:\n"
            "    x = torch.ones(64 * 2**20 // 4)  # 64 MiB\n"
            "    x += 1\n"
            "print(meter.peak_bytes, meter.source)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) > 48 * 2**20, out