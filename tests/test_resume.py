"""A MEHL/HL run with ``run_dir`` survives SIGKILL: started again with the same command it resumes and ends with
the coefficients of an uninterrupted run; a run directory of another run is refused.

Run as a script (``python tests/test_resume.py POOL_DIR RUN_DIR OUT DELAY``) it is the job the SIGKILL test
kills: a small MEHL+ run over the pool's files, with a held-out loader slowed by DELAY seconds per batch.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import soupkit
from soupkit import make_soup
from soupkit.methods.run_dir import RunDir
from soupkit.errors import ResumeError
from conftest import BNNet, batches, finetunes, make_data

ROOT = Path(__file__).resolve().parents[1]
JOB = dict(model_batch_size=2, outer_iterations=6, inner_iterations=5, seed=3, progress=False)


class SlowBatches(list):
    """A list of batches that takes ``delay`` seconds per batch, so a kill lands mid-run."""

    def __init__(self, items, delay: float) -> None:
        super().__init__(items)
        self.delay = delay

    def __iter__(self):
        for batch in super().__iter__():
            time.sleep(self.delay)
            yield batch


def _heldout(delay: float = 0.0) -> list:
    x, y = make_data(n=120, seed=5)
    return SlowBatches(batches(x, y, size=40), delay)


def _pool_files(directory: Path) -> list[Path]:
    x, y = make_data()
    _, states = finetunes(BNNet, x, y, k=6)
    return [soupkit.save_state_dict(s, directory / f"m{i}.safetensors") for i, s in enumerate(states)]


def _state_meta(run_dir: Path) -> dict:
    with safe_open(str(run_dir / "state.safetensors"), framework="pt") as fh:
        return json.loads(fh.metadata()["soupkit_run_state"])


def _job(pool_dir: str, run_dir: str, out: str, delay: str) -> None:
    paths = sorted(Path(pool_dir).glob("m*.safetensors"))
    r = make_soup("mehl+", BNNet(), paths, _heldout(float(delay)), run_dir=run_dir, **JOB)
    soupkit.save_state_dict({"coefficients": r.coefficients, "history": torch.tensor(r.history, dtype=torch.float64)},
                            out, metadata={"resumed_from_block": str(r.stats["resumed_from_block"])})


def _start(pool_dir: Path, run_dir: Path, out: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, __file__, str(pool_dir), str(run_dir), str(out), str(delay)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigkill_mid_run_then_the_same_command_resumes_to_the_same_coefficients(tmp_path):
    _pool_files(tmp_path)
    run_dir, out = tmp_path / "run", tmp_path / "out.safetensors"
    job = _start(tmp_path, run_dir, out, delay=0.05)
    deadline = time.monotonic() + 60
    while not (run_dir / "state.safetensors").exists():  # the first outer iteration's checkpoint
        assert job.poll() is None, job.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 60 s"
        time.sleep(0.005)
    job.send_signal(signal.SIGKILL)
    assert job.wait(30) == -signal.SIGKILL and not out.exists()
    done = _state_meta(run_dir)["blocks_done"]
    assert 1 <= done < JOB["outer_iterations"]

    again = _start(tmp_path, run_dir, out, delay=0.0)
    assert again.wait(120) == 0, again.stdout.read().decode()
    resumed = soupkit.load_state_dict(out)
    with safe_open(str(out), framework="pt") as fh:
        assert int(fh.metadata()["resumed_from_block"]) >= done

    paths = sorted(tmp_path.glob("m*.safetensors"))
    reference = make_soup("mehl+", BNNet(), paths, _heldout(), **JOB)  # uninterrupted, no run_dir
    assert torch.equal(resumed["coefficients"], reference.coefficients)
    assert resumed["history"].tolist() == reference.history
    back = soupkit.SoupResult.load(run_dir / "result")  # make_soup also left the finished result there
    assert torch.equal(back.coefficients, reference.coefficients)


class Killed(Exception):
    pass


def _kill_after_saves(monkeypatch, n: int) -> None:
    """Make the run die right after its n-th checkpoint, as a kill between two blocks would."""
    save, count = RunDir.save, [0]

    def save_then_die(self, *args, **kwargs):
        path = save(self, *args, **kwargs)
        count[0] += 1
        if count[0] == n:
            raise Killed
        return path

    monkeypatch.setattr(RunDir, "save", save_then_die)


@pytest.mark.parametrize("name, options", [
    ("mehl+", dict(model_batch_size=2, outer_iterations=4)),
    ("mehl", dict(model_batch_size=2, outer_iterations=4, recenter=True, normalize_directions=True,
                  batch_size=30)),  # re-batched: blocks end mid-pass
    ("mehl", dict(model_batch_size=3, outer_iterations=3, decentralize=False, prefetch=True)),
])
def test_resume_with_a_shuffling_loader_matches_an_uninterrupted_run(bn_setup, tmp_path, monkeypatch, name, options):
    base, states, _ = bn_setup
    x, y = make_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=48, shuffle=True)
    options = dict(options, inner_iterations=3, progress=False)  # 3 steps of a 4-batch pass: mid-pass ends
    reference = make_soup(name, base, states, loader, **options)
    with monkeypatch.context() as patch:
        _kill_after_saves(patch, 2)
        with pytest.raises(Killed):
            make_soup(name, base, states, loader, run_dir=tmp_path, **options)
    assert not (tmp_path / "result").exists()
    resumed = make_soup(name, base, states, loader, run_dir=tmp_path, **options)
    assert resumed.stats["resumed_from_block"] == 2
    assert torch.equal(resumed.coefficients, reference.coefficients)
    assert resumed.history == reference.history
    assert all(torch.equal(resumed.state_dict[k], reference.state_dict[k]) for k in reference.state_dict)
    assert resumed.stats["epochs"] == pytest.approx(reference.stats["epochs"])


def test_a_finished_run_is_rebuilt_without_training(bn_setup, tmp_path):
    base, states, loader = bn_setup
    first = make_soup("hl", base, states, loader, run_dir=tmp_path, inner_iterations=4, progress=False)
    again = make_soup("hl", base, states, loader, run_dir=tmp_path, inner_iterations=4, progress=False)
    assert again.stats["resumed_from_block"] == 1 == first.stats["outer_iterations"]
    assert torch.equal(again.coefficients, first.coefficients) and again.history == first.history


def _snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name != ".lock"}


def test_a_run_dir_of_another_configuration_is_refused_untouched(bn_setup, tmp_path, monkeypatch):
    base, states, loader = bn_setup
    options = dict(model_batch_size=2, inner_iterations=3, progress=False)
    with monkeypatch.context() as patch:
        _kill_after_saves(patch, 1)
        with pytest.raises(Killed):
            make_soup("mehl+", base, states, loader, run_dir=tmp_path, **options)
    before = _snapshot(tmp_path)
    with pytest.raises(ResumeError, match=r"different settings.*options\.lr: 0\.01 then, 0\.02 now"):
        make_soup("mehl+", base, states, loader, run_dir=tmp_path, **{**options, "lr": 0.02})
    with pytest.raises(ResumeError, match=r"method: \"mehl\+\" then, \"mehl\" now"):
        make_soup("mehl", base, states, loader, run_dir=tmp_path, **options)
    with pytest.raises(ResumeError, match=r"models"):
        make_soup("mehl+", base, states[:4], loader, run_dir=tmp_path, **options)
    with pytest.raises(ResumeError, match=r"heldout\.examples"):
        make_soup("mehl+", base, states, loader[:2], run_dir=tmp_path, **options)
    assert _snapshot(tmp_path) == before
    # free options (progress, prefetch) may change: the run resumes
    make_soup("mehl+", base, states, loader, run_dir=tmp_path, **{**options, "prefetch": True})


def test_a_replaced_checkpoint_of_the_same_size_is_refused(bn_setup, tmp_path, monkeypatch):
    base, states, loader = bn_setup
    paths = [soupkit.save_state_dict(s, tmp_path / f"m{i}.safetensors") for i, s in enumerate(states)]
    options = dict(model_batch_size=2, inner_iterations=3, progress=False, run_dir=tmp_path / "run")
    with monkeypatch.context() as patch:
        _kill_after_saves(patch, 1)
        with pytest.raises(Killed):
            make_soup("mehl", base, paths, loader, **options)
    soupkit.save_state_dict(states[4], paths[2])  # another fine-tune, same name and size
    with pytest.raises(ResumeError, match=r"m2\.safetensors: its weights are not those of the run"):
        make_soup("mehl", base, paths, loader, **options)


def test_one_process_per_run_dir_and_stale_temp_files_are_removed(tmp_path):
    (tmp_path / ".state.safetensors.tmp12345").write_bytes(b"half a file")
    with RunDir(tmp_path, {"format": 1}):
        assert not (tmp_path / ".state.safetensors.tmp12345").exists()
        with pytest.raises(ResumeError, match="another process"):
            RunDir(tmp_path, {"format": 1})
    with RunDir(tmp_path, {"format": 1}):  # released on exit
        pass


def test_other_methods_ignore_run_dir_with_a_warning(bn_setup, tmp_path):
    base, states, loader = bn_setup
    with pytest.warns(UserWarning, match="run_dir is used by HL/MEHL only"):
        make_soup("greedy", base, states, loader, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


if __name__ == "__main__":
    _job(*sys.argv[1:])


def test_resume_with_a_private_generator_loader_made_anew(bn_setup, tmp_path, monkeypatch):
    # a restarted process builds its loader again from its seed: the sampler's own generator restarts too,
    # so the run must put it back where it was (here past the first pass over the held-out data)
    from soupkit.engine.batches import make_loader

    base, states, _ = bn_setup
    x, y = make_data()
    fresh = lambda: make_loader((x, y), 48, shuffle=True, seed=3)  # noqa: E731
    options = dict(model_batch_size=2, outer_iterations=5, inner_iterations=3, progress=False)
    reference = make_soup("mehl+", base, states, fresh(), **options)
    with monkeypatch.context() as patch:
        _kill_after_saves(patch, 3)  # 9 steps of a 4-batch pass: in the third pass
        with pytest.raises(Killed):
            make_soup("mehl+", base, states, fresh(), run_dir=tmp_path, **options)
    resumed = make_soup("mehl+", base, states, fresh(), run_dir=tmp_path, **options)
    assert resumed.stats["resumed_from_block"] == 3
    assert resumed.history == reference.history
    assert torch.equal(resumed.coefficients, reference.coefficients)
