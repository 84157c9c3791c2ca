"""The bad-input corpus (issue 14): every command, every kind of mistake, one clean line.

Each case runs the CLI in-process (Typer's CliRunner) in one shared sandbox and asserts the error
contract of docs/errors.md: the expected exit code, exactly one ``error:`` line that names the file
or key, no traceback, no new file outside the case's intended output, and no run folder left
behind. Signals need a real process: tests/test_processes.py.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml
from typer.testing import CliRunner

from medwsol.cli import app

ROOT = Path(__file__).resolve().parents[1]
FINISHED = "runs/demo/20260101-000000"  # a run folder with a finished training (made by hand)
NO_LAST = "runs/demo/20260101-000001"  # a run folder whose training has no last.pt


@dataclass
class Case:
    id: str
    args: list[str]
    names: str  # the message must contain this (the file or key)
    code: int = 2
    files: dict[str, bytes | str] = field(default_factory=dict)  # inputs written before the run
    setup: Callable[[Path], None] | None = None
    outputs: tuple[str, ...] = ()  # paths (prefixes) the command may create
    check: Callable[[Path], None] | None = None  # more to assert afterwards (e.g. the other slides finished)


def _tiny_sets(*extra: str) -> list[str]:
    out = []
    for s in ["data.synthetic.n_images=12", "data.synthetic.size=64", "data.patch_size=64", "data.batch_size=4",
              "train.epochs=1", "model.method=cam", "train.threads=1", *extra]:
        out += ["--set", s]
    return out


T = _tiny_sets()
OFF = _tiny_sets("tracking.enabled=false")
MAN = _tiny_sets("tracking.enabled=false", "data.source=manifest", "data.manifest=m/manifest.csv")
HEADER = "image,mask,label,split,group\n"
BOMB = "name: x\na: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
WIDE = "name: x\nbig: &big [" + ",".join(["1"] * 400) + "]\nrefs: [" + ",".join(["*big"] * 60) + "]\n"
PS = ["prepare", "slides", "--slides", "c/slides.csv", "--annotations", "c/ann", "--config", "slides.yaml",
      "--out", "c/tiles"]
# slides.runtime=torch: the corpus is about inputs; an ONNX runtime would cache graphs inside pkg/
IN = ["infer", "cohort/slides/s0.tif", "--set", "slides.num_workers=0", "--set", "slides.runtime=torch", "--model", "pkg",
      "--out", "io"]
SLIDES_RUN = "runs/demo/20260101-000002"  # a run folder with a finished inference (s0), made by the fixture


def _truncated_png(sb: Path) -> None:
    data = (sb / "data" / "manifest.csv").read_text().splitlines()
    first = data[1].split(",")[0]
    (sb / "t").mkdir(exist_ok=True)
    shutil.copytree(sb / "data" / "images", sb / "t" / "images", dirs_exist_ok=True)
    shutil.copytree(sb / "data" / "masks", sb / "t" / "masks", dirs_exist_ok=True)
    b = (sb / "data" / first).read_bytes()
    (sb / "t" / first).write_bytes(b[: len(b) // 2])
    (sb / "t" / "manifest.csv").write_text("\n".join(data) + "\n")


def _torch_save(obj_code: str, name: str) -> Callable[[Path], None]:
    def make(sb: Path) -> None:
        import torch

        torch.save(eval(obj_code, {"torch": torch}), sb / name)  # noqa: S307 - test-made literal

    return make


def _cohort_with(mutate: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(sb: Path) -> None:
        if (sb / "c").exists():
            shutil.rmtree(sb / "c")
        shutil.copytree(sb / "cohort", sb / "c")
        mutate(sb / "c")

    return make


def _package_with(sb: Path, edit, package_json: bytes | None = None, weights: bytes | None | str = "keep") -> None:
    """``pk/``: a copy of the sandbox's package with package.json edited (digest kept) or its weights changed."""
    if (sb / "pk").exists():
        shutil.rmtree(sb / "pk")
    shutil.copytree(sb / "pkg", sb / "pk")
    meta_path = sb / "pk" / "package.json"
    if edit is not None:
        meta = json.loads(meta_path.read_text())
        edit(meta)
        meta_path.write_text(json.dumps(meta))
    if package_json is not None:
        meta_path.write_bytes(package_json)
    if weights != "keep":
        (wfile,) = [f for f in (sb / "pk").iterdir() if f.name != "package.json"]
        if weights is None:
            wfile.unlink()
        else:
            wfile.write_bytes(weights)


def _good_slide_done(sb: Path) -> None:
    import pandas as pd

    table = pd.read_csv(sb / "io" / "slides.csv", keep_default_na=False)
    ok = table[table.status == "ok"]
    assert len(ok) == 1 and Path(ok.slide.iloc[0]).name == "s0.tif", table.to_string()
    assert (table.status == "failed").sum() == 1 and table[table.status == "failed"].error.iloc[0]


