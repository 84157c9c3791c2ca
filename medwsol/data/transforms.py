"""MONAI dictionary-transform chains for training and evaluation.

Records are MONAI data dicts ``{"image": path, "mask": path (optional),
"label": int, "name": str}`` (see :func:`medwsol.data.manifest.split_records`).
Both chains output plain tensors (no MetaTensor, so default collation and
``pin_memory`` work): ``image`` float32 ``[3, H, W]`` RGB in [0, 1], ``mask``
float32 ``[1, H, W]`` in {0, 1} when the record has one, ``label`` a long
scalar tensor; ``name`` passes through. Arrays are row-major (H = rows).

Readers (chosen by suffix, registered on MONAI's ``LoadImaged``):
:class:`PILImageReader` (PNG, BMP, JPEG, TIFF), :class:`Nibabel2DReader`
(NIfTI) and :class:`SimpleITKReader` (MetaImage ``.mha``/``.mhd``, NRRD). Like
MONAI's own readers they return x-first arrays (NIfTI/ITK convention: the first
axis is the image width); the chains transpose to ``[C, H, W]`` once after loading.

Example:
    >>> from medwsol.config import DataConfig
    >>> from medwsol.data.transforms import train_transforms
    >>> t = train_transforms(DataConfig(patch_size=64))
    >>> sample = t({"image": "img.png", "mask": "img_mask.png", "label": 1, "name": "img"})  # doctest: +SKIP
    >>> tuple(sample["image"].shape)  # doctest: +SKIP
    (3, 64, 64)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data.image_reader import ImageReader, NibabelReader, PILReader
from monai.data.utils import is_supported_format
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    RandFlipd,
    RandomizableTransform,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    SpatialPadd,
    Transform,
    Transposed,
)
from monai.utils import ensure_tuple
from monai.utils.type_conversion import convert_to_dst_type, convert_to_tensor

from medwsol.errors import DataError

__all__ = [
    "PILImageReader",
    "Nibabel2DReader",
    "SimpleITKReader",
    "EnsureRGB",
    "EnsureRGBd",
    "BinarizeMask",
    "BinarizeMaskd",
    "RandHEStainJitter",
    "RandHEStainJitterd",
    "load_transforms",
    "train_transforms",
    "eval_transforms",
]

KEYS = ("image", "mask")

# Ruifrok & Johnston stain vectors, as skimage.color.rgb_from_hed (rows: H, E, DAB; columns: R, G, B).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


# --------------------------------------------------------------------------------------------- readers


def _pil_to_rgb_mode(img):
    """PIL converter for images: palette, alpha, CMYK... -> RGB; grey and RGB are kept as they are."""
    if img.mode in ("RGB", "L", "I", "I;16", "F"):
        return img
    return img.convert("RGB")


def _decode_error(filename: Any, err: BaseException) -> DataError:
    """A reader's failure to decode pixel data (a header can be valid while the data are truncated)."""
    text = str(err).strip()
    reason = text.splitlines()[0][:160] if text else type(err).__name__
    return DataError(f"{filename}: cannot decode the image data ({reason}); fix: the file is truncated or corrupt, "
                     "re-export or re-copy it (or remove it from the manifest)")


class PILImageReader(PILReader):
    """MONAI's ``PILReader`` that also accepts ``.tif``/``.tiff``.

    Pixel data that cannot be decoded (a truncated file whose header is fine) raise a
    ``DataError`` naming the file.

    Args:
        converter: optional ``PIL.Image -> PIL.Image`` applied after opening.
        kwargs: passed to ``PILReader``.
    """

    suffixes = ("png", "jpg", "jpeg", "bmp", "tif", "tiff")

    def __init__(self, converter=None, **kwargs) -> None:
        super().__init__(converter=converter, reverse_indexing=True, **kwargs)

    def verify_suffix(self, filename) -> bool:
        return is_supported_format(filename, self.suffixes)

    def read(self, data, **kwargs):
        try:
            return super().read(data, **kwargs)
        except (OSError, ValueError, SyntaxError) as err:
            raise _decode_error(ensure_tuple(data)[0], err) from None

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        try:
            return super().get_data(img)
        except (OSError, ValueError, SyntaxError) as err:
            first = img[0] if isinstance(img, (list, tuple)) and img else img
            raise _decode_error(getattr(first, "filename", "image"), err) from None


