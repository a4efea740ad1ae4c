"""Learned-Soup(+) (Wortsman et al.): softmax coefficients over all K resident models, trained by the one loop of
``soupkit.engine.loop.optimise`` (HL/MEHL, on the same loop: ``soupkit.methods.hyperplane``). With
``cfg.systems.parallel`` it runs data parallel on every rank of a process group (``soupkit.runtime.distributed``).
"""
from __future__ import annotations

import math

from torch import Tensor
from tqdm.auto import tqdm

from soupkit.config import SoupConfig
from soupkit.engine.batches import BatchStream
from soupkit.engine.layers import layer_map
from soupkit.engine.loop import SimplexSpace, optimise
from soupkit.methods.result import SoupResult
from soupkit.pool.basin import check_shared_basin
from soupkit.pool.checkpoint_pool import CheckpointPool
from soupkit.runtime.distributed import communicator

__all__ = ["learned_soup", "progress_bar", "check_basin_of"]

StateDict = dict[str, Tensor]


def progress_bar(cfg: SoupConfig, total: int, desc: str) -> tqdm:
    """The learned soups' bar over their ``total`` inner steps (off unless ``cfg.run.progress``)."""
    return tqdm(total=total, desc=desc, disable=not cfg.run.progress)


def learned_soup(model, pool, loader, cfg, layerwise: bool) -> SoupResult:
    """Learned-Soup(+) as Wortsman et al.: softmax coefficients over all K models held at once."""
    name = "learned+" if layerwise else "learned"
    algo, systems = cfg.algorithm, cfg.systems
    comm = communicator(systems.parallel)
    if comm is not None and comm.mode == "model":
        raise ValueError(f"{name!r} combines all K models in one graph; parallel='model' splits the model blocks "
                         "of HL/MEHL: use parallel='data'")
    layers = layer_map(model, layerwise, algo.layer_grouping)
    batches = BatchStream(loader, systems.device, algo.batch_size, comm.data_shard if comm is not None else None)
    steps = algo.inner_iterations or math.ceil(algo.epochs * batches.batches_per_epoch)
    models = [pool.load(i, systems.device, systems.dtype) for i in range(len(pool))]  # checks NaN/Inf of each
    basin = check_basin_of(pool, models, cfg)
    space = SimplexSpace(model, models, layers, algo.logit_scale, algo.clip_grad_norm, comm,
                         autocast=systems.autocast_dtype)
    history: list[float] = []
    with progress_bar(cfg, steps, name) as bar:
        w = optimise(space, space.w0, batches, steps, cfg, history, lambda loss: bar.update(1))
    coefficients = space.coefficients(w)
    params = {"logits": w} | ({"logit_scale": space.scale.detach()} if space.scale is not None else {})
    return SoupResult(name, layers.complete(space.state(w)), coefficients if layerwise else coefficients[:, 0],
                      list(layers.names) if layerwise else None, history=history, params=params,
                      stats={"epochs": batches.epochs, "inner_iterations": steps, "outer_iterations": 1,
                             "model_batch_size": len(pool), "basin_mean_cosine": basin})


def check_basin_of(pool: CheckpointPool, models: list[StateDict], cfg: SoupConfig) -> float | None:
    """check_shared_basin with the centre of the resident ``models`` (no read); its mean cosine for the stats."""
    if not cfg.run.check_basin or len(models) < 2:
        return None
    centre = {k: sum(m[k] for m in models) / len(models) for k, v in models[0].items() if v.is_floating_point()}
    return check_shared_basin(pool, centre).mean_cosine
