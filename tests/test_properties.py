"""Property-based tests (hypothesis): whatever document a user writes, the config loader and the
manifest reader answer with a validated result or one line naming the file, never anything else."""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from medwsol.config import PipelineConfig, apply_overrides, load_config, parse_config  # noqa: E402
from medwsol.errors import ConfigError, ManifestError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "pipelines/demo.yaml").read_text())
# MEDWSOL_HYPOTHESIS_EXAMPLES=5000 for a long hunt; the suite's default keeps it to seconds
SETTINGS = settings(max_examples=int(os.environ.get("MEDWSOL_HYPOTHESIS_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow], derandomize=True)
_counter = itertools.count()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("props")


def _one_line(err: Exception, source: str) -> None:
    msg = str(err)
    assert "\n" not in msg and msg.strip(), repr(msg)
    assert msg.startswith(source) or msg.startswith("--set"), msg[:200]


def _load(path: Path):
    try:
        cfg = load_config(path, check=False)
    except ConfigError as err:
        _one_line(err, str(path))
        return None
    assert isinstance(cfg, PipelineConfig)
    # a config that validates survives its own dump (what a run folder stores) unchanged
    again = parse_config(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))), "dump")
    assert again.model_dump(mode="json") == cfg.model_dump(mode="json")
    return cfg


# ------------------------------------------------------------------------------------------ config

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
schema_keys = sorted({k for sec in DEMO.values() if isinstance(sec, dict) for k in sec} | set(DEMO)
                     | {"data", "model", "train", "evaluate", "slides", "export", "tracking", "params", "tiles"})
keys = st.one_of(st.sampled_from(schema_keys), st.text(max_size=8), st.integers(-3, 3))
documents = st.recursive(scalars, lambda ch: st.one_of(st.lists(ch, max_size=4),
                                                       st.dictionaries(keys, ch, max_size=5)), max_leaves=25)


def _paths(d, prefix=()):
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, (*prefix, k))


@SETTINGS
@given(st.binary(max_size=400))
@example(b"name: caf\xe9\n")  # Latin-1
@example(b"\xff\xfen\x00a\x00")  # UTF-16
def test_any_bytes_are_a_config_or_one_line(workdir, raw):
    p = workdir / f"b{next(_counter)}.yaml"
    p.write_bytes(raw)
    _load(p)


@SETTINGS
@given(st.text(max_size=300))
@example("\x1f")  # a control character
@example("a: &a [1]\nb: [*a, *a]\na: 2\n")  # aliases and a duplicate key
@example("[" * 200 + "]" * 200)  # deep nesting
def test_any_text_is_a_config_or_one_line(workdir, text):
    p = workdir / f"t{next(_counter)}.yaml"
    p.write_text(text, encoding="utf-8")
    _load(p)


@SETTINGS
@given(documents)
@example({"model": {"method": []}})  # an unhashable method name
@example({"name": "x", "model": {"params": {1: 2}}})
@example({"name": "x", "train": {"lr": float("inf")}})
def test_any_yaml_document_is_a_config_or_one_line(workdir, doc):
    p = workdir / f"d{next(_counter)}.yaml"
    p.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _load(p)


@SETTINGS
@given(st.data())
def test_mutated_pipelines_are_a_config_or_one_line(workdir, data):
    """The demo pipeline with random values put at random places (the likely mistakes)."""
    doc = copy.deepcopy(DEMO)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        path = data.draw(st.sampled_from(paths))
        node = doc
        for k in path[:-1]:
            node = node[k]
        if data.draw(st.booleans()):
            node[path[-1]] = data.draw(documents)
        else:
            node[data.draw(keys)] = data.draw(scalars)
    p = workdir / f"m{next(_counter)}.yaml"
    p.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _load(p)


@SETTINGS
@given(st.lists(st.text(max_size=30), max_size=4))
def test_any_set_overrides_are_applied_or_one_line(overrides):
    try:
        data = apply_overrides(copy.deepcopy(DEMO), overrides)
    except ConfigError as err:
        _one_line(err, "--set")
        return
    try:
        parse_config(data, "demo.yaml")
    except ConfigError as err:
        _one_line(err, "demo.yaml")


# ---------------------------------------------------------------------------------------- manifest

CLASSES = ["benign", "malignant"]
COLUMNS = ["image", "mask", "label", "split", "group", "valpx", "extra", "", "image "]


@pytest.fixture(scope="module")
def images(workdir):
    import numpy as np
    from PIL import Image

    folder = workdir / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a_mask.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "small_mask.png")
    (folder / "text.png").write_text("not an image")
    return folder


cells = st.one_of(
    st.sampled_from(["imgs/a.png", "imgs/a_mask.png", "imgs/small_mask.png", "imgs/text.png", "imgs/none.png",
                     "imgs", "/", "../x.png", "a.txt", "benign", "malignant", "train", "valid", "test", "0", "1",
                     "yes", "", " ", "x" * 300 + ".png", "imgs/a.png\x00", "\"", ",", "\u00e9.png"]),
    st.text(max_size=10),
)


def _read(path: Path):
    from medwsol.data.manifest import load_manifest

    for require_split in (True, False):
        try:
            df = load_manifest(path, CLASSES, require_split=require_split)
        except ManifestError as err:
            _one_line(err, str(path))
            continue
        assert {"image_path", "mask_path", "label_idx", "valpx"} <= set(df.columns)
        assert df["label_idx"].between(0, len(CLASSES) - 1).all()


@SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_are_a_manifest_or_one_line(workdir, images, raw):
    p = workdir / f"r{next(_counter)}.csv"
    p.write_bytes(raw)
    _read(p)


@SETTINGS
@given(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=7), st.lists(st.lists(cells, max_size=8), max_size=5))
@example(["image", "image "], [["imgs/a.png"]])  # a column twice
@example(["image", "mask", "label", "split", "group"], [["imgs/a.png\x00", "", "benign", "train", ""]])
@example(["image", "mask", "label", "split", "group"], [["x" * 300 + ".png", "", "benign", "train", ""]])
def test_any_table_is_a_manifest_or_one_line(workdir, images, header, rows):
    import csv

    p = workdir / f"c{next(_counter)}.csv"
    with open(p, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    _read(p)


@SETTINGS
@given(st.text(alphabet=st.sampled_from(list("image,mask,label,split,group\n\"\r 01abtv./")), max_size=200))
def test_any_csv_text_is_a_manifest_or_one_line(workdir, images, text):
    p = workdir / f"x{next(_counter)}.csv"
    p.write_text(text, encoding="utf-8")
    _read(p)
