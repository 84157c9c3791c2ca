"""Typed pipeline configuration: one pydantic model per YAML section.

Every model forbids unknown keys, so a typo fails at once with its YAML path.

Example:
    >>> from medwsol.config import load_config
    >>> cfg = load_config("pipelines/demo.yaml", overrides=["train.epochs=2"])  # doctest: +SKIP
    >>> cfg.train.epochs  # doctest: +SKIP
    2
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medwsol.errors import ConfigError, RegistryError
from medwsol.methods.catalog import BACKBONES, METHOD_PARAMS, METHODS

__all__ = [
    "STAGES",
    "PipelineConfig",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "EvaluateConfig",
    "SlidesConfig",
    "ExportConfig",
    "TrackingConfig",
    "load_config",
    "parse_config",
    "apply_overrides",
    "check_files",
    "output_problems",
    "flatten",
    "parse_cluster",
    "read_yaml",
    "load_yaml_text",
]

STAGES = ("prepare", "train", "evaluate", "infer", "export")
Stage = Literal["prepare", "train", "evaluate", "infer", "export"]


def parse_cluster(spec: str) -> tuple[str, str | int]:
    """``local:N`` -> ``("local", N)``; ``tcp://HOST:PORT`` (or ``tls://``) -> ``("remote", spec)``.

    Raises:
        ValueError: any other form (the message lists the accepted ones).

    Example:
        >>> parse_cluster("local:2"), parse_cluster("tcp://scheduler:8786")
        (('local', 2), ('remote', 'tcp://scheduler:8786'))
    """
    import re

    s = str(spec).strip()
    m = re.fullmatch(r"local:(\d+)", s)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise ValueError(f"{s!r}: local:N needs N >= 1 worker processes")
        return "local", n
    if re.fullmatch(r"(tcp|tls)://[A-Za-z0-9_.\-\[\]:]+:\d{1,5}", s):
        return "remote", s
    raise ValueError(f"{s!r} is not a cluster: use local:N (N worker processes on this machine) or "
                     "tcp://HOST:PORT (a running Dask scheduler)")


class Section(BaseModel):
    """Base of every section: unknown keys are errors; defaults are validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=(), allow_inf_nan=False)


class SyntheticConfig(Section):
    """The built-in H&E-like gland dataset (``data.source: synthetic``)."""

    n_images: int = Field(120, ge=12, description="images in all (half benign, half malignant)")
    size: int = Field(192, ge=64, le=2048, description="square image side in pixels")
    seed: int = Field(0, ge=0)
    valid_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.3, gt=0, lt=0.6)
    n_valpx: int = Field(6, ge=2, description="pixel-labelled validation images (half per class)")


class SyntheticSlidesConfig(Section):
    """Synthetic whole slides for ``data.source: slides`` when no slides are given."""

    n_train: int = Field(
        8, ge=2, description="annotated slides for the tile manifest (half with tumour); with >= 6 the last "
        "tumour/normal pair is the tile test split and the pair before it the valid split")
    n_test: int = Field(1, ge=1, description="held-out slides with tumour, for inference")
    width: int = Field(8192, ge=1024)
    height: int = Field(6144, ge=1024)
    mpp: float = Field(0.5, gt=0)
    seed: int = 0


class SlideTilesConfig(Section):
    """CAMELYON16-style tile extraction from slides (``data.source: slides``)."""

    slides: Path | None = Field(None, description="slides.csv with columns slide, label, group[, annotations]")
    annotations: Path | None = Field(None, description="folder of QuPath GeoJSON, <slide stem>.geojson")
    tile_size: int = Field(256, ge=32)
    mpp: float = Field(1.0, gt=0, description="resolution of the extracted tiles (µm/px)")
    min_tissue: float = Field(0.1, ge=0, le=1)
    min_tumour: float = Field(0.2, ge=0, le=1)
    tumour_class: str = "malignant"
    normal_class: str = "benign"
    max_tiles_per_slide: int | None = Field(None, ge=1)
    max_tissue_read_mpx: float = Field(
        500.0, gt=0, description="a slide whose tissue detection would decode more pixels (millions) than this, "
        "because it has no pyramid level near the mask's resolution, fails with a reason (the others go on)")
    synthetic: SyntheticSlidesConfig = SyntheticSlidesConfig()


