"""Output files take the process's umask, like any file ``open()`` creates (issue: soups were written 0600)."""
from __future__ import annotations

import hashlib
import json
import os
import stat

import numpy as np

import pytest
import torch

import soupkit
from soupkit.io import apply_umask, atomic_write_text, default_file_mode, sha256_arrays
from soupkit.zoo.embedded_data import data_fingerprint, load_animal_mnist, split_path
from soupkit.zoo.files import atomic_save


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_default_file_mode_follows_umask(umask):
    assert default_file_mode() == 0o666 & ~umask


def test_soup_files_have_the_same_mode_as_result_json(tmp_path, umask):
    result = soupkit.SoupResult("uniform", {"w": torch.ones(3)}, torch.full((2,), 0.5))
    out = result.save(tmp_path / "soup")
    modes = {p.name: _mode(p) for p in out.iterdir()}
    assert set(modes) == {"soup.safetensors", "coefficients.safetensors", "result.json"}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_zoo_checkpoints_follow_umask(tmp_path, umask):
    atomic_save({"w": torch.zeros(2)}, tmp_path / "m.safetensors", {"i": 0})
    assert _mode(tmp_path / "m.safetensors") == 0o666 & ~umask


def test_apply_umask_widens_a_private_file(tmp_path, umask):
    p = atomic_write_text(tmp_path / "a.txt", "x")
    os.chmod(p, 0o600)
    assert _mode(apply_umask(p)) == 0o666 & ~umask


def test_sha256_arrays_hashes_the_c_order_bytes_one_after_the_other():
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([3, 1], dtype=np.int64)
    assert sha256_arrays(images, labels) == hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    assert sha256_arrays(images.transpose(2, 0, 1)) == hashlib.sha256(images.transpose(2, 0, 1).tobytes()).hexdigest()
    assert sha256_arrays(images) != sha256_arrays(images.transpose(2, 0, 1))


def test_the_embedded_data_fingerprint_is_the_one_in_the_committed_split_file():
    assert data_fingerprint(*load_animal_mnist()) == json.loads(split_path().read_text())["data_sha256"]
