"""tokenmerge: faster Vision Transformers by merging tokens inside the network.

>>> import timm, tokenmerge
>>> model = timm.create_model("vit_small_patch16_224")
>>> tokenmerge.patch(model, method="tome", r=13)   # 41% fewer GFLOPs, no retraining
>>> tokenmerge.unpatch(model)                      # back to the original
"""

from .api import is_patched, patch, unpatch
from .backends.adapter import adapter_for
from .cascade import ConfidenceCascade
from .core.schedule import KeepRatio
from .dense import dense_features, unmerge_to_grid
from .evaluation.thresholds import calibrate_thresholds
from .evaluation.tune import tune
from .export import export_onnx, export_program
from .methods.dtem import load_merge_modules, save_merge_modules
from .methods import TokenReducer, TokenState, create_reducer, list_methods, register_method

__version__ = "0.1.0"

__all__ = [
    "ConfidenceCascade",
    "KeepRatio",
    "TokenReducer",
    "TokenState",
    "adapter_for",
    "calibrate_thresholds",
    "create_reducer",
    "dense_features",
    "export_onnx",
    "export_program",
    "is_patched",
    "list_methods",
    "load_merge_modules",
    "patch",
    "register_method",
    "save_merge_modules",
    "tune",
    "unmerge_to_grid",
    "unpatch",
    "__version__",
]
