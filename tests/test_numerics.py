"""The pinned CPU numerics: set before torch loads, respected when the user set them, off on request."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from soupkit.runtime.numerics import PINS

ROOT = Path(__file__).resolve().parents[1]
_PROBE = ("import json, os, soupkit, torch; from soupkit.runtime.numerics import numerics_info; "
          "print(json.dumps({**numerics_info(), **{k: os.environ.get(k) for k in %r}}))" % list(PINS))


def _run(**env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in PINS and k != "SOUPKIT_NUMERICS"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**base, **env}, capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_pins_the_kernels() -> None:
    info = _run()
    assert info["cpu_capability"] == "DEFAULT"
    assert info["numerics"] == "pinned"
    assert all(info[k] == v for k, v in PINS.items())


def test_native_leaves_the_environment_alone() -> None:
    info = _run(SOUPKIT_NUMERICS="native")
    assert info["numerics"] == "native"
    assert all(info[k] is None for k in PINS)


def test_a_variable_the_user_set_is_respected() -> None:
    info = _run(MKL_CBWR="AUTO")
    assert info["MKL_CBWR"] == "AUTO" and info["numerics"] == "native"


@pytest.mark.skipif(sys.platform != "linux", reason="bytes compared on one Linux machine")
def test_pinned_training_bytes_ignore_what_stands_for_another_processor() -> None:
    """A few training steps give one hash whatever MKL may use here (benchmarks/numerics.py does more)."""
    code = ("import sys; sys.argv = ['x']; sys.path.insert(0, 'benchmarks'); import json, numerics; "
            "print(json.dumps(numerics.probe(3)))")
    base = {k: v for k, v in os.environ.items() if k not in PINS and k != "SOUPKIT_NUMERICS"}
    hashes = set()
    for extra in ({}, {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}):
        out = subprocess.run([sys.executable, "-c", code], env={**base, **extra}, capture_output=True, text=True,
                             check=True, cwd=ROOT)
        hashes.add(json.loads(out.stdout.strip().splitlines()[-1])["sha256"])
    assert len(hashes) == 1