class Nibabel2DReader(NibabelReader):
    """MONAI's ``NibabelReader`` for 2-D NIfTI (medwsol reads 2-D images only).

    A mask stored as ``(W, H, 1)`` (or an RGB image as ``(W, H, 1, 3)``) comes
    out as ``(W, H)`` (``(W, H, 3)``), and a 3-D ``(W, H, 3|4)`` array is read
    as an RGB(A) image, so that channel handling sees 2-D data.
    """

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        import zlib

        try:
            data, meta = super().get_data(img)
        except (OSError, EOFError, ValueError, zlib.error) as err:
            first = img[0] if isinstance(img, (list, tuple)) and img else img
            name = first.get_filename() if hasattr(first, "get_filename") else "image"
            raise _decode_error(name, err) from None
        shape = np.asarray(meta.get("spatial_shape", data.shape[:2]))
        if data.ndim >= 3 and data.shape[2] == 1 and len(shape) >= 3:
            data = data[:, :, 0]
            meta["spatial_shape"] = shape[:2]
        elif data.ndim == 3 and data.shape[2] in (3, 4) and len(shape) == 3:  # (W, H, RGB[A]) stored as 3-D
            meta["spatial_shape"] = shape[:2]
            meta["original_channel_dim"] = -1
        return data, meta