class AugmentConfig(Section):
    """Training augmentation (evaluation is deterministic)."""

    flip: bool = True
    rot90: bool = True
    stain_jitter: float = Field(0.05, ge=0, le=0.5, description="H&E stain-space jitter strength (0: off)")
    brightness_contrast: float = Field(0.1, ge=0, le=0.5, description="random intensity scale/shift (0: off)")


class DataConfig(Section):
    """Where the images come from and how they are fed to the model."""

    source: Literal["synthetic", "glas", "manifest", "slides"] = "synthetic"
    root: Path | None = Field(None, description="GlaS: the unzipped 'Warwick QU Dataset (Released ...)' folder")
    manifest: Path = Field(Path("data/synthetic/manifest.csv"), description="written by prepare, read by train/evaluate")
    classes: list[str] = Field(default_factory=lambda: ["benign", "malignant"], min_length=2)
    synthetic: SyntheticConfig = SyntheticConfig()
    tiles: SlideTilesConfig = SlideTilesConfig()
    patch_size: int = Field(160, ge=32, description="training crop; smaller images are padded")
    eval_pad_to: int = Field(32, ge=1, description="evaluation images are padded to a multiple of this")
    batch_size: int = Field(16, ge=1)
    num_workers: int = Field(0, ge=0)
    cache: Literal["none", "cache", "persistent"] = "cache"
    cache_dir: Path | None = None
    cache_rate: float = Field(1.0, gt=0, le=1)
    split_seed: int = 0
    n_folds: int = Field(5, ge=2)
    augment: AugmentConfig = AugmentConfig()

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"classes must be unique, got {v}")
        return v


class ModelConfig(Section):
    """Which WSOL method, on which backbone."""

    method: str = "minmax_entropy"
    backbone: str = "resnet18"
    pretrained: Literal["imagenet"] | Path | None = Field(
        None, description="'imagenet' (torchvision's weights, downloaded once and cached) or a local .pth "
        "(torchvision or MONAI layout)")
    output_stride: Literal[8, 16, 32] = 16
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the method's own knobs, or a mapping from method names to their knobs (the selected method's "
        "entry is used, so --set model.method=... keeps the file valid)",
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        try:
            METHODS.check(v)
        except RegistryError as err:
            raise ValueError(str(err)) from None
        return v

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        try:
            BACKBONES.check(v)
        except RegistryError as err:
            raise ValueError(str(err)) from None
        return v


class TrainConfig(Section):
    """Optimisation, precision, checkpoints and model selection."""

    epochs: int = Field(10, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = Field(False, description="Nesterov momentum (sgd; the min-max authors' code uses it)")
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["none", "step", "cosine"] = "cosine"
    step_size: int = Field(30, ge=1, description="epochs between lr drops (schedule=step)")
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0, description="floor of the scheduled learning rate (the authors' MyStepLR: 1e-7)")
    warmup_epochs: int = Field(0, ge=0)
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16/fp16 on CUDA, off on CPU; bf16 on CPU is opt-in"
    )
    channels_last: bool = True

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false (and `on` as true)
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v

    grad_clip: float | None = Field(5.0, gt=0)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    select_metric: Literal["val_error", "val_loss", "valpx_miou", "valpx_pxap", "valpx_dice", "last"] = Field(
        "val_error", description="model selection: valid error/loss, or on the pixel-labelled valpx images: "
        "PxAP, best mIoU, or the foreground Dice at the best-mIoU threshold")
    select_max_val_error: float | None = Field(
        None, ge=0, le=100,
        description="an epoch can become best only if its val_error (%) is at most this (while no epoch meets it, "
        "the lowest val_error wins); guards localization-based selection against a collapsed classifier",
    )
    select_ties: Literal["first", "last"] = Field(
        "first", description="an epoch that equals the best so far replaces it (last, as the min-max authors' "
        "`<=`/`>=` selection) or not (first)")
    patience: int | None = Field(None, ge=1, description="early stopping after this many epochs without improvement")
    deterministic: bool = True
    stop_after: int | None = Field(
        None, ge=1, description="stop this invocation after N epochs (time-boxed jobs); continue with --resume"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores; with --nproc N: "
                                "cores // N per process)")
    sync_batchnorm: bool = Field(True, description="with several processes (--nproc), batch norm over the global "
                                 "batch (keeps N processes equal to one); false: each rank's own share")


