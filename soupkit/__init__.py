"""soupkit: learned model soups on one GPU (MEHL-Soup, ECCV 2024), with every baseline of the paper.

>>> import soupkit
>>> sorted(soupkit.METHODS)[:3]
['best', 'ensemble', 'greedy']
"""
from .numerics import pin_cpu_numerics

pin_cpu_numerics()  # before anything below imports torch (see soupkit/numerics.py)

from .config import DEFAULTS, SoupConfig
from .evaluation import evaluate, predict
from .layers import LayerMap, layer_map
from .errors import CheckpointError, DataError, DivergenceError, ResumeError, SharedBasinWarning, SoupkitError
from .memory import PeakMemory
from .methods import METHODS, SoupResult, make_soup
from .pool import CheckpointPool, check_shared_basin, load_state_dict, save_state_dict

__version__ = "0.1.0"

__all__ = [
    "CheckpointPool", "CheckpointError", "METHODS", "make_soup", "SoupResult", "SoupConfig", "DEFAULTS",
    "evaluate", "predict", "layer_map", "LayerMap", "PeakMemory", "DivergenceError", "save_state_dict",
    "load_state_dict", "SoupkitError", "DataError", "ResumeError", "SharedBasinWarning", "check_shared_basin",
]
