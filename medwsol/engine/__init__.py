"""Engines that run models: training, evaluation, whole-slide inference.

Import the submodules directly (``from medwsol.engine.infer import infer_cohort``); this package
imports nothing itself, so ``import medwsol.engine`` stays free of torch and MONAI.
"""

__all__ = ["evaluate", "infer", "runtime", "served", "train"]
