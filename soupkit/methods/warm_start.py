"""Warm starts: grow a finished MEHL-Soup(+) result with new checkpoints (``make_soup("mehl+", model, pool, loader,
warm_start=previous)``, ``python -m soupkit mehl+ --extend RUN_DIR``).

**The start point.** Per layer l (model-wise: L = 1). The previous result over K_old models holds its soup θ_old
and its coefficients w[i, l], the weight on θ_i (``SoupResult.coefficients``, whatever the HL/MEHL variant):
θ_old = Σ_{i<K_old} w_i θ_i, with Σ_i w_i = 1 for every layer (floating buffers mixed as everywhere, with their
module's layer or the mean over layers). Its own α_old, about θ̄_old, is one of a line of representations of
that point: α and α + c·1 give the same soup, because Σ_i (θ_i − θ̄) = 0; w = α_old + (1 − Σ_i α_old,i)/K_old.

The new pool is the K_old models first (the same files, checked) and K_new new ones, θ̄ = (1/K) Σ_{i<K} θ_i,
K = K_old + K_new. Every α gives θ(α) = θ̄ + Σ_{i<K} α_i (θ_i − θ̄) = Σ_i (α_i + (1 − Σ_j α_j)/K) θ_i, so

    α_start,i = w_i  (i < K_old),      α_start,j = 0  (the K_new new models)

has Σ_j α_start,j = 1: the centre's term vanishes and θ(α_start) = Σ_i w_i θ_i = θ_old, whatever θ̄ is. In the
old frame this is α_old translated along 1 by (1 − Σ α_old)/K_old (the one move that leaves θ_old where it is),
and each new model starts at α = 0. The weight on θ_i then stays w_start = (w, 0, ..., 0), and every later block
keeps the invariant weight_i = α_i + (1 − Σ_j α_j)/K of the fixed-centre loop. Variants:

* ``decentralize=False`` (β, soup Σ_i β_i θ_i): β_start = (w, 0) -- no sum constraint.
* ``recenter`` (``mehl+released``): directions θ_i − soup and each block's α from 0, so the start is the soup
  θ_old itself and nothing needs converting (the new run's first block is centred on θ_old, not on a block mean).

The run starts from the saved θ_old itself (bit for bit), not from the sum recomputed. That sum is still formed,
in the centre pass that reads every model anyway (one model resident), and must match θ_old to
:data:`RESIDUAL_TOLERANCE` of ‖θ_old‖: otherwise the soup and the coefficients do not belong to these models.
Before it, each old model's content fingerprint (size, :func:`~soupkit.pool.checkpoint_pool.sample_digest`,
squared norm, recorded by every HL/MEHL run in ``stats["pool_models"]``) is compared with the pool's.

**The blocks** (``soupkit.methods.hyperplane``): the first blocks visit the new models, ``extend_passes`` times,
each still b models (new ones plus old ones to fill); old models' α change only in a block that holds them.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from soupkit.errors import CheckpointError, WarmStartError
from soupkit.methods.result import SoupResult
from soupkit.pool.checkpoint_pool import CheckpointPool

__all__ = ["Previous", "read_previous", "pool_models", "check_models", "start_weights", "SoupCheck",
           "RESIDUAL_TOLERANCE"]

StateDict = dict[str, Tensor]

# ‖Σ_i w_i θ_i − θ_old‖ / ‖θ_old‖ above this: the soup is not the sum of these models. A run's in-place moves of
# the soup leave ~1e-7 of ‖θ_old‖ (float32); bf16 directions ~1e-5; a different fine-tune among the old models
# ~w_i ‖θ_i − θ_j‖ / ‖θ‖, 1e-4 and above for fine-tunes of one pretrained model (the fingerprints catch it first)
RESIDUAL_TOLERANCE = 1e-4
_SUM_TOLERANCE = 1e-4  # |Σ_i w_i − 1| of a point on the hyperplane, after the old run's float32 bookkeeping


@dataclass(frozen=True)
class Previous:
    """A finished HL/MEHL result to grow.

    Attributes:
        name: its method.
        soup: its weights θ_old (all keys, aliases included).
        coefficients: ``[K_old, L]`` weight on each θ_i (model-wise: L = 1).
        layer_names: its L layers ("+" methods), else None.
        models: ``stats["pool_models"]``: per model ``{"name", "bytes", "sq_norm", "digest"}``.
        source: the folder it was read from (None: a SoupResult in memory).
        digest: 16 hex digits of sha256 of its coefficients and soup (the provenance a new run_dir records).
    """

    name: str
    soup: StateDict
    coefficients: Tensor
    layer_names: list[str] | None
    models: list[dict]
    source: str | None
    digest: str

    @property
    def k(self) -> int:
        """K_old."""
        return len(self.coefficients)

    def provenance(self) -> dict[str, Any]:
        """What a run extending this result records (``run.json``'s ``extends``, ``stats["extends"]``)."""
        return {"from": self.source, "method": self.name, "models": self.k, "result": self.digest}


def _result_dir(path: Path) -> Path:
    """The folder holding ``result.json``: ``path`` itself (``SoupResult.save``, the CLI's ``--out``) or its
    ``result/`` (a ``run_dir``)."""
    if (path / "result.json").is_file():
        return path
    if (path / "result" / "result.json").is_file():
        return path / "result"
    if (path / "state.safetensors").is_file():
        raise WarmStartError(f"{path}: the run in this run_dir has not finished (no result/ yet); run it again "
                             "with the same command to finish it, then extend it")
    raise WarmStartError(f"{path}: neither a saved result (result.json) nor the run_dir of a finished run "
                         "(result/result.json)")


def read_previous(warm_start: SoupResult | str | os.PathLike) -> Previous:
    """The result ``warm_start`` names: a :class:`SoupResult`, the folder it was saved to, or a run_dir.

    Raises:
        WarmStartError: not found, not finished, or not an HL/MEHL result (no soup, no ``pool_models``).
    """
    source = None
    if isinstance(warm_start, SoupResult):
        result = warm_start
    elif isinstance(warm_start, (str, os.PathLike)):
        path = Path(warm_start)
        if not path.is_dir():
            raise WarmStartError(f"warm_start={str(warm_start)!r}: no such folder")
        folder = _result_dir(path)
        try:
            result = SoupResult.load(folder)
        except (CheckpointError, OSError, KeyError, ValueError) as err:
            raise WarmStartError(f"{folder}: the result cannot be read ({err})") from err
        source = str(path.resolve())  # provenance that names the folder wherever the new run starts from
    else:
        raise WarmStartError(f"warm_start takes a SoupResult, a saved result's folder or a run_dir, not "
                             f"{type(warm_start).__name__}")
    models = result.stats.get("pool_models")
    if result.state_dict is None or not isinstance(models, list):
        raise WarmStartError(f"{source or 'the warm_start result'} ({result.name!r}) is not an HL/MEHL result of "
                             "this soupkit (it records no soup or no stats['pool_models']); only those can be grown")
    coefficients = result.coefficients.detach().cpu()
    coefficients = coefficients.reshape(len(coefficients), -1)
    if len(coefficients) != len(models):
        raise WarmStartError(f"{source or 'the warm_start result'}: {len(coefficients)} coefficients but "
                             f"{len(models)} models in stats['pool_models']")
    h = hashlib.sha256(coefficients.to(torch.float64).numpy().tobytes())
    for key in sorted(result.state_dict):
        h.update(key.encode())
        h.update(result.state_dict[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return Previous(result.name, result.state_dict, coefficients, result.layer_names, models, source,
                    h.hexdigest()[:16])


def pool_models(pool: CheckpointPool) -> list[dict]:
    """Per model of ``pool``: file name, size, squared norm and content digest (read unless already known)."""
    out = []
    for i, src in enumerate(pool.sources):
        is_file = not isinstance(src, Mapping)
        out.append({"name": Path(src).name if is_file else pool.names[i],
                    "bytes": Path(src).stat().st_size if is_file else None,
                    "sq_norm": sum(pool.model_sq_norms(i).values()), "digest": pool.model_digest(i)})
    return out


def check_models(previous: Previous, pool: CheckpointPool) -> None:
    """Raise unless ``pool`` begins with ``previous``'s K_old models: same size (files), same content digest,
    squared norm within 1e-5. Every model must have been read once (the centre pass).

    Raises:
        WarmStartError: naming the first model that differs.
    """
    where = previous.source or "the warm_start result"
    now = pool_models(pool)[:previous.k]
    for i, (was, new) in enumerate(zip(previous.models, now)):
        what = None
        if was.get("bytes") is not None and new["bytes"] is not None and was["bytes"] != new["bytes"]:
            what = f"{new['bytes']} bytes, was {was['bytes']}"
        elif was.get("digest") != new["digest"]:
            what = f"content digest {new['digest']}, was {was.get('digest')}"
        elif not math.isclose(new["sq_norm"], was.get("sq_norm", float("nan")), rel_tol=1e-5):
            what = f"squared norm {new['sq_norm']:.6g}, was {was.get('sq_norm')}"
        if what is not None:
            raise WarmStartError(f"model {i} of the pool ({pool.names[i]}) is not model {i} of {where} "
                                 f"({was.get('name')}): {what}. The pool must begin with the old models, the same "
                                 "files in the same order, and add the new ones after them")


def start_weights(previous: Previous, k: int, layer_names: list[str] | None, sum_to_one: bool) -> Tensor:
    """``[K, L]`` weight on each θ_i at the start: the old coefficients, then 0 for the K − K_old new models
    (α_start of the fixed-centre hyperplane is the same tensor: see the module docstring).

    With ``sum_to_one`` (directions θ_i − θ̄) they must sum to 1 per layer, or the old soup is no point of the new
    hyperplane (a ``decentralize=False`` result).

    Raises:
        WarmStartError: other layers than this run's, or coefficients that do not sum to 1.
    """
    where = previous.source or "the warm_start result"
    if previous.k > k:
        raise WarmStartError(f"{where} was made of K_old={previous.k} models, the pool has only K={k}: the pool "
                             "must list the old models first, then the new ones")
    if previous.layer_names != layer_names:
        kind = lambda names: f"layer-wise over {len(names)} layers" if names else "model-wise"  # noqa: E731
        raise WarmStartError(f"{where} ({previous.name}) is {kind(previous.layer_names)}, this run is "
                             f"{kind(layer_names)} (or its layers are named differently): extend a 'mehl' result "
                             "with 'mehl' and a 'mehl+' one with 'mehl+', with the same layer_grouping")
    if sum_to_one:
        sums = previous.coefficients.double().sum(dim=0)
        worst = float((sums - 1).abs().max())
        if worst > _SUM_TOLERANCE:
            raise WarmStartError(f"{where}: its coefficients sum to {float(sums[(sums - 1).abs().argmax()]):.6g} "
                                 "in a layer, not 1, so its soup is no point θ̄ + Σ α_i (θ_i − θ̄) of the new pool "
                                 "(a decentralize=False result? extend it with decentralize=False)")
    weights = torch.zeros(k, previous.coefficients.shape[1])
    weights[:previous.k] = previous.coefficients.float()
    return weights


class SoupCheck:
    """Σ_{i<K_old} w_i θ_i, accumulated model by model as the centre pass streams them (``CheckpointPool.center``'s
    ``each``), and its distance from θ_old.

    Args:
        weights: ``[K, L]`` start weights (:func:`start_weights`).
        group: ``{mixed key: layer index}`` (-1: the mean over layers), as ``LayerMap.group``.
        soup: θ_old, the canonical mixed keys at least.
    """

    def __init__(self, weights: Tensor, group: Mapping[str, int], soup: Mapping[str, Tensor]) -> None:
        self.weights, self.group, self.soup = weights, dict(group), soup
        self.total: StateDict = {}

    def __call__(self, i: int, state: Mapping[str, Tensor]) -> None:
        w = self.weights[i]
        if not bool(w.any()):
            return  # a new model (w = 0), or an old one the soup does not use
        for key, g in self.group.items():
            c = float(w[g] if g >= 0 else w.mean())
            # float32 at least (half-precision reads too): its own rounding, ~1e-7 sqrt(K_old), stays far below
            # the tolerance, and the sum holds one model-sized buffer, as the centre does
            value = state[key].to(torch.promote_types(state[key].dtype, torch.float32)) * c
            if key in self.total:
                self.total[key].add_(value)
            else:
                self.total[key] = value

    def residual(self) -> float:
        """‖Σ_i w_i θ_i − θ_old‖ / ‖θ_old‖ over the mixed keys."""
        diff = 0.0
        for k in self.group:
            soup = self.soup[k].to(torch.float64)
            total = self.total[k].to(soup.device, torch.float64) if k in self.total else torch.zeros_like(soup)
            diff += float((total - soup).pow(2).sum())
        ref = sum(float(self.soup[k].to(torch.float64).pow(2).sum()) for k in self.group)
        return math.sqrt(diff) / max(math.sqrt(ref), 1e-30)

    def check(self, where: str) -> float:
        """The residual; raise if it exceeds :data:`RESIDUAL_TOLERANCE`.

        Raises:
            WarmStartError: the soup is not the combination of these models its coefficients say.
        """
        residual = self.residual()
        if not residual <= RESIDUAL_TOLERANCE:
            raise WarmStartError(f"{where}: its soup is not Σ_i w_i θ_i of the pool's first models (relative "
                                 f"difference {residual:.2e} > {RESIDUAL_TOLERANCE:g}): the soup, the coefficients "
                                 "and the models do not belong together")
        return residual
