"""Pool diagnostics before any soup is learned: duplicate and near-duplicate checkpoints, and checkpoints far
outside the shared basin, named by file (``python -m soupkit diagnose``; the zoo table's ``diagnostics`` column).

:func:`diagnose` makes one streamed pass over the pool, a block of columns (a few tensors of all K models) at a
time, and from it gets:

* the centre θ̄ and the centred Gram matrix G_ij = ⟨θ_i − θ̄, θ_j − θ̄⟩ (float64), hence every distance:
  ‖θ_i − θ̄‖² = G_ii and ‖θ_i − θ_j‖² = G_ii + G_jj − 2 G_ij;
* per model, sha256 digests of its floating tensors (``soupkit.io.sha256_arrays``, one per block): exact duplicates;
* per model and tensor, ‖θ_i‖² and ⟨θ_i, θ̄⟩: its cosine to the other models (``basin.cosines_to_rest``).

Why blocks of columns: G is a sum over parameters, so it accumulates over any partition of them. With all K rows
of a block resident the block's centre is exact (no centre pass first), each tensor of each model is read once,
and memory is K × one block (``block_bytes``), not K models. Blocks of b whole models would read K²/(2b) models
(K = 72 ViT-B/32, b = 8: 324 reads of 350 MB instead of 72); a random-projection sketch of dimension r reads
each model once but is approximate (a squared distance off by ~√(2/r) relative) and costs an r × P projection.

Cost. Reads: the pool's first read of a model is whole (its NaN/Inf check), later blocks read only their tensors
(safetensors, memory-mapped zip ``.pt``): about 2K model reads for a fresh pool, K for one already read; a legacy
(non-zip) ``.pt`` is read whole for every block (give a larger ``block_bytes``, or convert it). Arithmetic: K²·P
multiply-adds in float64 for G (K = 72 ViT-B/32: 0.9 TFLOP in 71 blocks of 1 GiB; minutes on CPU cores under the
pinned numerics, seconds with ``device="cuda"``). Memory: one block of K rows in the pool's dtype plus its float64
copy (≤ ``block_bytes``, or K × the largest tensor if larger), the centre (one model, float32) and, while a model is
read for the first time, that model; never K models.

Rules (defaults measured on the embedded zoo, see ``docs/checks.md``):

* exact duplicates: identical floating tensors (the same digests; integer buffers are not compared);
* near-duplicates: ‖θ_i − θ_j‖ < ``near_ratio`` × the median pairwise distance of the pool;
* far from the centre: ‖θ_i − θ̄₋ᵢ‖ > ``far_ratio`` × the median over j ≠ i of ‖θ_j − θ̄₋ᵢ‖, with θ̄₋ᵢ the centre of
  the other models (a ratio to a median needs no scale and is not moved by a few far models; leaving model i out
  of the centre keeps it from pulling the centre towards itself);
* outside the shared basin: cosine to the other models below ``basin_threshold`` (``basin.BASIN_THRESHOLD``);
  the pool's mean pairwise cosine is checked too (``basin.check_shared_basin``, its warning).

Records-level duplicates (identical hyper-parameters and accuracies, the model-soups case of model_4 and
model_5) come from the zoo's records, which the pool does not know: :func:`duplicate_records`.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from soupkit.errors import DuplicateCheckpointWarning, SharedBasinWarning
from soupkit.io import sha256_arrays
from soupkit.pool.basin import BASIN_THRESHOLD, BasinReport, check_shared_basin, cosines_to_rest
from soupkit.pool.checkpoint_pool import CheckpointPool

__all__ = ["PoolDiagnostics", "diagnose", "centred_gram", "duplicate_records", "record_name", "NEAR_RATIO",
           "FAR_RATIO", "BLOCK_BYTES"]

# measured on the embedded zoo (32 fine-tunes, docs/checks.md): pairwise distances run from 0.11 to 2.64 times their
# median (the closest pairs: two low-lr fine-tunes, both near the shared start), centre ratios from 0.75 to 4.35 (the
# farthest: the highest learning rates), cosines to the others from 0.990 to 0.9997. Added to it, a copy of a model
# plus noise of 1e-3 of its distance to the centre scores 0.0018, an independent initialisation a centre ratio of
# ~220 and a cosine of 0.00. The defaults leave the zoo a margin of 5x below and 2.3x above; more models give
# closer pairs.
NEAR_RATIO = 0.02
FAR_RATIO = 10.0
BLOCK_BYTES = 1 << 30  # one block of K rows and its float64 copy


@dataclass(frozen=True, eq=False)
class PoolDiagnostics:
    """What :func:`diagnose` found, per model (index i, file ``names[i]``) and for the pool.

    Attributes:
        names: the models' file names (full paths where two files share a name).
        gram: ``[K, K]`` float64, ⟨θ_i − θ̄, θ_j − θ̄⟩.
        centre_distance: ``[K]`` ‖θ_i − θ̄‖; centre_ratio: ‖θ_i − θ̄₋ᵢ‖ over the median of the other models'
            distances to θ̄₋ᵢ, the centre without model i (None for K < 3, or if that median is 0).
        nearest: ``[K]`` index of the nearest other model (None for K = 1); nearest_ratio: ‖θ_i − θ_nearest‖
            over the median pairwise distance (None if K = 1 or that median is 0).
        median_distance: the median of ‖θ_i − θ_j‖ over the pairs i < j (None for K = 1).
        basin_cosine: ``[K]`` cosine of θ_i to the mean of the others (``basin.cosines_to_rest``).
        basin: the pool's mean pairwise cosine (``basin.check_shared_basin``).
        exact_duplicates: groups of file names holding identical floating tensors.
        near_duplicates: ``(file_i, file_j, distance ratio)`` of the pairs below ``near_ratio`` (exact ones aside).
        outside_basin, far_from_centre: file names.
        flags: ``[K]`` the sentences flagging each model (empty: nothing found).
        stats: seconds, blocks, the largest block's bytes.
    """

    names: tuple[str, ...]
    gram: Tensor
    centre_distance: tuple[float, ...]
    centre_ratio: tuple[float | None, ...]
    nearest: tuple[int | None, ...]
    nearest_ratio: tuple[float | None, ...]
    median_distance: float | None
    basin_cosine: tuple[float | None, ...]
    basin: BasinReport
    exact_duplicates: tuple[tuple[str, ...], ...]
    near_duplicates: tuple[tuple[str, str, float], ...]
    outside_basin: tuple[str, ...]
    far_from_centre: tuple[str, ...]
    flags: tuple[tuple[str, ...], ...]
    thresholds: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        """Whether any model is flagged."""
        return any(self.flags)

    def table(self) -> list[dict[str, Any]]:
        """One row per model: file, distance to the centre (and its ratio to the median), nearest model and its
        distance ratio, cosine to the others, flags (``"; "``-joined, empty when none)."""
        return [{"file": name, "distance_to_centre": self.centre_distance[i], "centre_ratio": self.centre_ratio[i],
                 "nearest": None if self.nearest[i] is None else self.names[self.nearest[i]],
                 "nearest_ratio": self.nearest_ratio[i], "basin_cosine": self.basin_cosine[i],
                 "flags": "; ".join(self.flags[i])} for i, name in enumerate(self.names)]

    def format(self) -> str:
        """:meth:`table` as fixed-width text (numbers to 3 significant digits), then :meth:`summary`."""
        heads = ["file", "distance_to_centre", "centre_ratio", "nearest", "nearest_ratio", "basin_cosine", "flags"]
        rows = [[_cell(row[h]) for h in heads] for row in self.table()]
        widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(heads)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip()]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines + [self.summary()])

    def summary(self) -> str:
        """One line: K, then what was flagged (or the margins when nothing was)."""
        k = len(self.names)
        parts = [f"{len(group)} identical: {', '.join(group)}" for group in self.exact_duplicates]
        parts += [f"near-duplicates {a} and {b} ({r:.3g} x the median distance)" for a, b, r in self.near_duplicates]
        parts += [f"outside the shared basin: {', '.join(self.outside_basin)}"] if self.outside_basin else []
        parts += [f"far from the centre: {', '.join(self.far_from_centre)}"] if self.far_from_centre else []
        if parts:
            return f"{k} models: " + "; ".join(parts)
        near = [r for r in self.nearest_ratio if r is not None]
        far = [r for r in self.centre_ratio if r is not None]
        cos = [c for c in self.basin_cosine if c is not None]
        margins = ([f"closest pair {min(near):.2f} x the median distance (flag < {self.thresholds['near_ratio']:g})"]
                   if near else []) + \
                  ([f"farthest {max(far):.2f} x the others' median distance to their centre (flag > "
                    f"{self.thresholds['far_ratio']:g})"] if far else []) + \
                  ([f"lowest cosine to the others {min(cos):.2f} (flag < {self.thresholds['basin_threshold']:g})"]
                   if cos else [])
        return f"{k} models: nothing flagged" + (f" ({', '.join(margins)})" if margins else "")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _display_names(names: Sequence[str]) -> tuple[str, ...]:
    """File names, or the full names where two files of the pool share a file name."""
    short = [Path(n).name if not n.startswith("<") else n for n in names]
    return tuple(short) if len(set(short)) == len(short) else tuple(names)


def _blocks(pool: CheckpointPool, block_bytes: int) -> list[list[str]]:
    """The floating keys in blocks of at most ``block_bytes`` (K rows plus their float64 copy) and one dtype each,
    so that every block is one ``[K, p]`` buffer of ``load_stack``; a key larger than the budget is a block alone."""
    k = len(pool)
    blocks: list[list[str]] = []
    current: list[str] = []
    size, dtype = 0, None
    for key, spec in pool.spec.items():
        n = math.prod(spec.shape)
        if not spec.dtype.is_floating_point or not n:
            continue
        target = pool.cast_dtype or spec.dtype
        nbytes = k * n * (target.itemsize + 8)
        if current and (target != dtype or size + nbytes > block_bytes):
            blocks.append(current)
            current, size = [], 0
        current.append(key)
        size, dtype = size + nbytes, target
    if current:
        blocks.append(current)
    return blocks


@dataclass
class _Pass:
    gram: Tensor  # [K, K] float64
    centre: dict[str, Tensor]  # θ̄ in float32, for check_shared_basin
    centre_sq: dict[str, float]
    sq_norms: list[dict[str, float]]
    dots: list[dict[str, float]]
    digests: list[list[str]]
    blocks: int = 0
    block_bytes: int = 0


def _stream(pool: CheckpointPool, block_bytes: int, device: str | torch.device) -> _Pass:
    """The one pass over the pool (module docstring): G, θ̄, per-key norms and ⟨θ_i, θ̄⟩, digests."""
    k = len(pool)
    out = _Pass(torch.zeros(k, k, dtype=torch.float64, device=device), {}, {}, [{} for _ in range(k)],
                [{} for _ in range(k)], [[] for _ in range(k)])
    for keys in _blocks(pool, block_bytes):
        stack = pool.load_stack(range(k), "cpu", keys=keys)  # on the host: the digests read its bytes
        flat = stack.flat  # [K, p], one dtype (the blocks are cut so)
        for i in range(k):
            out.digests[i].append(sha256_arrays(flat[i].view(torch.uint8).numpy()))
        x = flat.to(device=device, dtype=torch.float64)
        out.blocks += 1
        out.block_bytes = max(out.block_bytes, flat.numel() * (flat.element_size() + 8))
        spans = dict(stack.spans)
        del stack, flat
        mean = x.mean(0)  # [p]: the centre of these columns, exact since all K rows are here
        for key, (start, n) in spans.items():
            seg, rows = mean[start:start + n], x[:, start:start + n]
            out.centre[key] = seg.to("cpu", torch.float32).view(pool.spec[key].shape)
            out.centre_sq[key] = float(seg @ seg)
            norms = torch.linalg.vector_norm(rows, dim=1).square()  # no [K, n] temporary
            for i, (sq, dot) in enumerate(zip(norms.tolist(), (rows @ seg).tolist())):
                out.sq_norms[i][key], out.dots[i][key] = sq, dot
        x -= mean
        out.gram += x @ x.T
        del x
    out.gram = ((out.gram + out.gram.T) / 2).cpu()  # the product's rounding need not be symmetric
    return out


def centred_gram(pool: CheckpointPool, *, block_bytes: int = BLOCK_BYTES,
                 device: str | torch.device = "cpu") -> Tensor:
    """``[K, K]`` float64 Gram matrix of the floating tensors' θ_i − θ̄, streamed as :func:`diagnose` does."""
    return _stream(pool, block_bytes, device).gram


