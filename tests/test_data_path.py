"""The MONAI data path: readers, transform chains, stain jitter, datasets and loaders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from medwsol.config import AugmentConfig, DataConfig
from medwsol.data.datasets import collate_batch, make_dataset, make_loader
from medwsol.data.transforms import RandHEStainJitter, RandHEStainJitterd, eval_transforms, train_transforms
from medwsol.errors import DataError

H, W = 40, 56  # non-square, so a transposed read would show


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _image(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


def _mask(h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[4:15, 6:30] = 2  # an instance id, not 1
    m[20:, 40:] = 1
    return m


def _write_mask(path: Path, m: np.ndarray) -> None:
    name = path.name
    if name.endswith((".png", ".bmp")):
        Image.fromarray(m).save(path)
    elif name.endswith(".nii.gz"):  # NIfTI/ITK convention: first axis = x (width)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(m.T), np.eye(4)), str(path))
    else:
        sitk.WriteImage(sitk.GetImageFromArray(m), str(path))


@pytest.fixture()
def files(tmp_path):
    img = _image()
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img).save(tmp_path / "a.bmp")
    m = _mask()
    for name in ("m.png", "m.bmp", "m.nii.gz", "m.mha"):
        _write_mask(tmp_path / name, m)
    return tmp_path, img, m


CFG = DataConfig(patch_size=32, cache="none")


@pytest.mark.parametrize("image", ["a.png", "a.bmp"])
@pytest.mark.parametrize("mask", ["m.png", "m.bmp", "m.nii.gz", "m.mha"])
def test_eval_shapes_ranges_alignment(files, image, mask):
    folder, img, m = files
    s = eval_transforms(CFG)({"image": str(folder / image), "mask": str(folder / mask), "label": 1, "name": "a"})
    assert type(s["image"]) is torch.Tensor and type(s["mask"]) is torch.Tensor  # no MetaTensor
    assert s["image"].dtype == torch.float32 and tuple(s["image"].shape) == (3, H, W)
    assert 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
    np.testing.assert_allclose(s["image"].permute(1, 2, 0).numpy() * 255, img, atol=1e-3)
    assert s["mask"].dtype == torch.float32 and tuple(s["mask"].shape) == (1, H, W)
    assert set(s["mask"].unique().tolist()) == {0.0, 1.0}
    assert np.array_equal(s["mask"][0].numpy() > 0, m > 0)
    assert s["label"].dtype == torch.long and s["label"].ndim == 0 and int(s["label"]) == 1
    assert s["name"] == "a"


def test_grey_rgba_and_nifti_images_become_rgb(tmp_path):
    img = _image()
    Image.fromarray(img[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([img, np.full((H, W), 128, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(img).convert("P").save(tmp_path / "palette.png")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(img.transpose(1, 0, 2)), np.eye(4)), str(tmp_path / "rgb.nii.gz"))
    t = eval_transforms(CFG)
    grey = t({"image": str(tmp_path / "grey.png"), "label": 0, "name": "g"})["image"]
    assert tuple(grey.shape) == (3, H, W) and torch.equal(grey[0], grey[2])
    rgba = t({"image": str(tmp_path / "rgba.png"), "label": 0, "name": "r"})["image"]
    np.testing.assert_allclose(rgba.permute(1, 2, 0).numpy() * 255, img, atol=1e-3)
    pal = t({"image": str(tmp_path / "palette.png"), "label": 0, "name": "p"})["image"]
    assert tuple(pal.shape) == (3, H, W)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(_mask().T[..., None]), np.eye(4)), str(tmp_path / "m.nii.gz"))
    nii = t({"image": str(tmp_path / "rgb.nii.gz"), "mask": str(tmp_path / "m.nii.gz"), "label": 0, "name": "n"})
    np.testing.assert_allclose(nii["image"].permute(1, 2, 0).numpy() * 255, img, atol=1e-3)
    assert np.array_equal(nii["mask"][0].numpy() > 0, _mask() > 0)  # (W, H, 1) NIfTI mask
    assert "mask" not in t({"image": str(tmp_path / "rgb.nii.gz"), "label": 0, "name": "n"})


def test_small_image_padded_then_cropped(files):
    folder, img, m = files
    cfg = DataConfig(patch_size=64, cache="none")  # bigger than 40 x 56
    t = train_transforms(cfg, seed=3)
    s = t({"image": str(folder / "a.png"), "mask": str(folder / "m.png"), "label": 0, "name": "a"})
    assert tuple(s["image"].shape) == (3, 64, 64) and tuple(s["mask"].shape) == (1, 64, 64)
    assert 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
    assert int(s["mask"].sum()) == int((m > 0).sum())  # padding adds no foreground, crop keeps it all
    assert set(s["mask"].unique().tolist()) <= {0.0, 1.0}
    big = train_transforms(DataConfig(patch_size=32, cache="none"), seed=0)
    s = big({"image": str(folder / "a.png"), "label": 0, "name": "a"})
    assert tuple(s["image"].shape) == (3, 32, 32) and "mask" not in s


def test_train_crop_keeps_image_and_mask_aligned(tmp_path):
    # the mask is the image's red channel thresholded: every random crop/flip/rotation must keep that relation
    img = _image(48, 48, seed=5)
    Image.fromarray(img).save(tmp_path / "i.png")
    Image.fromarray((img[..., 0] > 127).astype(np.uint8)).save(tmp_path / "m.png")
    aug = AugmentConfig(stain_jitter=0.0, brightness_contrast=0.0)
    t = train_transforms(DataConfig(patch_size=32, augment=aug), seed=1)
    for _ in range(4):
        s = t({"image": str(tmp_path / "i.png"), "mask": str(tmp_path / "m.png"), "label": 0, "name": "i"})
        assert torch.equal(s["mask"][0] > 0, s["image"][0] * 255 > 127.5)


def test_train_chain_seeded_and_eval_deterministic(files):
    folder, _, _ = files
    rec = {"image": str(folder / "a.png"), "mask": str(folder / "m.mha"), "label": 0, "name": "a"}
    a = [train_transforms(CFG, seed=7)(rec) for _ in range(1)] + [train_transforms(CFG, seed=7)(rec)]
    assert torch.equal(a[0]["image"], a[1]["image"]) and torch.equal(a[0]["mask"], a[1]["mask"])
    t = train_transforms(CFG, seed=7)
    assert not torch.equal(t(rec)["image"], t(rec)["image"])  # it does augment
    e = eval_transforms(CFG)
    x, y = e(rec), e(rec)
    assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])


def test_stain_jitter():
    img = torch.rand(3, 16, 16) * 0.9 + 0.05
    off = RandHEStainJitter(strength=0.0)
    assert torch.equal(off(img), img)
    ident = RandHEStainJitter(strength=0.2)
    ident.randomize()
    ident.alpha, ident.beta = np.ones(3), np.zeros(3)
    assert torch.allclose(ident(img, randomize=False), img, atol=1e-5, rtol=0)  # exact OD round trip
    jit = RandHEStainJitter(strength=0.2).set_random_state(0)
    out = jit(img)
    assert out.shape == img.shape and out.dtype == torch.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 1 and not torch.allclose(out, img, atol=1e-3)
    # more haematoxylin darkens the image (OD of all channels grows)
    darker = RandHEStainJitter(strength=0.2)
    darker.randomize()
    darker.alpha, darker.beta = np.array([1.2, 1.0, 1.0]), np.zeros(3)
    assert float(darker(img, randomize=False).mean()) < float(img.mean())
    d1 = RandHEStainJitterd("image", strength=0.1).set_random_state(5)({"image": img})["image"]
    d2 = RandHEStainJitterd("image", strength=0.1).set_random_state(5)({"image": img})["image"]
    assert torch.equal(d1, d2) and not torch.equal(d1, img)
    np_out = RandHEStainJitter(strength=0.1).set_random_state(1)(img.numpy())
    assert isinstance(np_out, np.ndarray) and np_out.shape == (3, 16, 16)


def _records(folder: Path, n: int = 6, masks: bool = True) -> list[dict]:
    recs = []
    for i in range(n):
        Image.fromarray(_image(H, W, seed=i)).save(folder / f"i{i}.png")
        rec = {"image": str(folder / f"i{i}.png"), "label": i % 2, "name": f"i{i}"}
        if masks:
            Image.fromarray(_mask()).save(folder / f"m{i}.png")
            rec["mask"] = str(folder / f"m{i}.png")
        recs.append(rec)
    return recs


def test_cache_modes_yield_identical_eval_samples(tmp_path):
    recs = _records(tmp_path, n=3)
    cache_dir = tmp_path / "cache"
    samples = {}
    for mode in ("none", "cache", "persistent"):
        cfg = DataConfig(cache=mode, cache_dir=cache_dir if mode == "persistent" else None, num_workers=0)
        ds = make_dataset(recs, eval_transforms(cfg), cfg)
        samples[mode] = [ds[i] for i in range(len(ds))]
    assert len(list(cache_dir.glob("*.pt"))) == 3
    ds_again = make_dataset(recs, eval_transforms(CFG), DataConfig(cache="persistent"), cache_dir=cache_dir)
    samples["persistent, from disk"] = [ds_again[i] for i in range(3)]
    for mode, got in samples.items():
        for a, b in zip(samples["none"], got):
            assert set(a) == set(b), mode
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"]), mode
            assert int(a["label"]) == int(b["label"]) and a["name"] == b["name"], mode
    # a different transform prefix (padding size) gets its own cache entries
    train = train_transforms(DataConfig(patch_size=64))
    ds_train = make_dataset(recs, train, DataConfig(cache="persistent"), cache_dir)
    assert tuple(ds_train[0]["image"].shape) == (3, 64, 64)
    assert len(list(cache_dir.glob("*.pt"))) == 4
    with pytest.raises(DataError, match="data.cache_dir: not set while data.cache is 'persistent'"):
        make_dataset(recs, eval_transforms(CFG), DataConfig(cache="persistent"))


def test_loader_batches_and_seeding(tmp_path):
    recs = _records(tmp_path, n=6)
    cfg = DataConfig(patch_size=32, cache="cache")
    ds = make_dataset(recs, train_transforms(cfg), cfg)
    loader = make_loader(ds, batch_size=4, shuffle=True, num_workers=0, seed=0)
    batch = next(iter(loader))
    assert set(batch) == {"image", "mask", "label", "name"}
    assert type(batch["image"]) is torch.Tensor
    assert tuple(batch["image"].shape) == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert tuple(batch["mask"].shape) == (4, 1, 32, 32)
    assert tuple(batch["label"].shape) == (4,) and batch["label"].dtype == torch.long
    assert isinstance(batch["name"], list) and len(batch["name"]) == 4
    assert all(isinstance(n, str) for n in batch["name"])
    assert [len(b["name"]) for b in loader] == [4, 2]
    assert len(list(make_loader(ds, 4, True, 0, 0, drop_last=True))) == 1

    def run(seed: int, workers: int) -> list[torch.Tensor]:
        d = make_dataset(recs, train_transforms(cfg), cfg)
        return [b["image"] for b in make_loader(d, 3, True, workers, seed)]

    a, b, c = run(1, 0), run(1, 0), run(2, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    w1, w2 = run(1, 1), run(1, 1)  # one worker process, seeded through worker_init_fn
    assert all(torch.equal(x, y) for x, y in zip(w1, w2))


def test_collate_drops_keys_not_in_every_sample(tmp_path):
    with_mask = _records(tmp_path, n=1)[0]
    without = {k: v for k, v in with_mask.items() if k != "mask"}
    t = train_transforms(CFG)
    batch = collate_batch([t(with_mask), t(without)])
    assert set(batch) == {"image", "label", "name"} and tuple(batch["image"].shape) == (2, 3, 32, 32)


def test_package_import_is_light():
    code = (
        "import sys, medwsol.data, medwsol.data.glas, medwsol.data.manifest;"
        "assert medwsol.data.load_manifest is medwsol.data.manifest.load_manifest;"
        "heavy = [m for m in ('torch', 'monai', 'sklearn') if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
