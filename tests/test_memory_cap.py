"""The memory cap that turns a run into "did not fit", as the paper's ">256GB" entries."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

from soupkit.experiments.run import RunSpec, run_isolated, run_method
from soupkit.errors import MemoryCapExceeded
from soupkit.runtime.memory import MemoryCap
from soupkit.zoo.embedded_models import ViTConfig
from soupkit.experiments.results import main_table, paper_table
from soupkit.zoo.config import ZooConfig
from soupkit.zoo.build import build_zoo


_CAP_CHECK = """
import soupkit, torch
from soupkit.errors import MemoryCapExceeded
from soupkit.runtime.memory import MemoryCap
kept = []
try:
    with MemoryCap(40 * 2**20):
        for _ in range(100):  # 8 MB a step: passes 40 MB after ~5 steps, long before the loop ends
            kept.append(torch.ones(2 * 2**20))
except MemoryCapExceeded as err:
    print("stopped", err.seen_bytes, len(kept))
else:
    print("ran", 0, len(kept))
kept.clear()
with MemoryCap(200 * 2**20):
    x = torch.ones(2**20)  # 4 MB under a 200 MB cap: nothing happens
print("spared", int(x.sum()))
"""


@pytest.mark.parametrize("sigint", ["handled", "ignored"])
def test_cap_stops_a_block_that_grows_past_it_and_spares_one_below(sigint):
    """In a fresh interpreter (for the reason of test_pool.test_peak_memory_sees_an_allocation), and also as a
    background job starts one: with SIGINT ignored, where the cap's interrupt would otherwise do nothing and the
    block would run to its end."""
    inherited = signal.SIG_IGN if sigint == "ignored" else signal.SIG_DFL  # whatever this test process has
    lines = subprocess.run([sys.executable, "-c", _CAP_CHECK + _HANDLER_CHECK], capture_output=True, text=True,
                           check=True, preexec_fn=lambda: signal.signal(signal.SIGINT, inherited)).stdout.split("\n")
    what, seen, kept = lines[0].split()
    assert what == "stopped" and int(seen) > 40 * 2**20 and int(kept) < 100, lines
    assert lines[1] == f"spared {2**20}"
    assert lines[2] == ("handler restored: " + ("SIG_IGN" if sigint == "ignored" else "default_int_handler"))
    with pytest.raises(ValueError):
        MemoryCap(0)


_HANDLER_CHECK = """
import signal
h = signal.getsignal(signal.SIGINT)
print("handler restored:", "SIG_IGN" if h is signal.SIG_IGN else getattr(h, "__name__", h))
"""


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("capzoo")
    config = ZooConfig(k=3, model=ViTConfig(width=16, layers=1, heads=2, output_dim=8), pretrain_epochs=1,
                       lp_steps=5, epoch_choices=(1,), max_pretrain=100, max_finetune=100, max_eval=100)
    return build_zoo(directory / "zoo", config, progress=False, num_threads=1)


def test_a_capped_run_is_recorded_as_did_not_fit_and_shown_so(tiny_zoo, tmp_path):
    # 1 KB: any learned soup needs more; uniform with no cap runs as usual
    capped = RunSpec(str(tiny_zoo.out_dir), "learned+", str(tmp_path / "l.json"), heldout_size=100,
                     memory_cap_mb=1 / 1024, options={"epochs": 1.0, "progress": False})
    record = run_isolated(capped)
    assert record["status"] == "did not fit" and record["test_accuracy"] is None
    assert json.loads((tmp_path / "l.json").read_text())["status"] == "did not fit"
    free = run_method(RunSpec(str(tiny_zoo.out_dir), "uniform", str(tmp_path / "u.json"), heldout_size=100))
    assert free["status"] == "ok" and 0 <= free["test_accuracy"] <= 1
    table = main_table([record, free], paper_table("table2_vitl14", dataset="cifar10")).set_index("method")
    assert table.loc["learned+", "note"].startswith("did not fit (> 0.000976")
    assert pd.isna(table.loc["learned+", "test acc (%)"]) and table.loc["uniform", "note"] == ""
    assert table.loc["learned+", "paper note"] == "did not fit (> 256 GB)"


def test_paper_table_filters_a_dataset():
    assert set(paper_table("table2_vitl14", dataset="cifar100")["method"]) >= {"mehl+", "greedy"}
    with pytest.raises(ValueError, match="no rows"):
        paper_table("table2_vitl14", dataset="svhn")
    with pytest.raises(ValueError, match="no dataset column"):
        paper_table("table1_vitb32_imagenet", dataset="cifar10")


def test_out_of_memory_without_a_cap_is_also_did_not_fit(tiny_zoo, tmp_path, monkeypatch):
    import soupkit.experiments.run as experiment

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(experiment, "make_soup", oom)
    record = run_method(RunSpec(str(tiny_zoo.out_dir), "learned+", str(tmp_path / "l.json"), heldout_size=100))
    assert record["status"] == "did not fit" and record["note"].startswith("CUDA out of memory")
    assert main_table([record]).loc[0, "note"] == "did not fit (out of memory)"