def _median(values: Tensor) -> float:
    return float(torch.quantile(values, 0.5)) if values.numel() else float("nan")


def _centre_ratios(g: Tensor) -> tuple[float | None, ...]:
    """``[K]``: ‖θ_i − θ̄₋ᵢ‖ over the median of ‖θ_j − θ̄₋ᵢ‖ (j ≠ i), θ̄₋ᵢ the centre of the other models.

    Leaving θ_i out of its centre keeps a far model from pulling θ̄ towards it (with θ̄ itself, one model at
    distance D from K − 1 alike ones scores at most ~K − 1, whatever D). From G alone: with x = θ − θ̄,
    θ_j − θ̄₋ᵢ = x_j + x_i/(K − 1), so its squared norm is G_jj + 2 G_ij/(K − 1) + G_ii/(K − 1)². None for K < 3.
    """
    k = g.shape[0]
    if k < 3:
        return (None,) * k
    d = g.diagonal()
    sq = d[None, :] + 2 * g / (k - 1) + d[:, None] / (k - 1) ** 2  # [i, j]: ‖θ_j − θ̄₋ᵢ‖²
    out = []
    for i in range(k):
        own = float(d[i].clamp_min(0).sqrt()) * k / (k - 1)  # ‖θ_i − θ̄₋ᵢ‖ = K/(K − 1) ‖θ_i − θ̄‖
        rest = _median(torch.cat([sq[i, :i], sq[i, i + 1:]]).clamp_min(0).sqrt())
        out.append(own / rest if rest > 0 else None)
    return tuple(out)


