"""The README's result tables are the ones the committed result files give."""
from pathlib import Path

from soupkit.report import BLOCKS, update_readme

ROOT = Path(__file__).resolve().parents[1]


def test_readme_has_every_generated_block() -> None:
    text = (ROOT / "README.md").read_text()
    for name in BLOCKS:
        assert f"<!-- generated: {name} -->" in text and f"<!-- end: {name} -->" in text, name


def test_readme_blocks_equal_the_rendered_files() -> None:
    assert update_readme(ROOT / "README.md", write=False) == [], \
        "README.md's generated tables differ from figures/ and data/: run `python -m soupkit.report --write`"


def test_a_changed_block_is_detected(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- generated: numerics -->\nstale\n<!-- end: numerics -->\n")
    assert update_readme(readme, write=False) == ["numerics"]
    assert update_readme(readme, write=True) == ["numerics"]
    assert update_readme(readme, write=False) == []
