"""soupkit: learned model soups on one GPU (MEHL-Soup, ECCV 2024), with every baseline of the paper.

>>> import soupkit
>>> sorted(soupkit.METHODS)[:3]
['best', 'ensemble', 'greedy']
"""
from soupkit.runtime.numerics import pin_cpu_numerics

pin_cpu_numerics()  # before anything below imports torch (see soupkit/runtime/numerics.py)

from soupkit.config import SoupConfig
from soupkit.engine.evaluation import predict
from soupkit.engine.layers import LayerMap, layer_map
from soupkit.errors import CheckpointError, DataError, DivergenceError, ResumeError, SharedBasinWarning, SoupkitError
from soupkit.methods.registry import DEFAULTS, METHODS, make_soup, register
from soupkit.methods.result import evaluate, SoupResult
from soupkit.pool.basin import check_shared_basin
from soupkit.pool.checkpoint_pool import CheckpointPool
from soupkit.pool.formats import load_state_dict, save_state_dict
from soupkit.runtime.memory import PeakMemory

__version__ = "0.1.0"

__all__ = [
    "CheckpointPool", "CheckpointError", "METHODS", "make_soup", "register", "SoupResult", "SoupConfig", "DEFAULTS",
    "evaluate", "predict", "layer_map", "LayerMap", "PeakMemory", "DivergenceError", "save_state_dict",
    "load_state_dict", "SoupkitError", "DataError", "ResumeError", "SharedBasinWarning", "check_shared_basin",
]
