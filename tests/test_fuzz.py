"""Fuzzing the checkpoint reader and the pool's validation: random keys, shapes, dtypes and values, and real
files with corrupted bytes, either load correctly or raise CheckpointError; nothing else escapes.

``SOUPKIT_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py`` runs a longer, randomised campaign.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import soupkit
from soupkit import CheckpointError, CheckpointPool
from conftest import save_files

EXAMPLES = int(os.environ.get("SOUPKIT_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="SOUPKIT_FUZZ_EXAMPLES" not in os.environ,  # the suite: same examples every run
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KEYS = st.sampled_from(["w", "fc.weight", "fc.bias", "bn.running_mean", "bn.num_batches_tracked"])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn,
                          torch.float8_e5m2, torch.int64, torch.uint8, torch.bool])
SHAPES = st.lists(st.integers(0, 3), max_size=3).map(tuple)
FORMATS = st.sampled_from(["safetensors", "pt", "dict"])


@st.composite
def tensors(draw) -> torch.Tensor:
    shape, dtype = draw(SHAPES), draw(DTYPES)
    t = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    t = t * draw(st.sampled_from([1.0, 1e3, 1e30]))
    if t.numel() and draw(st.booleans()):
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"), 0.0]))
    return t.to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)


@st.composite
def state_dicts(draw) -> dict[str, torch.Tensor]:
    keys = draw(st.lists(KEYS, min_size=1, max_size=4, unique=True))
    return {k: draw(tensors()) for k in keys}


def _write(states: list[dict], fmt: str, directory: Path) -> list:
    if fmt == "dict":
        return states
    return save_files(states, directory, fmt)


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() and t.dtype.itemsize == 1 else t  # float8 has no isfinite/equal


def _usable(states: list[dict], cast: torch.dtype | None) -> bool:
    """What the pool must accept: one layout (dtypes may differ between floats with a cast), finite values."""
    ref = states[0]
    for s in states:
        if s.keys() != ref.keys() or any(s[k].shape != ref[k].shape for k in ref):
            return False
        for k in ref:
            same = s[k].dtype == ref[k].dtype
            if not same and not (cast is not None and s[k].is_floating_point() and ref[k].is_floating_point()):
                return False
    return all(torch.isfinite(_wide(t.to(cast or t.dtype))).all()
               for s in states for t in s.values() if t.is_floating_point())


@FUZZ
@given(states=st.lists(state_dicts(), min_size=1, max_size=3), fmt=FORMATS,
       cast=st.sampled_from([None, torch.float32]))
def test_random_pools_load_exactly_or_raise_checkpoint_error(states, fmt, cast):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            pool = CheckpointPool(_write(states, fmt, Path(tmp)), cast_dtype=cast)
            loaded = [pool.load(i) for i in range(len(pool))]
            pool.center()
        except CheckpointError:
            assert not _usable(states, cast)
            return
        assert _usable(states, cast)
        for state, back in zip(states, loaded):
            assert back.keys() == state.keys()
            for k, t in state.items():
                assert back[k].dtype == (cast if cast is not None and t.is_floating_point() else t.dtype)
                assert torch.equal(_wide(back[k]), _wide(t.to(back[k].dtype)))


def _mutate(data: bytes, edits: list[tuple[str, float, bytes]]) -> bytes:
    out = bytearray(data)
    for op, where, junk in edits:
        at = int(where * len(out)) if where >= 0 else int(-where * min(len(out), 256))  # < 0: in the header
        if op == "overwrite":
            out[at:at + len(junk)] = junk
        elif op == "insert":
            out[at:at] = junk
        elif op == "delete":
            del out[at:at + len(junk)]
        else:
            del out[at:]
    return bytes(out)


EDITS = st.lists(st.tuples(st.sampled_from(["overwrite", "insert", "delete", "truncate"]),
                           st.floats(-1.0, 1.0, allow_nan=False), st.binary(min_size=1, max_size=16)),
                 min_size=1, max_size=3)


@FUZZ
@given(fmt=st.sampled_from(["safetensors", "pt"]), edits=EDITS)
def test_corrupted_files_load_or_raise_checkpoint_error(fmt, edits):
    g = torch.Generator().manual_seed(0)
    state = {"fc1.weight": torch.randn(16, 8, generator=g), "fc1.bias": torch.randn(16, generator=g),
             "bn.num_batches_tracked": torch.tensor(7), "head": torch.randn(3, 16, generator=g).half()}
    with tempfile.TemporaryDirectory() as tmp:
        good, bad = _write([state, state], fmt, Path(tmp))
        bad.write_bytes(_mutate(bad.read_bytes(), edits))
        try:
            back = soupkit.load_state_dict(bad)
        except CheckpointError as err:
            assert bad.name in str(err)
        else:
            assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in back.items())
        try:
            pool = CheckpointPool([good, bad])
            centre = pool.center()
        except CheckpointError as err:
            assert bad.name in str(err)
        else:  # it passed every check: then it is a usable model of the same layout
            assert centre.keys() == state.keys()
            assert all(torch.isfinite(v).all() for v in centre.values() if v.is_floating_point())


@FUZZ
@given(value=st.one_of(st.integers(), st.text(max_size=5), st.none(), st.lists(st.integers(), max_size=3),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
       fmt=st.sampled_from(["pt", "dict"]))
def test_entries_that_are_not_tensors_are_refused(value, fmt):
    state = {"w": torch.zeros(2), "extra": value}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            CheckpointPool(_write([state], fmt, Path(tmp)))
        except CheckpointError as err:
            assert "'extra' is a" in str(err)
        else:
            raise AssertionError("a non-tensor entry was accepted")
