"""The GPU path (marked ``gpu``: skipped without CUDA; ``make test-all`` or ``pytest -m gpu`` on a GPU machine).

* slide inference on CUDA with bf16/fp16 autocast, pinned memory, several reader workers and the
  lagged (non-syncing) stitching gives the heatmap of the fp32 CPU run, within autocast's precision;
* one training step on CUDA under AMP changes the weights and keeps the loss finite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medwsol.config import DataConfig, PipelineConfig, SlidesConfig
from medwsol.engine.served import ServedModel
from medwsol.methods.base import build_method

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    from medwsol.data.synthetic_slide import make_synthetic_slide

    return make_synthetic_slide(tmp_path_factory.mktemp("gpu") / "s.tif", width=3072, height=2048, mpp=0.5,
                                seed=3)["tif"]


def _served(method: str = "minmax_entropy") -> ServedModel:
    torch.manual_seed(0)
    net = build_method(method, num_classes=2, output_stride=8).eval()
    return ServedModel(net, ["normal", "tumour"], "tumour", "weight_x_prob",
                       map_range=(0.0, 1.0) if net.normalizes_per_image else None, tau=0.5)


@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_slide_on_cuda_matches_cpu(tmp_path, slide, amp):
    from medwsol.engine.infer import infer_slide, load_heatmap

    cfg = SlidesConfig(target_mpp=1.0, tile_size=128, overlap=32, output_mpp=4.0, batch_size=32, num_workers=4)
    cpu = infer_slide(_served(), slide, cfg, tmp_path / "cpu", "cpu", progress=False, amp="off")
    gpu = infer_slide(_served(), slide, cfg, tmp_path / "gpu", "cuda", progress=False, amp=amp)
    assert gpu["status"] == "ok" and gpu["tiles"] == cpu["tiles"] > 20
    hc, cc, _ = load_heatmap(Path(cpu["outputs"]))
    hg, cg, meta = load_heatmap(Path(gpu["outputs"]))
    assert np.array_equal(np.asarray(cc), np.asarray(cg))
    diff = np.abs(np.asarray(hc) - np.asarray(hg))
    assert float(diff.mean()) < 0.02 and float(np.quantile(diff, 0.99)) < 0.1
    import pandas as pd

    tc, tg = pd.read_csv(Path(cpu["outputs"]) / "tiles.csv"), pd.read_csv(Path(gpu["outputs"]) / "tiles.csv")
    assert (tc["pred"] == tg["pred"]).mean() > 0.95  # every tile's row written (the last lagged batch too)
    assert tg["prob_tumour"].notna().all()


def test_one_training_step_on_cuda(tmp_path):
    from medwsol.data.manifest import load_manifest, split_records
    from medwsol.data.synthetic import make_synthetic_dataset
    from medwsol.engine.runtime import amp_dtype, autocast, to_device

    man = make_synthetic_dataset(tmp_path / "d", n_images=16, size=96, seed=0)
    cfg = PipelineConfig(name="gpu", data=DataConfig(manifest=man, patch_size=64, batch_size=8))
    df = load_manifest(man, list(cfg.data.classes))
    from medwsol.data.datasets import make_dataset, make_loader
    from medwsol.data.transforms import train_transforms

    ds = make_dataset(split_records(df, "train"), train_transforms(cfg.data), cfg.data)
    batch = next(iter(make_loader(ds, batch_size=8, shuffle=True, num_workers=2, seed=0)))
    dev = torch.device("cuda")
    dtype = amp_dtype(dev, "auto")
    assert dtype in (torch.bfloat16, torch.float16)
    model = build_method("minmax_entropy", num_classes=2, output_stride=8,
                         params={"size_constraints": True}).to(dev).to(memory_format=torch.channels_last)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    b = to_device(batch, dev, channels_last=True)
    assert b["image"].is_cuda
    with autocast(dev, dtype):
        losses = model.loss(b)
    assert torch.isfinite(losses["total"])
    scaler.scale(losses["total"]).backward()
    scaler.step(opt)
    scaler.update()
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert changed
