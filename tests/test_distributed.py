"""Learned soups over 2 real processes (torchrun, gloo, CPU) equal the single-process run with the same global
batch; a failing rank ends the whole launch; the sharded held-out stream cuts the global batches exactly.

Run as a script under torchrun (``torchrun --nproc-per-node 2 tests/test_distributed.py DATA OUT JOB``) it is
the job the tests launch: every case of ``CASES``, a resumed run and the command line on a zoo (``JOB=cases``;
one launch, as each costs seconds of start-up), or a run in which rank 1 fails (``JOB=fail``).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import soupkit
from soupkit import make_soup
from soupkit.methods.run_dir import RunDir
from soupkit.cli import main as cli_main
from soupkit.runtime import distributed
from soupkit.runtime.distributed import Communicator, communicator, on_main, shard_bounds, shard_loader
from soupkit.errors import DataError, ResumeError
from soupkit.engine.batches import BatchStream
from conftest import BNNet, batches, finetunes, make_data

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(progress=False, inner_iterations=7)
# (name, method, parallel, loader, options); loader "list": batches of 53 (the last has 1 row, so one rank's
# part is empty), "shuffled": a shuffling DataLoader of 53 (each rank reads its own rows), "rebatched": the
# list re-batched to 33 by the stream (read whole, then cut); "buckets": all-reduces of at most that many
# elements (the tiny models' tensors then need several, some alone in place)
CASES = [
    ("learned-list-clip", "learned", "data", "list", dict(clip_grad_norm=0.05)),
    ("learned+-shuffled", "learned+", "data", "shuffled", {}),
    ("hl+-rebatched", "hl+", "data", "rebatched", dict(batch_size=33)),
    ("mehl+-shuffled-clip", "mehl+", "data", "shuffled", dict(model_batch_size=2, clip_grad_norm=0.5, buckets=64)),
    ("mehl+-model", "mehl+", "model", "list", dict(model_batch_size=3, buckets=64)),
    ("mehl-model-variants", "mehl", "model", "shuffled",
     dict(model_batch_size=3, normalize_directions=True, recenter=True, clip_grad_norm=0.5, prefetch=True)),
    ("hl-model-select", "hl", "model", "list", dict(select_loader="heldout", eval_every=3)),
]
RESUME = dict(model_batch_size=2, outer_iterations=3, inner_iterations=4, progress=False)
CLI = ["mehl+", "--heldout-size", "60", "--batch-size", "25", "--no-progress", "--option", "inner_iterations=4",
       "--option", "model_batch_size=2", "--option", "clip_grad_norm=1"]


class Killed(Exception):
    """Raised by rank 0 right after a checkpoint, as a crash between two blocks would."""


def _write_inputs(directory: Path, zoo: bool = False) -> None:
    if zoo:
        from soupkit.zoo.embedded_models import ViTConfig  # noqa: PLC0415
        from soupkit.zoo.config import ZooConfig
        from soupkit.zoo.build import build_zoo  # noqa: PLC0415

        build_zoo(directory / "zoo", ZooConfig(k=3, model=ViTConfig(width=16, layers=1, heads=2, output_dim=8),
                                               batch_size=64, pretrain_epochs=1, lp_steps=5, epoch_choices=(1,),
                                               max_pretrain=64, max_finetune=64, max_eval=50),
                  progress=False, num_threads=1)
    x, y = make_data()
    _, states = finetunes(BNNet, x, y, k=5)
    for i, s in enumerate(states):
        soupkit.save_state_dict(s, directory / f"m{i}.safetensors")
    torch.save({"x": x, "y": y}, directory / "heldout.pt")


def _inputs(directory: Path, loader: str) -> tuple[list[Path], object]:
    data = torch.load(directory / "heldout.pt")
    x, y = data["x"], data["y"]
    if loader == "shuffled":
        held = DataLoader(TensorDataset(x, y), batch_size=53, shuffle=True, generator=torch.Generator().manual_seed(4))
    else:
        held = batches(x, y, size=53)
    return sorted(directory.glob("m*.safetensors")), held


def _run_case(directory: Path, case: tuple, parallel: str | None) -> soupkit.SoupResult:
    _, method, mode, loader, options = case
    options, default = dict(options), distributed.BUCKET_NUMEL
    distributed.BUCKET_NUMEL = options.pop("buckets", default)
    paths, held = _inputs(directory, loader)
    if options.get("select_loader") == "heldout":
        options = {**options, "select_loader": batches(*make_data(n=60, seed=9), size=30)}
    try:
        return make_soup(method, BNNet(), paths, held, parallel=parallel and mode, **FAST, **options)
    finally:
        distributed.BUCKET_NUMEL = default


def _summary(r: soupkit.SoupResult) -> dict:
    return {"coefficients": r.coefficients, "history": r.history, "soup": r.state_dict, "stats": r.stats}


def _job(directory: Path, out: Path, job: str) -> None:
    import torch.distributed as dist  # noqa: PLC0415

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if job == "fail":  # rank 1 finds a bad label in its part of the 2nd batch while rank 0 waits in all-reduce
        x, y = make_data()
        y[105] = 7
        paths, _ = _inputs(directory, "list")
        make_soup("mehl+", BNNet(), paths, batches(x, y, size=53), parallel="data", **FAST)
        return
    results = {case[0]: _summary(_run_case(directory, case, "on")) for case in CASES}
    save = RunDir.save

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise Killed("after the first block")

    paths, held = _inputs(directory, "shuffled")
    RunDir.save = save_then_die
    try:
        make_soup("mehl+", BNNet(), paths, held, run_dir=out / "run", parallel="data", **RESUME)
    except Killed as err:  # rank 1 gets rank 0's exception, not a hang
        results["killed"] = str(err)
    RunDir.save = save
    # a fresh loader, as a restarted job has: its private generator starts again (the saved state is at the end
    # of a pass, where the replay of a fresh loader draws the same order)
    paths, held = _inputs(directory, "shuffled")
    results["resumed"] = _summary(make_soup("mehl+", BNNet(), paths, held, run_dir=out / "run", parallel="data",
                                            **RESUME))
    try:
        make_soup("mehl+", BNNet(), paths, held, run_dir=out / "run", parallel="data", **{**RESUME, "lr": 0.02})
    except ResumeError as err:
        results["refused"] = type(err).__name__
    cli_main([*CLI, "--zoo", str(directory / "zoo"), "--out", str(out / "cli"), "--parallel", "data"])
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


# ---- launching ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node 2 ARGS`` on a free local port (gloo, CPU)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--monitor-interval", "0.2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Inputs, the two ranks' results of every case, and nothing else: one launch for all equality tests."""
    directory = tmp_path_factory.mktemp("dist")
    _write_inputs(directory, zoo=True)
    done = torchrun([__file__, str(directory), str(directory), "cases"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return directory, [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_close(got: dict, ref: soupkit.SoupResult, coefficients_atol: float = 1e-5) -> None:
    assert got["history"] == pytest.approx(ref.history, abs=1e-5)
    assert torch.allclose(got["coefficients"], ref.coefficients, atol=coefficients_atol)
    for key, value in ref.state_dict.items():
        assert torch.allclose(got["soup"][key].to(value.dtype), value, atol=1e-5), key


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_two_ranks_equal_one_process_with_the_same_global_batch(launched, case):
    directory, ranks = launched
    zero, one = ranks[0][case[0]], ranks[1][case[0]]
    assert torch.equal(zero["coefficients"], one["coefficients"]) and zero["history"] == one["history"]
    assert all(torch.equal(zero["soup"][k], one["soup"][k]) for k in zero["soup"])
    reference = _run_case(directory, case, None)
    # Adam divides by √v: on a layer that no fine-tune changed (fc1.bias under BatchNorm) the exact gradient is 0
    # and rounding noise of 1e-9 becomes a step of ~lr; the soup does not depend on such a layer's weights
    _assert_close(zero, reference, 1e-3 if case[1].startswith("learned") else 1e-5)
    stats = zero["stats"]
    assert stats["world_size"] == 2 and stats["parallel"] == case[2] and stats["epochs"] == reference.stats["epochs"]
    if case[2] == "model":  # each rank holds its rows of a block (two blocks with prefetch) + the model being read
        b = case[4].get("model_batch_size", 5)
        own = (b + 1) // 2 * (2 if case[4].get("prefetch") else 1)
        assert max(stats["max_resident_models_per_rank"]) <= own + 1 and own < reference.stats["max_resident_models"]


def test_resume_in_a_process_group(launched):
    directory, ranks = launched
    assert ranks[0]["killed"] == ranks[1]["killed"] == "after the first block"  # rank 1 did not hang
    assert ranks[0]["refused"] == ranks[1]["refused"] == "ResumeError"
    zero, one = ranks[0]["resumed"], ranks[1]["resumed"]
    assert zero["stats"]["resumed_from_block"] == one["stats"]["resumed_from_block"] == 1
    assert torch.equal(zero["coefficients"], one["coefficients"])
    assert (directory / "run" / "result" / "result.json").exists()
    paths, held = _inputs(directory, "shuffled")
    _assert_close(zero, make_soup("mehl+", BNNet(), paths, held, **RESUME))


def test_command_line_on_a_zoo_under_torchrun_equals_one_process(launched, tmp_path):
    directory, _ = launched
    assert cli_main([*CLI, "--zoo", str(directory / "zoo"), "--out", str(tmp_path / "one")]) == 0
    one, two = soupkit.SoupResult.load(tmp_path / "one"), soupkit.SoupResult.load(directory / "cli")
    assert two.stats["world_size"] == 2 and "world_size" not in one.stats
    assert two.stats["command"][:2] == ["torchrun", "--nproc-per-node=2"]
    assert torch.allclose(two.coefficients, one.coefficients, atol=1e-5)
    assert two.history == pytest.approx(one.history, abs=1e-5)
    assert all(torch.allclose(two.state_dict[k], v, atol=1e-5) for k, v in one.state_dict.items())
    assert two.stats["test_accuracy"] == pytest.approx(one.stats["test_accuracy"], abs=1e-3)


def test_a_failing_rank_ends_the_launch(tmp_path):
    _write_inputs(tmp_path)
    start = time.monotonic()
    done = torchrun([__file__, str(tmp_path), str(tmp_path), "fail"], timeout=90)
    assert done.returncode != 0 and time.monotonic() - start < 60
    assert "DataError" in done.stdout + done.stderr


# ---- in one process ----------------------------------------------------------------------------------------
def test_shard_bounds_cover_every_row_once():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            parts = [shard_bounds(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1


@pytest.mark.parametrize("form", ["automatic", "index-lists"])
def test_sharded_stream_reads_own_rows_of_the_same_global_batches(form):
    x, y = torch.arange(23.0).unsqueeze(1), torch.arange(23)

    def loader() -> DataLoader:
        g = torch.Generator().manual_seed(1)
        if form == "automatic":
            return DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True, generator=g)
        sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(x, generator=g), 7, False)
        return DataLoader(TensorDataset(x, y), sampler=sampler, batch_size=None)

    whole = BatchStream(loader(), "cpu")
    parts = [BatchStream(loader(), "cpu", shard=(r, 2)) for r in range(2)]
    assert all(p._sizes == [7, 7, 7, 2] for p in parts)  # the DataLoader reads only the rank's rows
    for _ in range(9):  # more than two passes
        _, ys = whole.next()
        assert torch.equal(torch.cat([p.next()[1] for p in parts]), ys)
    assert parts[0].examples_seen == parts[1].examples_seen == whole.examples_seen
    assert parts[0].epochs == whole.epochs


def test_a_part_can_be_empty_and_other_loaders_are_sliced():
    x, y = make_data(n=10)
    one = [(x[:9], y[:9]), (x[9:], y[9:])]  # the 2nd batch has one row: rank 0 gets none
    assert shard_loader(one, 0, 2) is None
    parts = [BatchStream(one, "cpu", shard=(r, 3)) for r in range(3)]
    sizes = [[len(p.next()[1]) for _ in range(2)] for p in parts]
    assert sizes == [[3, 0], [3, 0], [3, 1]]
    dl = DataLoader(TensorDataset(x, y), batch_size=9)
    streams = [BatchStream(dl, "cpu", shard=(r, 2)) for r in range(2)]
    assert [len(s.next()[1]) for s in streams] == [4, 5] and [len(s.next()[1]) for s in streams] == [0, 1]
    xe, ye = streams[0].next()  # a new pass
    assert xe.shape == (4, 8)


def test_buckets_pack_small_tensors_and_leave_big_ones_alone():
    comm = Communicator("data", bucket_numel=10)
    sizes = [3, 4, 12, 2, 2, 5, 10, 1]
    groups = [[sizes[i] for i in g] for g in comm._buckets(range(len(sizes)), lambda i: sizes[i])]
    assert groups == [[3, 4], [12], [2, 2, 5], [10], [1]]


def test_communicator_alone_is_a_world_of_one():
    assert communicator(None) is None
    comm = communicator("model")
    assert (comm.rank, comm.world_size, comm.data_shard) == (0, 1, None) and comm.rows(5) == slice(0, 5)
    t = torch.ones(3)
    assert comm.all_reduce_mean_([t], 3, torch.tensor(2.0)).item() == 2.0 and torch.equal(t, torch.ones(3))
    assert on_main(comm, lambda: 7) == 7
    with pytest.raises(ValueError, match="parallel"):
        communicator("pipeline")
    assert Communicator("data", 1, 2).data_shard == (1, 2)


def test_learned_soup_refuses_model_parallel(bn_setup):
    base, states, loader = bn_setup
    with pytest.raises(ValueError, match="parallel='data'"):
        make_soup("learned", base, states, loader, parallel="model", **FAST)
    with pytest.raises(ValueError, match="parallel"):
        make_soup("hl", base, states, loader, parallel="tensor", **FAST)


def test_parallel_in_one_process_is_the_plain_run(bn_setup):
    base, states, loader = bn_setup
    plain = make_soup("mehl+", base, states, loader, model_batch_size=2, **FAST)
    for mode in ("data", "model"):
        alone = make_soup("mehl+", base, states, loader, model_batch_size=2, parallel=mode, **FAST)
        assert torch.equal(alone.coefficients, plain.coefficients) and alone.history == plain.history
        assert alone.stats["world_size"] == 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    _job(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