class SimpleITKReader(ImageReader):
    """A MONAI ``ImageReader`` backed by SimpleITK (MetaImage ``.mha``/``.mhd``, NRRD).

    MONAI's ``ITKReader`` needs the ``itk`` package; SimpleITK is what medwsol
    ships. Arrays are returned x-first like ``ITKReader`` (``(W, H[, C])`` for
    2-D; a 3-D image with one slice is returned as 2-D). Metadata: ``spacing``,
    ``origin``, ``direction``, ``affine`` (RAS), ``spatial_shape`` and
    ``original_channel_dim`` (``-1`` for vector pixels, else no channel).

    Example:
        >>> from monai.transforms import LoadImage
        >>> from medwsol.data.transforms import SimpleITKReader
        >>> img = LoadImage(reader=SimpleITKReader())("mask.mha")  # doctest: +SKIP
    """

    suffixes = ("mha", "mhd", "nrrd")

    def verify_suffix(self, filename) -> bool:
        return is_supported_format(filename, self.suffixes)

    def read(self, data, **kwargs):
        import SimpleITK as sitk

        imgs = []
        for name in ensure_tuple(data):
            try:
                imgs.append(sitk.ReadImage(str(name)))
            except RuntimeError as err:
                raise _decode_error(name, err) from None
        return imgs if len(imgs) > 1 else imgs[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        import SimpleITK as sitk

        arrays, meta = [], {}
        for im in img if isinstance(img, (list, tuple)) else [img]:  # a sitk.Image is itself iterable
            arr = np.array(sitk.GetArrayViewFromImage(im), copy=True)  # numpy order: [z,] y, x [, c]
            ncomp = im.GetNumberOfComponentsPerPixel()
            size = list(im.GetSize())
            spacing, origin = list(im.GetSpacing()), list(im.GetOrigin())
            ndim = im.GetDimension()
            direction = np.asarray(im.GetDirection(), dtype=float).reshape(ndim, ndim)
            if ndim == 3 and size[2] == 1:  # one slice: make it 2-D
                arr = arr[0]
                ndim, size, spacing, origin = 2, size[:2], spacing[:2], origin[:2]
                direction = direction[:2, :2]
            spatial = list(range(ndim))
            arr = np.transpose(arr, spatial[::-1] + ([ndim] if ncomp > 1 else []))  # -> x, y[, z][, c]
            affine = np.eye(ndim + 1)
            affine[:ndim, :ndim] = direction * np.asarray(spacing)
            affine[:ndim, ndim] = origin
            affine[: min(ndim, 2)] *= -1  # LPS -> RAS, as MONAI's ITKReader
            meta = {
                "spacing": np.asarray(spacing),
                "origin": np.asarray(origin),
                "direction": direction,
                "affine": affine,
                "original_affine": affine.copy(),
                "spatial_shape": np.asarray(size),
                "original_channel_dim": -1 if ncomp > 1 else float("nan"),
            }
            arrays.append(arr)
        if len(arrays) == 1:
            return arrays[0], meta
        meta["original_channel_dim"] = 0
        return np.stack(arrays, axis=0), meta


# --------------------------------------------------------------------------------------------- small transforms


class EnsureRGB(Transform):
    """``[C, H, W]`` -> ``[3, H, W]``: grey is repeated, grey+alpha and RGBA lose alpha.

    Raises:
        DataError: any other number of channels.
    """

    backend = [torch.Tensor, np.ndarray]

    def __call__(self, img):
        c = img.shape[0]
        if c == 3:
            return img
        if c in (1, 2):
            return img[:1].repeat(3, 1, 1) if isinstance(img, torch.Tensor) else np.repeat(img[:1], 3, axis=0)
        if c == 4:
            return img[:3]
        raise DataError(f"image with shape {tuple(img.shape)}: {c} channels; fix: give grey, RGB or RGBA images")


class EnsureRGBd(MapTransform):
    """Dictionary wrapper of :class:`EnsureRGB`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.op = EnsureRGB()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.op(d[key])
        return d


class BinarizeMask(Transform):
    """``[C, H, W]`` mask (binary, instance ids, RGB...) -> float32 ``[1, H, W]`` in {0, 1}: any channel > 0."""

    backend = [torch.Tensor]

    def __call__(self, img):
        t = convert_to_tensor(img, track_meta=False)
        return (t > 0).any(dim=0, keepdim=True).to(torch.float32)


class BinarizeMaskd(MapTransform):
    """Dictionary wrapper of :class:`BinarizeMask`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.op = BinarizeMask()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.op(d[key])
        return d


class RandHEStainJitter(RandomizableTransform):
    """Random H&E stain jitter in optical-density space (Tellez et al. 2018 style).

    The RGB image (in [0, 1]) is turned into optical density ``OD = -ln(I)``,
    unmixed into haematoxylin, eosin and residual (DAB) stain concentrations
    with the Ruifrok-Johnston matrix (``skimage.color.hed_from_rgb``), each
    concentration ``s`` becomes ``alpha * s + beta`` with ``alpha ~ U(1 - strength,
    1 + strength)`` and ``beta ~ U(-strength, strength)`` (in OD units, drawn per
    stain), and the result is mixed back and clipped to [0, 1]. Unlike a round
    trip through ``skimage.color.rgb2hed``/``hed2rgb`` no stain is clipped at 0,
    so ``alpha = 1, beta = 0`` gives back the image exactly.

    Args:
        strength: jitter amplitude (``data.augment.stain_jitter``); 0 disables.
        prob: probability of jittering an image.

    Example:
        >>> import torch
        >>> from medwsol.data.transforms import RandHEStainJitter
        >>> t = RandHEStainJitter(strength=0.05)
        >>> t.set_random_state(0)  # doctest: +ELLIPSIS
        <...RandHEStainJitter object at ...>
        >>> t(torch.rand(3, 8, 8)).shape
        torch.Size([3, 8, 8])
    """

    backend = [torch.Tensor]
    eps = 1e-6

    def __init__(self, strength: float = 0.05, prob: float = 1.0) -> None:
        RandomizableTransform.__init__(self, prob)
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        self.strength = float(strength)
        self.alpha = np.ones(3)
        self.beta = np.zeros(3)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform or self.strength == 0:
            self._do_transform = False
            return
        s = self.strength
        self.alpha = self.R.uniform(1.0 - s, 1.0 + s, size=3)
        self.beta = self.R.uniform(-s, s, size=3)

    def __call__(self, img, randomize: bool = True):
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        x = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        if x.shape[0] != 3:
            raise DataError(
                f"stain jitter needs an RGB [3, H, W] image, got {tuple(x.shape)}; fix: apply EnsureRGBd first"
            )
        od = -torch.log(x.clamp_min(self.eps)).reshape(3, -1)
        to_hed = torch.as_tensor(HED_FROM_RGB.T, dtype=od.dtype, device=od.device)
        to_rgb = torch.as_tensor(RGB_FROM_HED.T, dtype=od.dtype, device=od.device)
        stains = to_hed @ od
        alpha = torch.as_tensor(self.alpha, dtype=od.dtype, device=od.device)[:, None]
        beta = torch.as_tensor(self.beta, dtype=od.dtype, device=od.device)[:, None]
        out = torch.exp(-(to_rgb @ (stains * alpha + beta))).clamp(0.0, 1.0).reshape(x.shape)
        return convert_to_dst_type(out, img)[0]


class RandHEStainJitterd(RandomizableTransform, MapTransform):
    """Dictionary wrapper of :class:`RandHEStainJitter` (one draw shared by all keys).

    Args:
        keys: keys of RGB images.
        strength: jitter amplitude; 0 disables.
        prob: probability of jittering a sample.
        allow_missing_keys: don't raise when a key is missing.
    """

    backend = RandHEStainJitter.backend

    def __init__(
        self, keys: KeysCollection, strength: float = 0.05, prob: float = 1.0, allow_missing_keys: bool = False
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.jitter = RandHEStainJitter(strength=strength, prob=1.0)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.jitter.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        self.jitter.randomize()
        for key in self.key_iterator(d):
            d[key] = self.jitter(d[key], randomize=False)
        return d


# --------------------------------------------------------------------------------------------- chains


def _loader(key: str, image: bool) -> LoadImaged:
    load = LoadImaged(keys=key, image_only=True, dtype=np.float32, allow_missing_keys=not image)
    load.register(Nibabel2DReader())
    load.register(SimpleITKReader())
    load.register(PILImageReader(converter=_pil_to_rgb_mode if image else None))
    return load


def load_transforms() -> list[Transform]:
    """The deterministic head shared by both chains (cached by the datasets).

    Load (image RGB-converted by PIL when needed; mask raw) -> channel first ->
    transpose to ``[C, H, W]`` -> drop metadata -> image to 3 channels scaled
    0..255 -> [0, 1] (clipped) -> mask ``> 0`` as float ``[1, H, W]``.
    """
    keys = list(KEYS)
    return [
        _loader("image", image=True),
        _loader("mask", image=False),
        EnsureChannelFirstd(keys=keys, allow_missing_keys=True),
        Transposed(keys=keys, indices=(0, 2, 1), allow_missing_keys=True),  # x-first -> [C, H, W]
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False, allow_missing_keys=True),
        EnsureRGBd(keys="image"),
        ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
        BinarizeMaskd(keys="mask", allow_missing_keys=True),
    ]


def _finish() -> list[Transform]:
    return [
        EnsureTyped(keys=list(KEYS), dtype=torch.float32, track_meta=False, allow_missing_keys=True),
        EnsureTyped(keys="label", dtype=torch.long, track_meta=False),
    ]


def train_transforms(data_cfg, seed: int | None = 0) -> Compose:
    """The training chain: :func:`load_transforms`, then random patch and augmentations.

    After the head: ``SpatialPadd`` to ``patch_size`` (zeros, centred; only images
    smaller than the patch), ``RandSpatialCropd(patch_size)``; then, per
    ``data_cfg.augment``: ``RandFlipd`` on each axis (p=0.5), ``RandRotate90d``
    (p=0.5), :class:`RandHEStainJitterd` (``stain_jitter``, p=1), and
    ``RandScaleIntensityd``/``RandShiftIntensityd`` (``brightness_contrast``,
    p=0.5 each) followed by a clip to [0, 1]; ``EnsureTyped`` last.

    Args:
        data_cfg: a :class:`medwsol.config.DataConfig` (``patch_size``, ``augment``).
        seed: seed of the chain's random state (the data loader reseeds it per
            worker); None leaves it unseeded.

    Returns:
        A MONAI ``Compose``; samples have ``image [3, P, P]``, ``mask [1, P, P]``
        (when given), ``label`` (long scalar) and ``name``.

    Example:
        >>> from medwsol.config import DataConfig
        >>> from medwsol.data.transforms import train_transforms
        >>> chain = train_transforms(DataConfig(patch_size=96))
        >>> len(chain.transforms) > 5
        True
    """
    p = int(data_cfg.patch_size)
    aug = data_cfg.augment
    keys = list(KEYS)
    chain: list[Transform] = load_transforms() + [
        SpatialPadd(keys=keys, spatial_size=(p, p), mode="constant", allow_missing_keys=True),
        RandSpatialCropd(keys=keys, roi_size=(p, p), random_size=False, allow_missing_keys=True),
    ]
    if aug.flip:
        chain += [
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0, allow_missing_keys=True),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1, allow_missing_keys=True),
        ]
    if aug.rot90:
        chain.append(RandRotate90d(keys=keys, prob=0.5, max_k=3, spatial_axes=(0, 1), allow_missing_keys=True))
    if aug.stain_jitter > 0:
        chain.append(RandHEStainJitterd(keys="image", strength=aug.stain_jitter, prob=1.0))
    if aug.brightness_contrast > 0:
        b = float(aug.brightness_contrast)
        chain += [
            RandScaleIntensityd(keys="image", factors=b, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=b, prob=0.5),
            ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),  # clip
        ]
    chain += _finish()
    compose = Compose(chain)
    if seed is not None:
        compose.set_random_state(seed=seed)
    return compose


def eval_transforms(data_cfg=None) -> Compose:
    """The evaluation chain: :func:`load_transforms` then ``EnsureTyped``; deterministic.

    The full image is kept: no crop and no padding (the evaluator pads batches
    itself to a multiple of ``data.eval_pad_to``).

    Args:
        data_cfg: a :class:`medwsol.config.DataConfig` (unused today; kept so both
            factories take the same argument).

    Example:
        >>> from medwsol.data.transforms import eval_transforms
        >>> chain = eval_transforms()
        >>> sample = chain({"image": "img.png", "label": 0, "name": "img"})  # doctest: +SKIP
    """
    return Compose(load_transforms() + _finish())