def diagnose(pool: CheckpointPool, *, near_ratio: float = NEAR_RATIO, far_ratio: float = FAR_RATIO,
             basin_threshold: float = BASIN_THRESHOLD, block_bytes: int = BLOCK_BYTES,
             device: str | torch.device = "cpu", warn: bool = True) -> PoolDiagnostics:
    """Duplicate, near-duplicate, far and out-of-basin checkpoints of ``pool``, by file (rules: module docstring).

    Args:
        pool: the K checkpoints.
        near_ratio: pairs closer than this fraction of the median pairwise distance are near-duplicates.
        far_ratio: a model farther from the centre of the others than this multiple of their median distance to it
            is far.
        basin_threshold: a model's cosine to the others below it is outside the shared basin.
        block_bytes: memory of one block of columns (K rows and their float64 copy).
        device: where G is accumulated (a GPU takes the K²·P multiply-adds; the reads stay on the host).
        warn: :class:`DuplicateCheckpointWarning` / :class:`SharedBasinWarning` naming the files flagged.
    """
    started = time.perf_counter()
    k = len(pool)
    names = _display_names(pool.names)
    p = _stream(pool, block_bytes, device)
    basin = check_shared_basin(pool, p.centre, threshold=basin_threshold, warn=warn)
    numel = {key: math.prod(pool.spec[key].shape) for key in p.centre_sq}
    cosines = tuple(cosines_to_rest(p.sq_norms, p.dots, p.centre_sq, numel))

    g = p.gram
    diag = g.diagonal().clamp_min(0)
    dist = (diag[:, None] + diag[None, :] - 2 * g).clamp_min(0).sqrt()  # [K, K]
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, digest in enumerate(p.digests):
        if digest:  # no floating tensor at all: nothing was compared
            groups.setdefault(tuple(digest), []).append(i)
    exact = [members for members in groups.values() if len(members) > 1]
    same = torch.zeros(k, k, dtype=torch.bool)
    for members in exact:
        index = torch.tensor(members)
        same[index[:, None], index[None, :]] = True
    dist[same] = 0.0  # identical bytes: the Gram's rounding may leave ~1e-8 of the spread
    upper = torch.triu_indices(k, k, 1)
    median_pair = _median(dist[upper[0], upper[1]]) if k > 1 else None
    radius = diag.sqrt()
    centre_ratio = _centre_ratios(g)
    scale = median_pair if median_pair else None
    others = dist + torch.diag(torch.full((k,), float("inf"), dtype=dist.dtype))
    nearest = tuple(int(others[i].argmin()) if k > 1 else None for i in range(k))
    nearest_ratio = tuple(float(others[i, j] / scale) if j is not None and scale else None
                          for i, j in enumerate(nearest))

    flags: list[list[str]] = [[] for _ in range(k)]
    for members in exact:
        for i in members:
            flags[i].append("identical to " + ", ".join(names[j] for j in members if j != i))
    near = []
    if scale:
        for i, j in upper.T.tolist():
            ratio = float(dist[i, j] / scale)
            if ratio < near_ratio and not same[i, j]:
                near.append((names[i], names[j], ratio))
                flags[i].append(f"near-duplicate of {names[j]} ({ratio:.3g} x the median distance)")
                flags[j].append(f"near-duplicate of {names[i]} ({ratio:.3g} x the median distance)")
    outside = [i for i, c in enumerate(cosines) if c is not None and c < basin_threshold]
    for i in outside:
        flags[i].append(f"outside the shared basin (cosine {cosines[i]:.2f} to the others < {basin_threshold:g})")
    far = [i for i, r in enumerate(centre_ratio) if r is not None and r > far_ratio]
    for i in far:
        flags[i].append(f"far from the centre ({centre_ratio[i]:.2f} x the others' median distance to their centre "
                        f"> {far_ratio:g})")

    result = PoolDiagnostics(
        names=names, gram=g, centre_distance=tuple(radius.tolist()), centre_ratio=centre_ratio, nearest=nearest,
        nearest_ratio=nearest_ratio, median_distance=median_pair, basin_cosine=cosines, basin=basin,
        exact_duplicates=tuple(tuple(names[i] for i in m) for m in exact), near_duplicates=tuple(near),
        outside_basin=tuple(names[i] for i in outside), far_from_centre=tuple(names[i] for i in far),
        flags=tuple(tuple(f) for f in flags),
        thresholds={"near_ratio": near_ratio, "far_ratio": far_ratio, "basin_threshold": basin_threshold},
        stats={"seconds": time.perf_counter() - started, "blocks": p.blocks, "block_bytes": p.block_bytes})
    if warn and (exact or near):
        warnings.warn(DuplicateCheckpointWarning(
            "the pool holds the same model more than once, so a soup counts it twice: "
            + "; ".join([f"identical: {', '.join(names[i] for i in m)}" for m in exact]
                        + [f"near-duplicates: {a} and {b} ({r:.3g} x the median distance)" for a, b, r in near])),
            stacklevel=2)
    if warn and (outside or far):
        warnings.warn(SharedBasinWarning(
            "checkpoints far outside the pool's shared basin: "
            + "; ".join([f"{names[i]} (cosine {cosines[i]:.2f} to the others)" for i in outside]
                        + [f"{names[i]} ({centre_ratio[i]:.2f} x the others' median distance to their centre)"
                           for i in far if i not in outside])
            + ". Leave them out of the pool, or check how they were trained."), stacklevel=2)
    return result


