"""The paper presets hold the authors' settings, value by value.

The tables below were copied from the authors' public code (read on GitHub; no network here):

* TMI 2022: github.com/sbelharbi/deep-wsl-histo-min-max-uncertainty, ``config_yaml/glas.yaml`` (``yaml_gen.py``
  for ``delta_sigma``/``max_sigma``, which that file lacks but ``main.py`` reads), ``deepmil/models.py``,
  ``deepmil/criteria.py``, ``main.py``.
* 2019: github.com/sbelharbi/wsol-min-max-entropy-interpretability, ``config_yaml/glas-4-erasing.yaml``,
  ``deepmil/models.py``, ``deepmil/criteria.py``, ``deepmil/train.py``, ``train_deepmil.py``.

Each row: (our config path, expected value, the authors' key = value, where). A preset value that
is not in its table fails too, so a new knob cannot slip into a preset unchecked.
"""

from __future__ import annotations

import math

import pytest
import yaml

from medwsol.config import load_config

TMI = [
    ("seed", 0, "MYSEED: '0'", "config_yaml/glas.yaml"),
    ("data.source", "glas", "dataset: glas", "config_yaml/glas.yaml"),
    ("data.classes", ["benign", "malignant"], "name_classes: {benign: 0, malignant: 1}", "config_yaml/glas.yaml"),
    ("data.patch_size", 416, "crop_size: 416", "config_yaml/glas.yaml"),
    ("data.batch_size", 4, "batch_size: 4", "config_yaml/glas.yaml"),
    ("data.augment.flip", True, "RandomHorizontalFlip + RandomVerticalFlip", "tools.py get_train_transforms_img"),
    ("data.augment.rot90", False, "no rotation for glas", "tools.py get_train_transforms_img"),
    ("data.augment.brightness_contrast", 0.5, "ColorJitter(0.5, 0.5, 0.5, 0.05)", "tools.py get_train_transforms_img"),
    ("data.augment.stain_jitter", 0.0, "no stain augmentation", "tools.py get_train_transforms_img"),
    ("model.method", "minmax_entropy", "deepmil.models.ResNet", "deepmil/models.py"),
    ("model.backbone", "resnet18", "model_name: resnet18", "config_yaml/glas.yaml"),
    ("model.pretrained", "imagenet", "pretrained: true", "config_yaml/glas.yaml"),
    ("model.output_stride", 32, "heads on x_32 (no dilation)", "deepmil/models.py ResNet.segment/classify"),
    ("model.params.modalities", 5, "modalities: 5", "config_yaml/glas.yaml"),
    ("model.params.kmax", 0.3, "kmax: 0.3", "config_yaml/glas.yaml"),
    ("model.params.kmin", 0.0, "kmin: 0.0", "config_yaml/glas.yaml"),
    ("model.params.alpha", 0.6, "alpha: 0.6", "config_yaml/glas.yaml"),
    ("model.params.dropout", 0.1, "dropout: 0.1", "config_yaml/glas.yaml"),
    ("model.params.sigmoid_w", 5.0, "w: 5.0", "config_yaml/glas.yaml"),
    ("model.params.sigmoid_sigma", 0.15, "sigma: 0.15", "config_yaml/glas.yaml"),
    ("model.params.sigma_growth", 0.001, "delta_sigma: 0.001", "yaml_gen.py; main.py after each epoch"),
    ("model.params.sigma_max", 0.2, "max_sigma: 0.2", "yaml_gen.py; main.py"),
    ("model.params.mask_norm", "batch", "x.min()/x.max() over the batch", "deepmil/models.py get_pseudo_binary_mask"),
    ("model.params.cls_input_scale", 0.8, "scale_in_cl: [0.8, 0.8]", "config_yaml/glas.yaml; models.py classify"),
    ("model.params.view_batches", "separate", "classify(x_pos); classify(x_neg)", "deepmil/models.py ResNet.forward"),
    ("model.params.fg_loss", True, "loss_pos = CE(scores_pos, labels)", "deepmil/criteria.py forward_glas"),
    ("model.params.bg_loss", True, "use_reg: true, reg_loss: KLUniformLoss", "config_yaml/glas.yaml"),
    ("model.params.loc_loss", True, "loss_cl_seg = CE(sc_cl_se, labels)", "deepmil/criteria.py forward_glas"),
    ("model.params.bg_weight", 1e-7 / math.log(2), "lambda_neg: 1e-7 on -mean(log2 softmax)",
     "config_yaml/glas.yaml; criteria.py KLUniformLoss"),
    ("model.params.detach_mask", False, "segment() does not detach", "deepmil/models.py ResNet.segment"),
    ("model.params.erase_steps", 0, "no erasing in the TMI loop", "deepmil/train.py train_one_epoch"),
    ("model.params.size_constraints", True, "use_size_const: true", "config_yaml/glas.yaml"),
    ("model.params.size_mode", "nonempty_pixels", "normalize_sz: false, epsilon: 0.0",
     "config_yaml/glas.yaml; criteria.py TrainLoss.size_const"),
    ("model.params.barrier_t0", 5.0, "init_t: 5.0", "config_yaml/glas.yaml"),
    ("model.params.barrier_growth", 1.01, "mulcoef: 1.01", "config_yaml/glas.yaml"),
    ("model.params.barrier_tmax", 10.0, "max_t: 10.0", "config_yaml/glas.yaml"),
    ("model.params.size_weight", 1.0, "total_loss + loss_sz_con", "deepmil/criteria.py forward_glas"),
    ("train.epochs", 80, "max_epochs: 80", "config_yaml/glas.yaml"),
    ("train.optimizer", "sgd", "optimizer.name: sgd", "config_yaml/glas.yaml"),
    ("train.lr", 0.001, "lr: 0.001", "config_yaml/glas.yaml"),
    ("train.momentum", 0.9, "momentum: 0.9", "config_yaml/glas.yaml"),
    ("train.nesterov", True, "nesterov: true", "config_yaml/glas.yaml"),
    ("train.weight_decay", 0.0001, "weight_decay: 0.0001", "config_yaml/glas.yaml"),
    ("train.schedule", "step", "lr_scheduler_name: mystep", "config_yaml/glas.yaml"),
    ("train.step_size", 10, "step_size: 10", "config_yaml/glas.yaml"),
    ("train.gamma", 0.9, "gamma: 0.9", "config_yaml/glas.yaml"),
    ("train.min_lr", 1e-7, "min_lr: 1.0e-07", "config_yaml/glas.yaml; deepmil/lr_scheduler.py MyStepLR"),
    ("train.grad_clip", None, "no clipping", "deepmil/train.py train_one_epoch"),
    ("train.select_metric", "val_error", "vl_acc >= best_val_acc", "main.py"),
    ("train.select_ties", "last", "vl_acc >= best_val_acc", "main.py"),
]

