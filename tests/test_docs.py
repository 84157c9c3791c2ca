"""The docs, the Makefile and the code name no file the repository lacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# repository folders whose files the docs point at (outputs such as runs/ or data/ are not checked)
REF = re.compile(r"(?<![\w./-])((?:docs|pipelines|benchmarks|tests|requirements|data_manifests|medwsol|\.ci|docker)"
                 r"/[A-Za-z0-9_./-]*[A-Za-z0-9_])")
# files that `prepare` or a user writes, named in the docs as outputs or as examples of the user's own
OUTPUTS = {"data_manifests/glas.csv", "data_manifests/glas_masks", "docker/.env", "docker/compose.override.yaml",
           "pipelines/my.yaml"}


def _sources() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "pipelines").glob("*.yaml")), *sorted((ROOT / ".ci").glob("*")),
             *sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "medwsol").rglob("*.py"))]
    files += [p for p in ROOT.glob("*/README.md") if not p.parent.name.startswith(".")]  # not .pytest_cache/
    return [f for f in files if f.is_file()]


def _refs(path: Path) -> set[str]:
    found = set()
    for m in REF.finditer(path.read_text(errors="replace")):
        ref = m.group(1).rstrip(".")
        if "*" in ref or "<" in ref or "..." in ref or re.search(r"/X\.", ref):  # patterns, placeholders
            continue
        found.add(ref)
    return found


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_repository_file_exists(path):
    missing = sorted(r for r in _refs(path) if r not in OUTPUTS and not (ROOT / r).exists())
    assert not missing, f"{path.relative_to(ROOT)} names {missing}, which the repository lacks"


def test_makefile_targets_run_existing_commands():
    text = (ROOT / "Makefile").read_text()
    for script in re.findall(r"(?:python|bash)\s+([\w./-]+\.(?:py|sh))", text):
        assert (ROOT / script).is_file(), f"Makefile runs {script}, which does not exist"
    assert "medwsol benchmark methods pipelines/demo.yaml" in text and "--seeds" in text