def duplicate_records(records: Sequence[Mapping[str, Any]], accuracy_keys: Sequence[str] | None = None,
                      hparams_key: str = "hparams") -> tuple[tuple[str, ...], ...]:
    """Groups of models whose records have identical hyper-parameters and identical accuracies, by file name.

    Args:
        records: one dict per model (a zoo's ``records``): ``record[hparams_key]`` a dict, the accuracies as
            top-level numbers, the name in ``file`` or ``path`` (else ``model <index>``).
        accuracy_keys: the accuracies compared (model-soups: its seven evaluation sets); None: every top-level
            key with "acc" in its name.
    Records without hyper-parameters or accuracies are never grouped: equal accuracies alone may be chance.
    """
    groups: dict[str, list[str]] = {}
    for n, record in enumerate(records):
        hparams = record.get(hparams_key) or {}
        keys = [key for key in record if "acc" in key.lower()] if accuracy_keys is None else list(accuracy_keys)
        accuracies = {key: record[key] for key in keys if isinstance(record.get(key), (int, float))}
        if not hparams or not accuracies:
            continue
        groups.setdefault(json.dumps([hparams, accuracies], sort_keys=True, default=str), []).append(
            record_name(record, n))
    return tuple(tuple(names) for names in groups.values() if len(names) > 1)


def record_name(record: Mapping[str, Any], position: int = 0) -> str:
    """The file name of a zoo record (``file``, else the name in ``path``), else ``model <index>``."""
    if record.get("file"):
        return str(record["file"])
    if record.get("path"):
        return Path(record["path"]).name
    return f"model {record.get('index', position)}"