Y2019 = [
    ("seed", 0, "MYSEED: 0", "config_yaml/glas-4-erasing.yaml"),
    ("data.source", "glas", "dataset: glas", "config_yaml/glas-4-erasing.yaml"),
    ("data.classes", ["benign", "malignant"], "name_classes: {benign: 0, malignant: 1}",
     "config_yaml/glas-4-erasing.yaml"),
    ("data.patch_size", 480, "crop_size: [480, 480]", "config_yaml/glas-4-erasing.yaml"),
    ("data.batch_size", 8, "batch_size: 8", "config_yaml/glas-4-erasing.yaml"),
    ("data.augment.flip", True, "RandomHorizontalFlip + RandomVerticalFlip", "tools.py get_train_transforms_img"),
    ("data.augment.rot90", False, "no rotation for glas", "tools.py get_train_transforms_img"),
    ("data.augment.brightness_contrast", 0.5, "ColorJitter(0.5, 0.5, 0.5, 0.05)", "tools.py get_train_transforms_img"),
    ("data.augment.stain_jitter", 0.0, "no stain augmentation", "tools.py get_train_transforms_img"),
    ("model.method", "minmax_entropy", "deepmil.models.ResNet", "deepmil/models.py"),
    ("model.backbone", "resnet101", "model.name: resnet101", "config_yaml/glas-4-erasing.yaml"),
    ("model.pretrained", "imagenet", "pretrained: true", "config_yaml/glas-4-erasing.yaml"),
    ("model.output_stride", 32, "heads on x_32 (no dilation)", "deepmil/models.py ResNet.segment/classify"),
    ("model.params.modalities", 5, "modalities: 5", "config_yaml/glas-4-erasing.yaml"),
    ("model.params.kmax", 0.09, "kmax: 0.09", "config_yaml/glas-4-erasing.yaml"),
    ("model.params.kmin", 0.09, "kmin: 0.09", "config_yaml/glas-4-erasing.yaml"),
    ("model.params.alpha", 0.0, "alpha: 0.0", "config_yaml/glas-4-erasing.yaml"),
    ("model.params.dropout", 0.75, "dropout: 0.75", "config_yaml/glas-4-erasing.yaml"),
    ("model.params.sigmoid_w", 8.0, "w: 8", "config_yaml/glas-4-erasing.yaml"),
    ("model.params.sigmoid_sigma", 0.5, "sigma: 0.5", "config_yaml/glas-4-erasing.yaml"),
    ("model.params.mask_norm", "batch", "x.min()/x.max() over the batch", "deepmil/models.py get_pseudo_binary_mask"),
    ("model.params.cls_input_scale", 0.5, "scale: [0.5, 0.5]", "config_yaml/glas-4-erasing.yaml; models.py classify"),
    ("model.params.view_batches", "separate", "classify(x_pos); classify(x_neg)",
     "deepmil/train.py train_one_epoch, models.py forward"),
    ("model.params.fg_loss", True, "loss_pos = CE(scores_pos, labels)", "deepmil/criteria.py TotalLoss"),
    ("model.params.bg_loss", True, "loss_neg = -mean(LogSoftmax(scores_neg))", "deepmil/criteria.py TotalLoss"),
    ("model.params.loc_loss", True, "loss_class_head_seg(scores_seg, labels)", "deepmil/train.py train_one_epoch"),
    ("model.params.bg_weight", 1.0, "total_loss = loss_pos + loss_neg", "deepmil/criteria.py TotalLoss.forward"),
    ("model.params.detach_mask", True, "F.interpolate(...).detach()", "deepmil/models.py ResNet.segment"),
    ("model.params.erase_steps", 4, "nbr_times_erase: 4", "config_yaml/glas-4-erasing.yaml"),
    ("model.params.erase_mode", "accumulated", "data * (1 - m_pos) * (trust != 0) + data * (trust == 0)",
     "deepmil/train.py train_one_epoch"),
    ("model.params.erase_ce_check", True, "check_loss = l_c_s_tmp <= l_c_s_per_sample",
     "deepmil/train.py train_one_epoch"),
    ("model.params.erase_loss", "sum", "l_c_s_tmp.mean().backward() in every round", "deepmil/train.py train_one_epoch"),
    ("model.params.erase_start_epoch", 1, "epoch_start_erasing: 1", "config_yaml/glas-4-erasing.yaml"),
    ("model.params.size_constraints", False, "no size term", "deepmil/criteria.py TotalLoss"),
    ("train.epochs", 400, "max_epochs: 400", "config_yaml/glas-4-erasing.yaml"),
    ("train.optimizer", "sgd", "optimizer.name: sgd", "config_yaml/glas-4-erasing.yaml"),
    ("train.lr", 0.001, "lr: 0.001", "config_yaml/glas-4-erasing.yaml"),
    ("train.momentum", 0.9, "momentum: 0.9", "config_yaml/glas-4-erasing.yaml"),
    ("train.nesterov", True, "nesterov: true", "config_yaml/glas-4-erasing.yaml"),
    ("train.weight_decay", 1e-5, "weight_decay: 1.0e-05", "config_yaml/glas-4-erasing.yaml"),
    ("train.schedule", "step", "lr_scheduler.name: mystep", "config_yaml/glas-4-erasing.yaml"),
    ("train.step_size", 40, "step_size: 40", "config_yaml/glas-4-erasing.yaml"),
    ("train.gamma", 0.1, "gamma: 0.1", "config_yaml/glas-4-erasing.yaml"),
    ("train.min_lr", 1e-7, "min_lr: 1.0e-07", "config_yaml/glas-4-erasing.yaml; deepmil/lr_scheduler.py MyStepLR"),
    ("train.grad_clip", None, "no clipping", "deepmil/train.py train_one_epoch"),
    ("train.select_metric", "val_error", "error_vl <= best_val_error", "train_deepmil.py"),
    ("train.select_ties", "last", "error_vl <= best_val_error", "train_deepmil.py"),
]