def _failed_with(sb: Path, text: str) -> None:
    import pandas as pd

    table = pd.read_csv(sb / "io" / "slides.csv", keep_default_na=False)
    assert (table.status == "failed").all() and text in table.error.iloc[0], table.to_string()


def _export_failed_with(sb: Path, text: str) -> None:
    import pandas as pd

    table = pd.read_csv(sb / SLIDES_RUN / "slides" / "exports.csv", keep_default_na=False)
    assert table.status.tolist() == ["failed"] and text in table.error.iloc[0], table.to_string()
    (sb / SLIDES_RUN / "slides" / "exports.csv").unlink()


CASES = [
    # ---------------------------------------------------------------- config files and --set (validate)
    Case("cfg-missing", ["validate", "nope.yaml"], "nope.yaml"),
    Case("cfg-folder", ["validate", "data"], "data"),
    Case("cfg-empty", ["validate", "e.yaml"], "name", files={"e.yaml": ""}),
    Case("cfg-list", ["validate", "l.yaml"], "l.yaml", files={"l.yaml": "- a\n- b\n"}),
    Case("cfg-syntax", ["validate", "s.yaml"], "line 3", files={"s.yaml": "name: x\ntrain: [1,\n"}),
    Case("cfg-tab", ["validate", "s.yaml"], "s.yaml", files={"s.yaml": "name: x\ntrain:\n\tepochs: 2\n"}),
    Case("cfg-latin1", ["validate", "s.yaml"], "UTF-8", files={"s.yaml": "name: caf\xe9\n".encode("latin-1")}),
    Case("cfg-utf16", ["validate", "s.yaml"], "s.yaml", files={"s.yaml": "name: x\n".encode("utf-16")}),
    Case("cfg-binary", ["validate", "s.yaml"], "s.yaml", files={"s.yaml": bytes(range(256)) * 4}),
    Case("cfg-nul", ["validate", "s.yaml"], "s.yaml", files={"s.yaml": "name: x\x00\n"}),
    Case("cfg-dup-key", ["validate", "d.yaml"], "train.epochs",
         files={"d.yaml": "name: a\ntrain:\n  epochs: 2\n  epochs: 3\n"}),
    Case("cfg-dup-section", ["validate", "d.yaml"], "duplicate key train",
         files={"d.yaml": "name: a\ntrain: {}\ntrain: {epochs: 1}\n"}),
    Case("cfg-alias-bomb", ["validate", "b.yaml"], "b.yaml", files={"b.yaml": BOMB}),
    Case("cfg-alias-wide", ["validate", "b.yaml"], "expands", files={"b.yaml": WIDE}),
    Case("cfg-deep", ["validate", "b.yaml"], "nested", files={"b.yaml": "name: x\nz: " + "[" * 3000 + "]" * 3000}),
    Case("cfg-python-tag", ["validate", "b.yaml"], "b.yaml",
         files={"b.yaml": "name: !!python/object/apply:os.system [ls]\n"}),
    Case("cfg-two-docs", ["validate", "b.yaml"], "b.yaml", files={"b.yaml": "name: a\n---\nname: b\n"}),
    Case("cfg-huge", ["validate", "b.yaml"], "MB", files={"b.yaml": "name: x\n#" + "x" * 1_100_000 + "\n"}),
    Case("cfg-section-scalar", ["validate", "b.yaml"], "train", files={"b.yaml": "name: x\ntrain: 5\n"}),
    Case("set-unknown-key", ["validate", "p.yaml", "--set", "train.lrr=1"], "train.lrr"),
    Case("set-bad-type", ["validate", "p.yaml", "--set", "train.epochs=abc"], "train.epochs"),
    Case("set-inf", ["validate", "p.yaml", "--set", "train.lr=.inf"], "train.lr"),
    Case("set-nan", ["validate", "p.yaml", "--set", "train.lr=.nan"], "train.lr"),
    Case("set-no-equals", ["validate", "p.yaml", "--set", "train.epochs"], "train.epochs"),
    Case("set-empty-key", ["validate", "p.yaml", "--set", "=3"], "--set"),
    Case("set-double-dot", ["validate", "p.yaml", "--set", "train..epochs=3"], "train..epochs"),
    Case("set-not-a-section", ["validate", "p.yaml", "--set", "name.x=1"], "name"),
    Case("set-method", ["validate", "p.yaml", "--set", "model.method=gradcamm"], "model.method"),
    Case("set-backbone", ["validate", "p.yaml", "--set", "model.backbone=vgg"], "model.backbone"),
    Case("set-stage", ["validate", "p.yaml", "--set", "stages=[train,deploy]"], "stages"),
    Case("set-name", ["validate", "p.yaml", "--set", "name=../x"], "name"),
    Case("set-classes-dup", ["validate", "p.yaml", "--set", "data.classes=[a,a]"], "data.classes"),
    Case("set-params-scalar", ["validate", "p.yaml", "--set", "model.params=5"], "model.params"),
    Case("set-positive-class", ["validate", "p.yaml", "--set", "slides.positive_class=zzz"], "slides.positive_class"),
    Case("set-pretrained-missing", ["validate", "p.yaml", "--set", "model.pretrained=w.pth"], "model.pretrained"),
    Case("set-run-root-under-file", ["validate", "p.yaml", "--set", "run_root=p.yaml/runs"], "run_root"),
    Case("set-cache-no-dir", ["validate", "p.yaml", "--set", "data.cache=persistent"], "data.cache_dir"),
    Case("set-out-dir-under-file", ["validate", "p.yaml", "--set", "stages=[infer]", "--set",
                                    "slides.out_dir=p.yaml/x"], "slides.out_dir"),
    # ---------------------------------------------------------------- run / train / evaluate / prepare pipeline
    Case("run-run-root-file", ["run", "p.yaml", *T, "--set", "run_root=p.yaml"], "run_root"),
    Case("train-manifest-missing", ["train", "p.yaml", *T, "--set", "data.manifest=none.csv"], "data.manifest"),
    Case("train-manifest-empty", ["train", "p.yaml", *MAN], "m/manifest.csv", files={"m/manifest.csv": ""}),
    Case("train-manifest-latin1", ["train", "p.yaml", *MAN], "UTF-8",
         files={"m/manifest.csv": (HEADER + "caf\xe9.png,,benign,train,\n").encode("latin-1")}),
    Case("train-manifest-nul", ["train", "p.yaml", *MAN], "m/manifest.csv", files={"m/manifest.csv": HEADER + "\x00\n"}),
    Case("train-manifest-columns", ["train", "p.yaml", *MAN], "missing column", files={"m/manifest.csv": "a,b\n1,2\n"}),
    Case("train-manifest-dup-columns", ["train", "p.yaml", *MAN], "repeated",
         files={"m/manifest.csv": "image,image,mask,label,split,group\n"}),
    Case("train-manifest-label", ["train", "p.yaml", *MAN], "'cat'",
         files={"m/manifest.csv": HEADER + "../data/images/PLACEHOLDER,,cat,train,\n"}),
    Case("train-manifest-image-missing", ["train", "p.yaml", *MAN], "nope.png",
         files={"m/manifest.csv": HEADER + "nope.png,,benign,train,\n"}),
    Case("train-manifest-long-path", ["train", "p.yaml", *MAN], "m/manifest.csv",
         files={"m/manifest.csv": HEADER + "x" * 5000 + ".png,,benign,train,\n"}),
    Case("train-image-truncated", ["train", "p.yaml", *_tiny_sets("tracking.enabled=false", "data.source=manifest",
                                                                  "data.manifest=t/manifest.csv")],
         "cannot decode", setup=_truncated_png),
    Case("train-pretrained-text", ["train", "p.yaml", *OFF, "--set", "model.pretrained=p.yaml"], "p.yaml"),
    Case("train-pretrained-foreign", ["train", "p.yaml", *OFF, "--set", "model.pretrained=w.pth"], "w.pth",
         setup=_torch_save("{'x': torch.zeros(2)}", "w.pth")),
    Case("train-cache-dir-file", ["train", "p.yaml", *OFF, "--set", "data.cache=persistent", "--set",
                                  "data.cache_dir=p.yaml"], "data.cache_dir"),
    Case("prepare-manifest-under-file", ["prepare", "pipeline", "p.yaml", *T, "--set", "data.manifest=p.yaml/m.csv"],
         "data.manifest"),
    Case("rundir-missing", ["train", "p.yaml", *T, "--run-dir", "nowhere"], "nowhere"),
    Case("rundir-file", ["evaluate", "p.yaml", *T, "--run-dir", "p.yaml"], "p.yaml"),
    Case("rundir-foreign", ["train", "p.yaml", *T, "--run-dir", "data"], "not a medwsol run"),
    Case("rundir-foreign-config", ["run", "p.yaml", *T, "--run-dir", "mine"], "mine",
         files={"mine/config.yaml": "my: own\n"}),
    Case("rundir-other-pipeline", ["evaluate", "p.yaml", *T, "--set", "name=other", "--run-dir", FINISHED], "'other'"),
    Case("rundir-finished-train", ["train", "p.yaml", *T, "--run-dir", FINISHED], "--resume"),
    Case("rundir-finished-run", ["run", "p.yaml", *T, "--run-dir", FINISHED], "--overwrite"),
    Case("resume-and-overwrite", ["train", "p.yaml", *T, "--resume", "--overwrite", "--run-dir", FINISHED],
         "--resume"),
    Case("resume-finished", ["train", "p.yaml", *T, "--resume", "--run-dir", FINISHED], "train.epochs"),
    Case("resume-nothing", ["train", "p.yaml", *T, "--resume", "--run-dir", NO_LAST], "nothing to resume"),
    Case("resume-no-run", ["train", "p.yaml", *T, "--resume", "--set", "name=fresh"], "--resume"),
    Case("resume-other-method", ["train", "p.yaml", *T, "--set", "train.epochs=5", "--set", "model.method=minmax_entropy",
                                 "--resume", "--run-dir", FINISHED], "model.method"),
    Case("evaluate-no-run", ["evaluate", "p.yaml", *T, "--set", "name=fresh"], "fresh"),
    Case("evaluate-resume-option", ["evaluate", "p.yaml", "--resume"], "--resume"),
    Case("model-missing", ["evaluate", "p.yaml", *T, "--model", "nope.pt"], "nope.pt"),
    Case("model-folder", ["evaluate", "p.yaml", *T, "--model", "data"], "data"),
    Case("model-text", ["evaluate", "p.yaml", *T, "--model", "p.yaml"], "p.yaml"),
    Case("model-truncated", ["evaluate", "p.yaml", *T, "--model", "half.pt"], "half.pt",
         setup=lambda sb: (sb / "half.pt").write_bytes((sb / "real.pt").read_bytes()[:-200])),
    Case("model-tensor", ["evaluate", "p.yaml", *T, "--model", "w.pth"], "w.pth",
         setup=_torch_save("torch.zeros(2)", "w.pth")),
    Case("model-description-not-numbers", ["evaluate", "p.yaml", *T, "--model", "f.pt"], "f.pt",
         setup=_torch_save("{'format': 'medwsol-checkpoint', 'model': {'method': 'cam', 'num_classes': 'two'}}",
                           "f.pt")),
    Case("model-description-unknown-method", ["evaluate", "p.yaml", *T, "--model", "f.pt"], "f.pt",
         setup=_torch_save("{'format': 'medwsol-checkpoint', 'model': {'method': 'nosuch', 'num_classes': 2}}",
                           "f.pt")),
    Case("model-weights-not-a-dict", ["evaluate", "p.yaml", *T, "--model", "f.pt"], "f.pt",
         setup=_torch_save("{'format': 'medwsol-checkpoint', 'model': {'method': 'cam', 'num_classes': 2}, "
                           "'state_dict': [1, 2]}", "f.pt")),
    # ---------------------------------------------------------------- prepare synthetic / synthetic-slide / glas
    Case("synthetic-out-under-file", ["prepare", "synthetic", "--out", "p.yaml/x"], "p.yaml"),
    Case("synthetic-out-is-file", ["prepare", "synthetic", "--out", "p.yaml"], "p.yaml"),
    Case("synthetic-n-images", ["prepare", "synthetic", "--out", "o", "--n-images", "2"], "--n-images"),
    Case("synthetic-size-text", ["prepare", "synthetic", "--out", "o", "--size", "big"], "--size"),
    Case("slide-out-folder", ["prepare", "synthetic-slide", "--out", "data"], "data"),
    Case("slide-out-suffix", ["prepare", "synthetic-slide", "--out", "x.png"], "x.png"),
    Case("slide-out-under-file", ["prepare", "synthetic-slide", "--out", "p.yaml/a.tif"], "p.yaml"),
    Case("slide-mpp-zero", ["prepare", "synthetic-slide", "--out", "z.tif", "--mpp", "0"], "mpp"),
    Case("slide-mpp-nan", ["prepare", "synthetic-slide", "--out", "z.tif", "--mpp", "nan"], "mpp"),
    Case("glas-root-missing", ["prepare", "glas", "--root", "nope", "--out", "g.csv"], "nope"),
    Case("glas-root-file", ["prepare", "glas", "--root", "p.yaml", "--out", "g.csv"], "p.yaml"),
    Case("glas-root-empty", ["prepare", "glas", "--root", "emptydir", "--out", "g.csv"], "emptydir",
         setup=lambda sb: (sb / "emptydir").mkdir(exist_ok=True)),
    Case("glas-out-under-file", ["prepare", "glas", "--root", "emptydir", "--out", "p.yaml/g.csv"], "p.yaml",
         setup=lambda sb: (sb / "emptydir").mkdir(exist_ok=True)),
    # ---------------------------------------------------------------- prepare slides
    Case("slides-csv-missing", [*PS[:3], "nope.csv", *PS[4:]], "nope.csv"),
    Case("slides-csv-latin1", PS, "UTF-8", setup=_cohort_with(
        lambda c: (c / "slides.csv").write_bytes("slide,label\ncaf\xe9.tif,tumour\n".encode("latin-1")))),
    Case("slides-csv-empty", PS, "slides.csv", setup=_cohort_with(lambda c: (c / "slides.csv").write_text(""))),
    Case("slides-csv-columns", PS, "columns", setup=_cohort_with(lambda c: (c / "slides.csv").write_text("a,b\n1,2\n"))),
    Case("slides-ann-folder-missing", [*PS[:5], "noann", *PS[6:]], "noann"),
    Case("slides-out-under-file", [*PS[:-1], "p.yaml/t"], "p.yaml"),
    Case("slides-out-foreign-data", [*PS[:-1], "data"], "would replace"),
    Case("slides-config-dup-key", [*PS[:7], "d.yaml", *PS[8:]], "seed", files={"d.yaml": "name: a\nseed: 1\nseed: 2\n"}),
    Case("slides-set-bad", [*PS, "--set", "data.tiles.mpp=-1"], "data.tiles.mpp"),
    Case("slides-slide-corrupt", PS, "s2.tif", outputs=("c/tiles",), setup=_cohort_with(
        lambda c: (c / "slides/s2.tif").write_bytes((c / "slides/s2.tif").read_bytes()[:3000]))),
    Case("slides-slide-not-a-slide", PS, "s2.tif", outputs=("c/tiles",), setup=_cohort_with(
        lambda c: (c / "slides/s2.tif").write_text("hello"))),
    Case("slides-slide-missing", PS, "s2.tif", outputs=("c/tiles",), setup=_cohort_with(
        lambda c: (c / "slides/s2.tif").unlink())),
    Case("slides-ann-bad-json", PS, "s0.geojson", outputs=("c/tiles",), setup=_cohort_with(
        lambda c: (c / "ann/s0.geojson").write_text("{not json"))),
    Case("slides-ann-latin1", PS, "s0.geojson", outputs=("c/tiles",), setup=_cohort_with(
        lambda c: (c / "ann/s0.geojson").write_bytes('{"type": "FeatureCollection", "x": "caf\xe9"}'.encode("latin-1")))),
    Case("slides-ann-bad-geometry", PS, "s0.geojson", outputs=("c/tiles",), setup=_cohort_with(
        lambda c: (c / "ann/s0.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1]]]}}]})))),
    Case("slides-ann-not-features", PS, "s0.geojson", outputs=("c/tiles",), setup=_cohort_with(
        lambda c: (c / "ann/s0.geojson").write_text("[1, 2, 3]"))),
    Case("slides-ann-no-tumour", PS, "no tumour polygon", outputs=("c/tiles",), setup=_cohort_with(
        lambda c: (c / "ann/s0.geojson").write_text('{"type": "FeatureCollection", "features": []}'))),
    Case("slides-ann-gz-truncated", PS, "s0.geojson.gz", outputs=("c/tiles",), setup=_cohort_with(
        lambda c: ((c / "ann/s0.geojson.gz").write_bytes(gzip.compress((c / "ann/s0.geojson").read_bytes())[:40]),
                   (c / "ann/s0.geojson").unlink()))),
    Case("slides-tissue-read-limit", [*PS, "--set", "data.tiles.max_tissue_read_mpx=0.001"], "Mpx",
         outputs=("c/tiles",), setup=_cohort_with(lambda c: None)),
    # ---------------------------------------------------------------- infer (from a package, or a pipeline's run)
    Case("infer-config-missing", ["infer", "s.tif", "-c", "nope.yaml"], "nope.yaml"),
    Case("infer-config-model-missing", ["infer", "cohort/slides/s0.tif", "-c", "p.yaml", "--model", "nope.pt", *OFF],
         "nope.pt"),
    Case("infer-config-out-under-file", ["infer", "cohort/slides/s0.tif", "-c", "p.yaml", "--out", "p.yaml/o",
                                         "--model", "pkg", *OFF], "p.yaml"),
    Case("infer-config-rundir-foreign", ["infer", "cohort/slides/s0.tif", "-c", "p.yaml", "--run-dir", "data", *OFF],
         "data"),
    Case("infer-config-slide-missing", ["infer", "cohort/slides/s0.tif", "nope.tif", "-c", "p.yaml", "--model", "pkg",
                                        "--out", "io", "--set", "slides.num_workers=0", "--set", "slides.threshold=0.5",
                                        *OFF], "first: nope.tif",
         outputs=("io",), check=_good_slide_done),
    Case("infer-config-no-run", ["infer", "cohort/slides/s0.tif", "-c", "p.yaml", "--set", "name=fresh", *OFF], "fresh"),
    Case("infer-no-model", [*IN[:6], "--out", "io"], "--model"),
    Case("infer-no-out", [*IN[:6], "--model", "pkg"], "--out"),
    Case("infer-rundir-without-config", [*IN, "--run-dir", FINISHED], "--run-dir"),
    Case("infer-out-is-file", [*IN[:-2], "--out", "p.yaml"], "p.yaml"),
    Case("infer-out-under-file", [*IN[:-2], "--out", "p.yaml/o"], "p.yaml"),
    Case("infer-model-path-missing", [*IN[:6], "--model", "nope", "--out", "io"], "nope"),
    Case("infer-model-not-a-package", [*IN[:6], "--model", "data", "--out", "io"], "package.json"),
    Case("infer-model-checkpoint", [*IN[:6], "--model", "real.pt", "--out", "io"], "real.pt"),
    Case("infer-package-newer-schema", [*IN[:6], "--model", "pk", "--out", "io"], "newer",
         setup=lambda sb: _package_with(sb, lambda m: m.update(schema_version=99))),
    Case("infer-package-edited", [*IN[:6], "--model", "pk", "--out", "io"], "digest",
         setup=lambda sb: _package_with(sb, lambda m: m["input"].update(tile_size=32))),
    Case("infer-package-not-json", [*IN[:6], "--model", "pk", "--out", "io"], "package.json",
         setup=lambda sb: _package_with(sb, None, package_json=b"\xff\xfe{")),
    Case("infer-package-weights-missing", [*IN[:6], "--model", "pk", "--out", "io"], "pk",
         setup=lambda sb: _package_with(sb, None, weights=None)),
    Case("infer-package-weights-corrupt", [*IN[:6], "--model", "pk", "--out", "io"], "pk",
         setup=lambda sb: _package_with(sb, None, weights=b"garbage")),
    Case("infer-registry-store-missing", [*IN[:6], "--model", "models:/m@champion", "--tracking-uri",
                                          "sqlite:///nowhere.db", "--out", "io"], "nowhere.db"),
    Case("infer-registry-unreachable", [*IN[:6], "--model", "models:/m@champion", "--tracking-uri",
                                        "http://127.0.0.1:9", "--out", "io"], "127.0.0.1:9"),
    Case("infer-registry-unknown-name", [*IN[:6], "--model", "models:/nosuch@champion", "--tracking-uri",
                                         "sqlite:///reg.db", "--out", "io"], "models:/nosuch@champion"),
    Case("infer-classes-conflict", [*IN, "--set", "data.classes=[a,b]"], "data.classes"),
    Case("infer-score-conflict", [*IN, "--set", "slides.score=weight"], "slides.threshold"),
    Case("infer-overlap", [*IN, "--set", "slides.overlap=999"], "slides"),
    Case("infer-set-typo", [*IN, "--set", "slides.tile_sise=3"], "slides.tile_sise"),
    Case("infer-no-slides", ["infer", "--model", "pkg", "--out", "io"], "slides.inputs"),
    Case("infer-manifest-missing", ["infer", "--manifest", "nope.csv", "--model", "pkg", "--out", "io"], "nope.csv"),
    Case("infer-manifest-latin1", ["infer", "--manifest", "im.csv", "--model", "pkg", "--out", "io"], "UTF-8",
         files={"im.csv": "slide\ncaf\xe9.tif\n".encode("latin-1")}),
    Case("infer-manifest-empty", ["infer", "--manifest", "im.csv", "--model", "pkg", "--out", "io"], "im.csv",
         files={"im.csv": ""}),
    Case("infer-manifest-no-slide-column", ["infer", "--manifest", "im.csv", "--model", "pkg", "--out", "io"], "'slide'",
         files={"im.csv": "path\na.tif\n"}),
    # one bad slide among good ones: recorded, the good one finished, exit 2
    Case("infer-slide-missing", [*IN, "nope.tif"], "first: nope.tif", outputs=("io",), check=_good_slide_done),
    Case("infer-slide-not-a-slide", [*IN, "text.tif"], "first: text.tif", outputs=("io",), check=_good_slide_done,
         files={"text.tif": "hello"}),
    Case("infer-slide-truncated", [*IN, "half.tif"], "first: half.tif", outputs=("io",), check=_good_slide_done,
         setup=lambda sb: (sb / "half.tif").write_bytes((sb / "cohort/slides/s1.tif").read_bytes()[:4000])),
    Case("infer-slide-too-large-for-its-pyramid", [*IN, "--set", "slides.max_tissue_read_mpx=0.0001"], "Mpx",
         outputs=("io",), check=lambda sb: _failed_with(sb, "Mpx")),
    # ---------------------------------------------------------------- export
    Case("export-no-run", ["export", "p.yaml", "--set", "name=fresh"], "fresh"),
    Case("export-rundir-missing", ["export", "p.yaml", "--run-dir", "nowhere"], "nowhere"),
    Case("export-no-summary", ["export", "p.yaml", *OFF, "--run-dir", FINISHED], "slides.csv"),
    Case("export-damaged-slide-output", ["export", "p.yaml", *OFF, "--run-dir", SLIDES_RUN], "meta.json",
         outputs=(f"{SLIDES_RUN}/slides/exports.csv",),
         setup=lambda sb: (sb / SLIDES_RUN / "slides" / "s0" / "meta.json").write_bytes(b"\xff{"),
         check=lambda sb: _export_failed_with(sb, "meta.json")),
    Case("benchmark-method", ["benchmark", "methods", "p.yaml", *T, "--method", "nosuch", "--out", "b.md"], "nosuch"),
    Case("benchmark-out-under-file", ["benchmark", "methods", "p.yaml", *T, "--out", "p.yaml/b.md"], "p.yaml"),
    # ---------------------------------------------------------------- the command line itself
    Case("cli-unknown-command", ["deploy"], "deploy"),
    Case("cli-missing-argument", ["run"], "'config'"),
    Case("cli-unknown-option", ["validate", "p.yaml", "--sett", "x=1"], "--sett"),
]

for _case in CASES:  # every prepare-slides case starts from a fresh copy of the cohort (order-independent)
    if _case.args[:2] == ["prepare", "slides"] and _case.setup is None:
        _case.setup = _cohort_with(lambda c: None)


def _command(case: Case) -> str:
    return case.args[0] if case.args[0] not in ("prepare", "benchmark") else " ".join(case.args[:2])


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """Inputs every case may use: a config, a tiny dataset, run folders, a checkpoint, a slide cohort."""
    import torch

    from medwsol.config import load_config
    from medwsol.data.synthetic import make_synthetic_dataset
    from medwsol.data.synthetic_slide import make_synthetic_slide
    from medwsol.io import write_json

    sb = tmp_path_factory.mktemp("bad_inputs")
    demo = (ROOT / "pipelines/demo.yaml").read_text()
    (sb / "p.yaml").write_text(demo.replace("data/demo/manifest.csv", "data/manifest.csv")
                               .replace("register_as: medwsol-demo", "register_as: null")
                               .replace("\nslides:\n", "\nslides:\n  runtime: torch\n"))
    make_synthetic_dataset(sb / "data", n_images=12, size=64, n_valpx=2, progress=False)
    cfg = load_config(sb / "p.yaml", overrides=["model.method=cam", "train.epochs=1"], check=False)
    dump = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    torch.save({"format": "medwsol-checkpoint", "version": 1, "model": {"method": "cam", "num_classes": 2},
                "state_dict": {}}, sb / "real.pt")
    for rd, stages in ((FINISHED, {"train": {"status": "finished", "epochs": 1}}),
                       (NO_LAST, {"train": {"status": "failed"}})):
        d = sb / rd
        (d / "checkpoints").mkdir(parents=True)
        (d / "config.yaml").write_text(dump)
        write_json(d / "medwsol_run.json", {"format": "medwsol-run", "version": 1, "pipeline": "demo",
                                            "stages": stages})
        shutil.copy(sb / "real.pt", d / "checkpoints" / "best.pt")
        if rd == FINISHED:
            shutil.copy(sb / "real.pt", d / "checkpoints" / "last.pt")
    (sb / "cohort" / "slides").mkdir(parents=True)
    (sb / "cohort" / "ann").mkdir()
    rows = ["slide,label,group,split"]
    for i, (tumour, split) in enumerate([(True, "train"), (False, "train"), (True, "valid"), (False, "test")]):
        res = make_synthetic_slide(sb / "cohort" / "slides" / f"s{i}.tif", width=512, height=512, mpp=1.0, seed=i,
                                   tumour=tumour)
        shutil.move(res["geojson"], sb / "cohort" / "ann" / f"s{i}.geojson")
        for key in ("mask_png", "mask_json"):
            Path(res[key]).unlink()
        rows.append(f"slides/s{i}.tif,{'tumour' if tumour else 'normal'},s{i},{split}")
    (sb / "cohort" / "slides.csv").write_text("\n".join(rows) + "\n")
    (sb / "slides.yaml").write_text("name: sl\ndata:\n  classes: [normal, tumour]\n  tiles:\n    tile_size: 64\n"
                                    "    mpp: 2.0\n    min_tumour: 0.05\n    tumour_class: tumour\n"
                                    "    normal_class: normal\n")
    _make_package(sb / "pkg")
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{sb}/reg.db").search_experiments()  # an (empty) registry store that exists
    _make_slides_run(sb, dump)
    first_image = sorted((sb / "data" / "images").iterdir())[0].name
    return sb, first_image


def _make_package(folder: Path) -> None:
    """An untrained CAM packaged as training would (classes normal/tumour, 64 px tiles at 2 um/px)."""
    import torch

    from medwsol.methods.base import build_method
    from medwsol.package import build_package

    torch.manual_seed(0)
    net = build_method("cam", num_classes=2, output_stride=16).eval()
    build_package(folder, net.state_dict(), {**net.describe(), "extra_state": net.extra_state()}, ["normal", "tumour"],
                  "tumour", {"tile_size": 64, "target_mpp": 2.0, "mpp_source": "test"},
                  {"map_range": None, "map_range_fitted_on": "test", "score": "weight_x_prob",
                   "positive_class": "tumour", "tau": 0.5, "tau_chosen_on": "test"}, {"run_id": "test"})


def _make_slides_run(sb: Path, dump: str) -> None:
    """A run folder whose inference of s0 finished (for export)."""
    from medwsol.engine.served import served_from_package
    from medwsol.config import SlidesConfig
    from medwsol.engine.infer import infer_cohort
    from medwsol.io import write_json
    from medwsol.package import load_package
    from medwsol.stages import serving_setup

    d = sb / SLIDES_RUN
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(dump)
    write_json(d / "medwsol_run.json", {"format": "medwsol-run", "version": 1, "pipeline": "demo",
                                        "stages": {"infer": {"status": "finished"}}})
    pkg = load_package(sb / "pkg")
    served, settings = serving_setup(pkg, SlidesConfig(num_workers=0, batch_size=16))
    infer_cohort(served, [sb / "cohort/slides/s0.tif"], settings, d / "slides", "cpu", progress=False)
    assert (d / "slides" / "s0" / "meta.json").is_file()


def _tree(root: Path) -> set[str]:
    out = set()
    for dp, dns, fns in os.walk(root):
        for n in fns:
            out.add(os.path.relpath(os.path.join(dp, n), root))
        for n in dns:
            if not os.listdir(os.path.join(dp, n)):
                out.add(os.path.relpath(os.path.join(dp, n), root) + "/")
    return out


def _run_dirs(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.glob("runs/*/*") if p.is_dir()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, sandbox, monkeypatch):
    sb, first_image = sandbox
    monkeypatch.chdir(sb)
    for rel, data in case.files.items():
        p = sb / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            data = data.replace("PLACEHOLDER", first_image).encode()
        p.write_bytes(data)
    if case.setup is not None:
        case.setup(sb)
    before, runs_before = _tree(sb), _run_dirs(sb)
    untouched = {rel: (sb / rel).read_bytes() for rel in ("p.yaml", f"{FINISHED}/medwsol_run.json",
                                                           f"{FINISHED}/config.yaml", "mine/config.yaml",
                                                           "pkg/package.json")
                 if (sb / rel).is_file()}

    result = CliRunner().invoke(app, case.args)

    err = result.stderr
    assert result.exit_code == case.code, f"exit {result.exit_code}: {err[-2000:]}{result.exception!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in err and "Traceback" not in result.stdout
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert case.names in lines[0], lines[0]
    assert "; fix: " in lines[0], lines[0]
    new = {f for f in _tree(sb) - before if not any(f.startswith(o) for o in case.outputs)}
    assert not new, f"left behind: {sorted(new)[:5]}"
    assert _run_dirs(sb) == runs_before
    for rel, data in untouched.items():
        assert (sb / rel).read_bytes() == data, f"{rel} was changed"
    if case.check is not None:
        case.check(sb)
    # tidy what the case itself made, for the next one
    for rel in case.files:
        (sb / rel).unlink(missing_ok=True)
    for o in case.outputs:
        shutil.rmtree(sb / o, ignore_errors=True)


def test_corpus_covers_every_command():
    """At least 60 cases, and every command of the CLI has bad inputs in the table."""
    commands = {_command(c) for c in CASES}
    expected = {"validate", "run", "train", "evaluate", "infer", "export", "prepare pipeline", "prepare synthetic",
                "prepare synthetic-slide", "prepare glas", "prepare slides", "benchmark methods"}
    assert expected <= commands, expected - commands
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def test_quotes_spaces_and_accents_in_paths_are_just_names(sandbox, monkeypatch):
    """Not a bad input: a slide and an output folder whose names hold a quote, a space and an accent."""
    import pandas as pd

    sb, _ = sandbox
    monkeypatch.chdir(sb)
    slide, out = sb / "q'x y \u00e9.tif", sb / "o'ut \u00e9"
    shutil.copy(sb / "cohort/slides/s1.tif", slide)
    try:
        result = CliRunner().invoke(app, ["infer", slide.name, "--set", "slides.num_workers=0", "--model", "pkg",
                                          "--out", out.name, "--no-export"])
        assert result.exit_code == 0, result.stderr[-2000:]
        table = pd.read_csv(out / "slides.csv", keep_default_na=False)
        assert table.status.tolist() == ["ok"] and Path(table.slide[0]).name == slide.name
    finally:
        slide.unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)
