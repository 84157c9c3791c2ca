"""The MLflow pyfunc model of a medwsol model package ("models from code": nothing is pickled).

``medwsol.tracking.MLflowTracker.log_package`` logs this file as the ``python_model`` with the package
folder as the artifact ``package``; MLflow runs this file when it loads the model, and
:meth:`MedwsolPackageModel.load_context` rebuilds the network from the package (safetensors
weights, JSON config). So ``mlflow.pyfunc.load_model("models:/<name>@champion")`` works with
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``, and ``mlflow models serve`` answers requests.

``predict(tiles)``: a batch of RGB tiles, ``[B, H, W, 3]`` uint8 (0-255) or float in [0, 1]
(a single tile ``[H, W, 3]`` is accepted), returns ``{"probs": [B, C], "weight_map": [B, H, W],
"score": [B, H, W]}`` as float32 arrays: class probabilities (order: the package's ``classes``),
the calibrated weight map and the served score that the package's ``tau`` thresholds.
"""

from __future__ import annotations


import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

__all__ = ["MedwsolPackageModel"]


class MedwsolPackageModel(PythonModel):
    """Serves a model package: probabilities, weight maps and scores for batches of RGB tiles."""

    # predict takes tensors (uint8 tiles), which the signature logged with the model describes and MLflow's
    # type-hint validation does not: opt out of the latter, and of its "add type hints" warning at import
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from medwsol.engine.served import served_from_package
        from medwsol.package import load_package

        self.package = load_package(context.artifacts["package"])
        self.served = served_from_package(self.package).eval()

    def predict(self, context, model_input, params=None):
        import torch

        x = model_input
        if isinstance(x, dict):  # named tensor input {"tiles": array}
            x = next(iter(x.values()))
        if hasattr(x, "to_numpy"):  # a DataFrame of one column of arrays
            x = np.stack([np.asarray(v) for v in x.iloc[:, 0]])
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected RGB tiles [B, H, W, 3], got shape {tuple(x.shape)}")
        t = torch.from_numpy(np.ascontiguousarray(x))
        t = t.float().div_(255.0) if x.dtype == np.uint8 else t.float()
        with torch.inference_mode():
            probs, weight, score = self.served(t.permute(0, 3, 1, 2).contiguous())
        return {"probs": probs.numpy(), "weight_map": weight[:, 0].numpy(), "score": score[:, 0].numpy()}


mlflow.models.set_model(MedwsolPackageModel())