class EvaluateConfig(Section):
    """The evaluation protocol (Choe et al. 2020)."""

    splits: list[str] = Field(default_factory=lambda: ["test"])
    threshold_split: str = Field("valpx", description="pixel-labelled split on which tau is chosen by best mIoU")
    threshold_step: float = Field(0.001, gt=0, le=0.1)
    n_overlays: int = Field(8, ge=0)
    batch_size: int = Field(4, ge=1)
    boundary_tolerance: int = Field(2, ge=0, description="pixels, for boundary F1")


class SlidesConfig(Section):
    """Whole-slide inference: tissue detection, tiling and stitching."""

    inputs: list[Path] = Field(default_factory=list, description="slide files to infer on")
    manifest: Path | None = Field(None, description="CSV with a 'slide' column (paths relative to it)")
    target_mpp: float = Field(1.0, gt=0, description="resolution the model sees (µm/px)")
    fallback_mpp: float | None = Field(None, gt=0, description="used when a slide has no mpp and no objective power")
    tile_size: int = Field(256, ge=32, description="tile side at target_mpp (a model package sets it)")
    overlap: int | None = Field(None, ge=0, description="px between neighbouring tiles (default: a quarter of "
                                "the tile, blended so that tile borders do not show)")
    blend: Literal["feather", "gaussian", "constant"] = Field(
        "feather", description="weights of overlapping tiles: feather (linear cross-fade across the overlap: no "
        "step at tile edges nor at hand-over lines), MONAI's Gaussian importance map, or a plain average")
    blend_sigma: float = Field(0.125, gt=0, le=2, description="sigma of the Gaussian importance map, as a fraction "
                               "of the tile (MONAI's sigma_scale)")
    min_tissue: float = Field(0.1, ge=0, le=1)
    tissue_mpp: float = Field(16.0, gt=0, description="resolution of the tissue mask")
    max_tissue_read_mpx: float = Field(
        500.0, gt=0, description="a slide whose tissue detection would decode more pixels (millions) than this, "
        "because it has no pyramid level near tissue_mpp, fails with a reason (the others go on)")
    output_mpp: float = Field(4.0, gt=0, description="resolution of the stitched heatmap")
    batch_size: int = Field(16, ge=1)
    num_workers: int = Field(1, ge=0, description="tile readers: on CUDA this many DataLoader processes; on a CPU "
                             "(or in a daemonic Dask worker) one read-ahead thread if > 0; 0: read in the loop")
    threshold: float | None = Field(None, gt=0, lt=1, description="default: the model package's tau, chosen on "
                                    "validation for the served score")
    score: Literal["weight", "weight_x_prob"] = Field(
        "weight_x_prob",
        description="heatmap value per pixel: the weight map, or the weight map times the tile's P(positive_class) "
        "(keeps the evidence maps of tiles the classifier calls normal from lighting up)",
    )
    positive_class: str | None = Field(None, description="class whose probability scales the map (default: the last class)")
    map_class: Literal["predicted", "positive"] = Field(
        "predicted", description="the map a packaged model serves: the method's own (predicted class / probability "
        "mixture, as the evaluation protocol) or the positive class's for every tile (a tumour-evidence map that does "
        "not switch class between neighbouring tiles; CAM, Grad-CAM, min-max entropy)")
    out_dir: Path | None = Field(None, description="default: <run dir>/slides")
    overwrite: bool = False
    cluster: str | None = Field(
        None, description="run the cohort on Dask, one task per slide: local:N (N worker processes here) or "
        "tcp://HOST:PORT (a running scheduler; see docs/scaling.md); default: one process, slide after slide")
    worker_threads: int | None = Field(
        None, ge=1, description="torch threads per Dask worker (default: local:N -> cores // N; a remote worker -> "
        "its cores // its dask threads)")

    runtime: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        "auto", description="what runs the model: PyTorch, ONNX Runtime fp32, or ONNX Runtime int8 (static, QDQ, "
        "per-channel; calibrated on validation tiles); auto: torch on CUDA, onnx-int8 on a CPU (docs/benchmarks.md)")
    runtime_threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads (default: the CPUs "
                                        "this process may use)")
    runtime_min_dice: float | None = Field(
        0.97, ge=0, le=1, description="refuse an ONNX runtime whose maps, thresholded at tau, agree with the fp32 "
        "model's on validation tiles with a Dice below this (null: never refuse)")
    runtime_calibration: list[Path] = Field(
        default_factory=list, description="int8 calibration and check tiles: one manifest CSV (its valid split) or "
        "slide files (tissue tiles); default: the validation split of the package's own data manifest")

    @field_validator("cluster")
    @classmethod
    def _cluster_spec(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parse_cluster(v)  # raises ValueError with the accepted forms
        return v.strip()

    @model_validator(mode="after")
    def _overlap_lt_tile(self):
        if self.overlap is not None and self.overlap >= self.tile_size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than tile_size ({self.tile_size})")
        return self


class ExportConfig(Section):
    """What each slide's heatmap is exported as."""

    formats: list[Literal["tiff", "geojson", "png", "nifti", "mha"]] = Field(
        default_factory=lambda: ["tiff", "geojson", "png"]
    )
    geojson_gzip: bool = False
    class_name: str = "Tumor"
    colour: tuple[int, int, int] = (200, 0, 0)
    simplify: float = Field(1.0, ge=0, description="polygon simplification tolerance in heatmap pixels")
    min_region_area: float = Field(0.0, ge=0, description="drop regions smaller than this many µm²")
    colormap: str = "inferno"


class TrackingConfig(Section):
    """MLflow tracking and model registry."""

    enabled: bool = True
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (sqlite:///..., http://...)")
    experiment: str = "medwsol"
    register_as: str | None = Field(None, description="registered model name; champion alias moves on improvement")


class PipelineConfig(Section):
    """A whole pipeline YAML."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    stages: list[Stage] = Field(default_factory=lambda: ["prepare", "train", "evaluate"])
    run_root: Path = Path("runs")
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    slides: SlidesConfig = SlidesConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _positive_class_known(self):
        pc = self.slides.positive_class
        # data.classes are the training classes; with `medwsol infer` the model package names them instead
        if pc is not None and "classes" in self.data.model_fields_set and pc not in self.data.classes:
            raise ValueError(f"slides.positive_class: {pc!r} is not in data.classes {list(self.data.classes)}; "
                             "fix: name one of data.classes")
        return self

    @field_validator("stages")
    @classmethod
    def _ordered(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"stages repeat: {v}")
        return sorted(v, key=STAGES.index)


def _key(part: Any) -> str:
    """A YAML key as written in a message: as is when it reads plainly, else quoted (``'a b'``, ``'\\n'``)."""
    text = str(part)
    plain = text and text.isprintable() and text.strip() == text and not any(c in text for c in " .:;[]'\"")
    return text if plain else repr(text)


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("function-") or part in ("literal", "str", "int"):
            continue
        else:
            out += ("." if out else "") + _key(part)
    return out or "<top level>"


def _format_validation_error(err: ValidationError, data: dict[str, Any], prefix: str = "") -> str:
    msgs = []
    for e in err.errors():
        loc = _format_loc(tuple(e["loc"]))
        if prefix:
            loc = f"{prefix}.{loc}" if loc != "<top level>" else prefix
        if e["type"] == "extra_forbidden":
            parent = _format_loc(tuple(e["loc"])[:-1])
            if prefix:
                parent = f"{prefix}.{parent}" if parent != "<top level>" else prefix
            value = repr(e["input"])
            value = value if len(value) <= 80 else value[:79] + "…"
            msgs.append(f"{loc}: unknown key (value {value}); fix: remove it or check the spelling under {parent}")
        elif e["type"] == "missing":
            msgs.append(f"{loc}: required key is missing; fix: add it")
        elif loc == "<top level>" and e["type"] == "value_error":  # cross-section checks name their keys
            msgs.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            got = repr(e["input"])
            got = got if len(got) <= 80 else got[:79] + "…"
            if "fix:" in msg:  # the validator wrote its own fix (and names the value)
                msgs.append(f"{loc}: {msg}")
            else:
                msgs.append(f"{loc}: {msg} (got {got}); fix: {_FIXES.get(e['type'], f'correct {loc}')}")
    return "; ".join(msgs)


#: The fix that follows each kind of pydantic validation error (by error type).
_FIXES = {
    "model_type": "write it as a section of key: value lines",
    "model_attributes_type": "write it as a section of key: value lines",
    "dict_type": "write it as a mapping of key: value",
    "list_type": "write it as a list, e.g. [a, b]",
    "finite_number": "use a finite number",
    "literal_error": "use one of the values listed",
    "enum": "use one of the values listed",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "less_than": "use a smaller value",
    "less_than_equal": "use a smaller value",
    "int_parsing": "use a whole number",
    "int_type": "use a whole number",
    "int_from_float": "use a whole number",
    "float_parsing": "use a number",
    "float_type": "use a number",
    "bool_parsing": "use true or false",
    "bool_type": "use true or false",
    "string_type": "quote it as text",
    "string_pattern_mismatch": "use letters, digits, '_', '.' or '-' only",
    "too_short": "give more items",
    "too_long": "give fewer items",
    "path_type": "give a file path as text",
}


def parse_config(data: dict[str, Any], source: str = "<config>") -> PipelineConfig:
    """Validate a config dict; raise ConfigError with the YAML path of each problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a YAML mapping at the top level; fix: start with 'name: ...'")
    msgs = []
    cfg = None
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as err:
        msgs.append(_format_validation_error(err, data))
    # the method's own knobs, validated against its schema, with full YAML paths
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    method = model.get("method", ModelConfig.model_fields["method"].default)
    if not isinstance(method, str):
        method = None  # the model.method error itself comes from PipelineConfig above
    params = model.get("params") or {}
    per_method = isinstance(params, dict) and bool(params) and all(
        isinstance(k, str) and k in METHOD_PARAMS for k in params)
    if per_method:
        # keyed by method: `params: {minmax_entropy: {...}, weightmap_ce: {...}}`; every entry is checked,
        # the selected method's entry (or its defaults) is used, so `--set model.method=...` stays valid
        for name, sub in params.items():
            if name != method:
                try:
                    METHOD_PARAMS[name].model_validate(sub or {})
                except ValidationError as err:
                    msgs.append(_format_validation_error(err, sub or {}, prefix=f"model.params.{name}"))
        prefix, params = f"model.params.{method}", params.get(method) or {}
    else:
        prefix = "model.params"
    if method in METHOD_PARAMS and isinstance(params, dict):
        try:
            validated = METHOD_PARAMS[method].model_validate(params).model_dump()
            if cfg is not None:
                cfg.model.params = validated
        except ValidationError as err:
            msgs.append(_format_validation_error(err, params, prefix=prefix))
    if msgs:
        raise ConfigError(f"{source}: " + "; ".join(msgs))
    assert cfg is not None
    return cfg


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value; fix: e.g. --set train.epochs=2")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise ConfigError(f"--set {item!r}: empty key name in {key.strip()!r}; fix: write section.key=value, "
                              "e.g. --set train.epochs=2")
        try:
            value = load_yaml_text(raw, f"--set {item!r}") if raw != "" else ""
        except ConfigError:
            value = raw
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section; fix: check the key path")
            node = nxt
        node[parts[-1]] = value
    return data


#: Limits of the YAML loader: a pipeline file is a few hundred nodes; these stop alias "bombs",
#: absurd nesting and huge files in the first millisecond instead of exhausting memory or the stack.
MAX_YAML_BYTES = 1_000_000
MAX_YAML_DEPTH = 64
MAX_YAML_ALIASES = 64
MAX_YAML_NODES = 20_000


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses nesting deeper than ``MAX_YAML_DEPTH`` and more than
    ``MAX_YAML_ALIASES`` aliases while composing (the checks on the composed tree follow)."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _YamlLimit(f"more than {MAX_YAML_ALIASES} aliases (*name)", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _YamlLimit(f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _YamlLimit(Exception):
    def __init__(self, what: str, mark) -> None:
        super().__init__(what)
        self.what, self.mark = what, mark


def _check_tree(node, source: str) -> None:
    """Duplicate keys (with their YAML path and both lines) and the expanded size of the tree."""
    sizes: dict[int, int] = {}

    def walk(n, path: str) -> int:
        if id(n) in sizes:  # an alias: the same node again, expanded in full by whoever walks the data
            return sizes[id(n)]
        size = 1
        if isinstance(n, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    key = (k.tag, k.value)
                    where = f"{path}.{_key(k.value)}" if path else _key(k.value)
                    if key in seen:
                        raise ConfigError(
                            f"{source}: line {k.start_mark.line + 1}: duplicate key {where} (first on line "
                            f"{seen[key]}); fix: keep one of them"
                        )
                    seen[key] = k.start_mark.line + 1
                else:
                    where = path
                size += walk(k, where) + walk(v, where)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                size += walk(v, f"{path}[{i}]")
        sizes[id(n)] = size
        if size > MAX_YAML_NODES:
            raise ConfigError(f"{source}: line {n.start_mark.line + 1}: the document expands to more than "
                              f"{MAX_YAML_NODES} values (aliases repeat their anchors); fix: write the values out "
                              "or use fewer aliases")
        return size

    walk(node, "")


def load_yaml_text(text: str, source: str = "<yaml>") -> Any:
    """Parse one YAML document safely: no duplicate keys, bounded aliases, depth and size.

    Errors are one-line ``ConfigError`` s naming ``source`` and the line.

    Example:
        >>> from medwsol.config import load_yaml_text
        >>> load_yaml_text("train: {epochs: 2}")
        {'train': {'epochs': 2}}
        >>> load_yaml_text("a: 1\na: 2", "x.yaml")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        medwsol.errors.ConfigError: x.yaml: line 2: duplicate key a (first on line 1); fix: keep one of them
    """
    loader = None
    try:
        loader = _BoundedLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_tree(node, source)
        return loader.construct_document(node)
    except _YamlLimit as err:
        raise ConfigError(f"{source}: line {err.mark.line + 1}: YAML {err.what}; fix: simplify the file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}:{where} invalid YAML ({problem}); fix: correct the syntax") from None
    except (RecursionError, MemoryError):
        raise ConfigError(f"{source}: YAML too deeply nested or too large; fix: simplify the file") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a pipeline YAML into a dict with errors naming the file.

    UTF-8 text of at most ``MAX_YAML_BYTES``, one document, a mapping at the top level, no
    duplicate keys, bounded aliases (see :func:`load_yaml_text`).
    """
    from medwsol.io import read_text_file

    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise ConfigError(f"{p}: config file not found; fix: check the path (e.g. pipelines/demo.yaml)")
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder, not a YAML file; fix: give the pipeline file (e.g. pipelines/demo.yaml)")
    text = read_text_file(p, "YAML file", max_bytes=MAX_YAML_BYTES, error=ConfigError)
    data = load_yaml_text(text, str(p))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a YAML mapping at the top level; fix: start with 'name: ...'")
    return data


def check_files(
    cfg: PipelineConfig, source: str, stages: list[str] | None = None, require_unset: bool = True
) -> list[str]:
    """Fail early when a file the given stages read is missing (and no earlier stage makes it).

    With ``require_unset=False`` (``medwsol validate``) a required path that is simply not
    set yet (``data.root: null`` in glas.yaml, to be given with ``--set``) is returned as a
    note instead of failing; a path that is set but missing always fails.
    """
    stages = list(stages if stages is not None else cfg.stages)
    makes_manifest = "prepare" in stages
    problems: list[str] = []
    notes: list[str] = []
    pre = cfg.model.pretrained
    if pre is not None and pre != "imagenet" and not Path(pre).expanduser().is_file():
        problems.append(f"model.pretrained: file {str(cfg.model.pretrained)!r} not found; fix: give a local .pth or remove the key")
    if "prepare" in stages:
        if cfg.data.source == "glas" and cfg.data.root is None and not require_unset:
            notes.append("data.root is not set; give it before running (e.g. --set data.root='/path/to/Warwick QU "
                         "Dataset (Released 2016_07_08)')")
        elif cfg.data.source == "glas" and (cfg.data.root is None or not cfg.data.root.is_dir()):
            problems.append(
                f"data.root: GlaS folder {str(cfg.data.root)!r} not found; fix: download and unzip the Warwick QU "
                "release and set data.root to it (see data_manifests/README.md)"
            )
        if cfg.data.source == "manifest" and not cfg.data.manifest.is_file():
            problems.append(f"data.manifest: file {str(cfg.data.manifest)!r} not found; fix: check the path")
        if cfg.data.source == "slides":
            t = cfg.data.tiles
            if t.slides is not None and not t.slides.is_file():
                problems.append(f"data.tiles.slides: file {str(t.slides)!r} not found; fix: check the path")
            if t.annotations is not None and not t.annotations.is_dir():
                problems.append(f"data.tiles.annotations: folder {str(t.annotations)!r} not found; fix: check the path")
    elif any(s in stages for s in ("train", "evaluate")) and not makes_manifest and not cfg.data.manifest.is_file():
        problems.append(
            f"data.manifest: file {str(cfg.data.manifest)!r} not found; fix: run the prepare stage first "
            "or point data.manifest at an existing manifest"
        )
    if "infer" in stages and "prepare" not in stages:
        for i, s in enumerate(cfg.slides.inputs):
            if not s.exists():
                problems.append(f"slides.inputs[{i}]: file {str(s)!r} not found; fix: check the path")
        if cfg.slides.manifest is not None and not cfg.slides.manifest.is_file():
            problems.append(f"slides.manifest: file {str(cfg.slides.manifest)!r} not found; fix: check the path")
    mp = cfg.model.params
    ckpt = mp.get("classifier_checkpoint") if isinstance(mp, dict) else None
    if ckpt and not Path(ckpt).is_file() and "train" in stages:
        problems.append(f"model.params.classifier_checkpoint: file {ckpt!r} not found; fix: train a cam model first")
    problems += output_problems(cfg, stages)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return notes


def output_problems(cfg: PipelineConfig, stages: list[str]) -> list[str]:
    """Every folder the stages will write into must be creatable and writable, before any work."""
    from medwsol.io import writable_problem

    wanted: list[tuple[str, Path]] = [("run_root", cfg.run_root)]
    problems = []
    if "prepare" in stages and cfg.data.source != "manifest":
        wanted.append(("data.manifest", cfg.data.manifest.parent))
    if cfg.data.cache == "persistent" and any(s in stages for s in ("train", "evaluate")):
        if cfg.data.cache_dir is None:
            problems.append("data.cache_dir: not set while data.cache is 'persistent'; fix: set data.cache_dir to a "
                            "folder or use data.cache: cache")
        else:
            wanted.append(("data.cache_dir", cfg.data.cache_dir))
    if "infer" in stages and cfg.slides.out_dir is not None:
        wanted.append(("slides.out_dir", cfg.slides.out_dir))
    for key, folder in wanted:
        why = writable_problem(folder, "dir")
        if why is not None:
            problems.append(f"{key}: folder {str(folder)!r}: {why}; fix: choose a writable folder")
    return problems


def load_config(
    path: str | os.PathLike[str],
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    check: bool = True,
    notes: list[str] | None = None,
) -> PipelineConfig:
    """Read, override, validate and (optionally) check the files of a pipeline YAML.

    When a ``notes`` list is given, required-but-unset paths are appended to it instead of failing.
    """
    data = apply_overrides(read_yaml(path), overrides)
    cfg = parse_config(data, source=str(path))
    if check:
        found = check_files(cfg, str(path), stages, require_unset=notes is None)
        if notes is not None:
            notes.extend(found)
    return cfg


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to ``a.b.c`` keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