PRESETS = {"pipelines/glas_tmi.yaml": TMI, "pipelines/glas_2019.yaml": Y2019}

# keys a preset may set that are not the authors' settings (paths, run bookkeeping, medwsol-only plumbing)
NOT_PAPER = {"name", "stages", "data.root", "data.manifest", "data.num_workers", "data.cache", "train.amp",
             "evaluate.splits", "evaluate.n_overlays", "tracking.uri", "tracking.experiment", "tracking.register_as"}


def _get(cfg, path: str):
    node = cfg
    for part in path.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _leaves(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and key != "data.classes":
            out |= _leaves(v, key)
        else:
            out.add(key)
    return out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_holds_every_author_value(preset, repo_root):
    cfg = load_config(repo_root / preset, check=False)
    wrong = []
    for path, expected, theirs, where in PRESETS[preset]:
        got = _get(cfg, path)
        if isinstance(expected, float):
            ok = isinstance(got, (int, float)) and math.isclose(float(got), expected, rel_tol=1e-12)
        else:
            ok = (str(got) if path == "model.pretrained" else got) == expected
        if not ok:
            wrong.append(f"{path}: {got!r} != {expected!r} (theirs: {theirs}, {where})")
    assert not wrong, "; ".join(wrong)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_value_is_in_its_table(preset, repo_root):
    data = yaml.safe_load((repo_root / preset).read_text())
    tabled = {row[0] for row in PRESETS[preset]}
    untabled = sorted(_leaves(data) - tabled - NOT_PAPER)
    assert not untabled, f"{preset} sets {untabled} without a row in tests/test_presets.py"


def test_own_recipe_says_it_is_not_a_paper_setting(repo_root):
    head = (repo_root / "pipelines/glas.yaml").read_text().split("name:")[0]
    assert "medwsol's own recipe" in head and "NOT any paper's setting" in head
    assert "glas_tmi.yaml" in head and "glas_2019.yaml" in head


@pytest.mark.parametrize("preset", ["pipelines/glas_tmi.yaml", "pipelines/glas_2019.yaml", "pipelines/glas.yaml"])
def test_preset_builds_its_model(preset, repo_root):
    """The params are accepted by the method (no download: the backbone is built without weights)."""
    from medwsol.methods.base import build_method

    cfg = load_config(repo_root / preset, check=False)
    m = build_method(cfg.model.method, num_classes=2, backbone="resnet18", output_stride=cfg.model.output_stride,
                     params=cfg.model.params)
    assert m.params.model_dump() == cfg.model.params
