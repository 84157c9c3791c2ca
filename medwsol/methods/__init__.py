"""Localization methods and backbones.

Importing this package is torch-free (config validation imports the catalog):
it re-exports the registries and parameter models only. The ``nn.Module``
classes live in their own modules (``cam``, ``gradcam``, ``minmax``,
``backbones``, ...), imported lazily by ``METHODS.get(name)`` /
``BACKBONES.get(name)`` or explicitly, e.g.
``from medwsol.methods.base import build_method``.
"""

from medwsol.methods.catalog import (
    BACKBONES,
    METHOD_PARAMS,
    METHODS,
    CAMParams,
    GradCAMParams,
    MinMaxParams,
    NoParams,
    WeightMapCEParams,
    WeightMapTripletParams,
)

__all__ = [
    "METHODS",
    "METHOD_PARAMS",
    "BACKBONES",
    "NoParams",
    "CAMParams",
    "GradCAMParams",
    "MinMaxParams",
    "WeightMapCEParams",
    "WeightMapTripletParams",
]
