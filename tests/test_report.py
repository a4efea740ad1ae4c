"""The result tables of README.md and docs/*.md are the ones the committed result files give."""
from pathlib import Path

from soupkit.experiments.report import BLOCKS, DOCUMENTS, main, update_documents, update_readme

ROOT = Path(__file__).resolve().parents[1]


def test_every_generated_block_is_in_a_document() -> None:
    text = "\n".join(p.read_text() for p in DOCUMENTS(ROOT))
    for name in BLOCKS:
        assert f"<!-- generated: {name} -->" in text and f"<!-- end: {name} -->" in text, name


def test_the_readme_holds_the_claims_and_their_summary() -> None:
    text = (ROOT / "README.md").read_text()
    assert "<!-- generated: claims -->" in text and "<!-- generated: verdicts -->" in text


def test_document_blocks_equal_the_rendered_files() -> None:
    assert update_documents(write=False, root=ROOT) == {}, \
        "generated tables differ from figures/ and data/: run `python -m soupkit.experiments.report --write`"


def test_the_report_reads_the_root_it_is_given_not_the_working_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # no repository here or above
    assert main(["--check", "--root", str(ROOT)]) == 0
    assert capsys.readouterr().out == "differ: none\n"
    readme = tmp_path / "README.md"
    readme.write_text("<!-- generated: numerics -->\nstale\n<!-- end: numerics -->\n")
    assert main(["--check"]) == 1  # the default root is the working folder: its README differs from its (no) data
    assert capsys.readouterr().out == "differ: README.md: numerics\n"


def test_a_changed_block_is_detected(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- generated: numerics -->\nstale\n<!-- end: numerics -->\n")
    assert update_readme(readme, write=False, root=ROOT) == ["numerics"]
    assert update_documents([readme], write=False, root=ROOT) == {str(readme): ["numerics"]}
    assert update_readme(readme, write=True, root=ROOT) == ["numerics"]
    assert update_readme(readme, write=False, root=ROOT) == []


def test_the_verdict_summary_names_every_claim_once(tmp_path: Path) -> None:
    (tmp_path / "claims.csv").write_text(
        "claim,verdict\nA beats B (points),reproduces\nC (released code) equals D (points),cannot tell at this scale\n"
        "E / F memory (ratio; > 1: F cheaper),no verdict (one measurement)\n"
        "G / H time (ratio; > 1: H cheaper),cannot tell at this scale\n")
    text = BLOCKS["verdicts"](tmp_path, tmp_path)
    assert text.splitlines() == ["- **reproduces** (1 of 4): A beats B.",
                                 "- **cannot tell at this scale** (2 of 4): C (released code) equals D; G / H time.",
                                 "- **no verdict (one measurement)** (1 of 4): E / F memory."]


def test_every_soupkit_name_the_documents_give_exists() -> None:
    """README, docs/, presets/ and the notebooks' text name modules and functions as ``soupkit.a.b``: each must
    import (a name left behind by a move of modules sends a reader nowhere)."""
    import importlib
    import json
    import re

    def resolves(name: str) -> bool:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for part in parts[i:]:
                    obj = getattr(obj, part)
            except AttributeError:
                return False
            return True
        return False

    texts = {str(p): p.read_text() for p in [ROOT / "README.md", ROOT / "benchmarks" / "README.md",
                                               *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "presets").glob("*"))]}
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        texts[str(nb)] = "\n".join("".join(c["source"]) for c in cells)
    pattern = re.compile(r"(?<![\w/.])(soupkit(?:\.\w+)+)")
    missing = sorted({(Path(f).name, name) for f, text in texts.items() for name in pattern.findall(text)
                      if not resolves(name.rstrip("."))})
    assert not missing, missing
