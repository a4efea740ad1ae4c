"""The paper's other studies over seeds: Table 3, Figure 2, the ablations and Appendix C for every seed of the
multi-seed study.

:func:`soupkit.experiments.seeds.seed_study` builds one zoo per seed and runs the main table's methods on it;
this module runs the top-models study (notebook 04), the fine-tuning-cost study (06) and the MEHL-Soup+
ablations with Appendix D (07) on those same zoos, and Appendix C (09: a ResNet zoo with BatchNorm, built per
seed with that seed as its search, pre-training and split seed), with the settings those notebooks use by
default (:class:`SideStudySettings`) and ``RunSpec.seed = s`` (held-out batch order, block draw). Files::

    <out_dir>/seed_<s>/top_models/records.csv        as notebook 04 writes outputs/top_models/
    <out_dir>/seed_<s>/finetuning_cost/records.csv   as notebook 06 writes outputs/finetuning_cost/
    <out_dir>/seed_<s>/ablations/ablations.csv       as notebook 07 writes outputs/ablations/
    <out_dir>/seed_<s>/resnet/records.csv            as notebook 09 writes outputs/resnet/ (its zoo: zoo_resnet/)

A study whose file exists is not run again (its records are written last, once every run of the study is done).
The claims table (:func:`soupkit.experiments.claims.study_differences`) then reads each claim's difference from
every seed's folder exactly as from the main run's, and gives it a Student's t interval over seeds.

    run_side_studies("outputs/seeds", [0, 1, 2], jobs=2)
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import pandas as pd
from tqdm.auto import tqdm

from soupkit.config import MAIN_TABLE_SETTINGS
from soupkit.errors import MissingInputError
from soupkit.experiments.ablations import Setting, ablation_grid, run_ablations
from soupkit.experiments.claims import EQUIVALENCE_MARGIN
from soupkit.experiments.plots import device_title, legend_below, method_colour
from soupkit.experiments.results import write_csv
from soupkit.experiments.run import run_methods, soup_options
from soupkit.experiments.seeds import differences_panel, seed_dir, seed_markers, seed_zoo_config
from soupkit.experiments.studies import finetuning_cost_study, scaled_counts, top_models_study
from soupkit.zoo.build import build_zoo
from soupkit.zoo.config import ZooConfig
from soupkit.zoo.embedded_models import ResNetConfig
from soupkit.zoo.sources import open_zoo

__all__ = ["SIDE_STUDIES", "SideStudySettings", "side_study_file", "run_side_study", "run_side_studies",
           "plot_study_differences"]

# study name -> (file that marks it done, relative to its folder; the notebook it repeats)
SIDE_STUDIES: dict[str, tuple[str, str]] = {
    "top_models": ("records.csv", "04_top_models"),
    "finetuning_cost": ("records.csv", "06_finetuning_cost"),
    "ablations": ("ablations.csv", "07_ablations"),
    "resnet": ("records.csv", "09_resnet"),
}
# studies that run on the seed's ViT zoo (made by seed_study); "resnet" builds its own zoo
_ON_SEED_ZOO = ("top_models", "finetuning_cost", "ablations")


@dataclass(frozen=True)
class SideStudySettings:
    """The settings notebooks 04, 06 and 07 run with by default (``tests/test_seed_studies.py`` reads their
    ``parameters`` cells and fails when one of them drifts from these).

    Attributes:
        methods: compared in Table 3 and Figure 2.
        eliminate: the paper's numbers of top models removed, out of ``paper_models`` (scaled to K).
        num_finetuned: the first n models of Figure 2.
        heldout_size: held-out images of Table 3 and Figure 2; ``ablation_heldout_size`` those of the ablations.
        learned_lr, hyperplane_lr, weight_decay, epochs: overrides of the learned methods' settings; None (the
            notebooks' default too) is each method's own default (``soupkit.config.LEARNED_DEFAULTS``,
            ``HYPERPLANE_DEFAULTS``).
        batch_sizes / pass_values / epoch_values: the ablations' values of b, outer passes and inner epochs
            around the baseline (``model_batch_size``, ``outer_passes``, ``epochs``); ``decentralize_ablation``
            adds Appendix D (directions θ_i instead of θ_i − θ̄).
        resnet_*: Appendix C (notebook 09): its zoo (K, ModifiedResNet width, pre-training epochs, the search's
            fine-tuning epochs, images scored per fine-tune), its held-out size, b, and the methods compared;
            ``resnet_max_train``: prefixes of its pre-training and fine-tuning splits (tests; None: all).
    """

    methods: tuple[str, ...] = ("greedy", "mehl+")
    eliminate: tuple[int, ...] = (0, 22, 42)
    paper_models: int = 72
    num_finetuned: tuple[int, ...] = (4, 8, 16, 32)
    heldout_size: int = 1000
    ablation_heldout_size: int = MAIN_TABLE_SETTINGS["heldout_size"]
    batch_size: int = MAIN_TABLE_SETTINGS["batch_size"]
    model_batch_size: int = MAIN_TABLE_SETTINGS["model_batch_size"]
    learned_lr: float | None = None
    hyperplane_lr: float | None = None
    weight_decay: float | None = None
    epochs: float | None = None
    outer_passes: int = 1
    batch_sizes: tuple[int, ...] = (8, 32)
    pass_values: tuple[int, ...] = (1, 2)
    epoch_values: tuple[float, ...] = (1.0, 5.0)
    decentralize_ablation: bool = True
    resnet_methods: tuple[str, ...] = ("greedy", "learned+", "mehl+")
    resnet_k: int = 8
    resnet_width: int = 8
    resnet_pretrain_epochs: int = 20
    resnet_epoch_choices: tuple[int, ...] = (3, 4, 5)
    resnet_max_eval: int = 1000
    resnet_heldout_size: int = 500
    resnet_model_batch_size: int = 2
    resnet_max_train: int | None = None

    def options(self, methods: Sequence[str] | None = None, model_batch_size: int | None = None
                ) -> dict[str, dict[str, Any]]:
        """Per-method ``make_soup`` options of Table 3 and Figure 2 (as notebooks 04 and 06 build them); with
        ``methods`` and ``model_batch_size``, those of Appendix C."""
        return {m: soup_options(m, learned_lr=self.learned_lr, hyperplane_lr=self.hyperplane_lr,
                                weight_decay=self.weight_decay, epochs=self.epochs,
                                model_batch_size=model_batch_size or self.model_batch_size)
                for m in (methods or self.methods)}

    def resnet_zoo(self, seed: int) -> ZooConfig:
        """The ResNet zoo recipe of notebook 09 with ``seed`` as its search, pre-training and split seed."""
        return seed_zoo_config(seed, self.resnet_k, {
            "model": ResNetConfig(width=self.resnet_width), "pretrain_epochs": self.resnet_pretrain_epochs,
            "epoch_choices": self.resnet_epoch_choices, "max_eval": self.resnet_max_eval,
            "max_pretrain": self.resnet_max_train, "max_finetune": self.resnet_max_train})


def side_study_file(out_dir: str | os.PathLike, seed: int, study: str) -> Path:
    """The file that marks ``study`` of ``seed`` done: ``<out_dir>/seed_<seed>/<study>/<records file>``."""
    if study not in SIDE_STUDIES:
        raise ValueError(f"unknown study {study!r}; choose from {list(SIDE_STUDIES)}")
    return seed_dir(out_dir, seed) / study / SIDE_STUDIES[study][0]


def run_side_study(out_dir: str | os.PathLike, seed: int, study: str,
                   settings: SideStudySettings = SideStudySettings(), device: str = "cpu") -> Path:
    """Run one study on the zoo of one seed (``<out_dir>/seed_<seed>/zoo``, made by ``seed_study``; "resnet"
    builds ``<out_dir>/seed_<seed>/zoo_resnet`` itself, on 1 thread as notebook 09 does), in this process;
    returns the records file. Raises FileNotFoundError (naming the fix) when the seed's zoo is missing."""
    target = side_study_file(out_dir, seed, study)
    folder = seed_dir(out_dir, seed)
    s = settings
    if study == "resnet":
        zoo = build_zoo(folder / "zoo_resnet", s.resnet_zoo(seed), progress=False, device=device, num_threads=1)
        methods = list(s.resnet_methods)
        records = run_methods(zoo.out_dir, target.parent, methods, isolate=False, progress=False,
                              options=s.options(methods, s.resnet_model_batch_size),
                              heldout_size=s.resnet_heldout_size, seed=seed, device=device)
        write_csv(pd.DataFrame(records), target)
        return target
    zoo_dir = folder / "zoo"
    if not (zoo_dir / "zoo.json").is_file():
        raise MissingInputError(f"{zoo_dir} holds no zoo: run seed_study (notebook 10) for seed {seed} first")
    k = len(open_zoo(zoo_dir).records)
    common = {"batch_size": s.batch_size, "seed": seed, "device": device}
    if study == "top_models":
        counts = scaled_counts(list(s.eliminate), k, s.paper_models)
        top_models_study(zoo_dir, target.parent, counts, list(s.methods), s.options(),
                         paper_counts=list(s.eliminate), heldout_size=s.heldout_size, **common)
    elif study == "finetuning_cost":
        sizes = sorted({min(n, k) for n in s.num_finetuned})
        finetuning_cost_study(zoo_dir, target.parent, sizes, list(s.methods), s.options(),
                              heldout_size=s.heldout_size, **common)
    else:
        baseline = Setting(model_batch_size=s.model_batch_size, outer_passes=s.outer_passes, epochs=s.epochs)
        sweeps = {"model_batch_size": list(s.batch_sizes), "outer_passes": list(s.pass_values),
                  "epochs": list(s.epoch_values), "decentralize": [True, False] if s.decentralize_ablation else []}
        run_ablations(zoo_dir, target.parent, ablation_grid(baseline, sweeps), lr=s.hyperplane_lr,
                      weight_decay=s.weight_decay, heldout_size=s.ablation_heldout_size, **common)
    return target


def _task(out_dir: str, seed: int, study: str, settings: SideStudySettings, device: str, threads: int) -> str:
    """One (seed, study) in a worker process with ``threads`` torch threads."""
    import torch  # noqa: PLC0415

    torch.set_num_threads(threads)
    return str(run_side_study(out_dir, seed, study, settings, device))


def run_side_studies(out_dir: str | os.PathLike, seeds: Sequence[int], studies: Sequence[str] = tuple(SIDE_STUDIES),
                     settings: SideStudySettings = SideStudySettings(), *, jobs: int = 1, device: str = "cpu",
                     progress: bool = True) -> list[Path]:
    """Every study of ``studies`` on the zoo of every seed of ``seeds``; studies already done are skipped.

    Args:
        out_dir: the multi-seed study's folder (``seed_<s>/zoo`` made by ``seed_study``).
        jobs: (seed, study) pairs run at once; more than 1: worker processes (spawned: importing soupkit there
            pins the numerics again; from a script, call this under ``if __name__ == "__main__":``), each with
            ``cpu_count // jobs`` torch threads. The results are the same.
    Returns:
        the records file of every (seed, study), seeds first.
    """
    unknown = sorted(set(studies) - set(SIDE_STUDIES))
    if unknown:
        raise ValueError(f"unknown studies {unknown}; choose from {list(SIDE_STUDIES)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    pairs = [(seed, study) for seed in seeds for study in studies]
    missing = [zoo for zoo in dict.fromkeys(seed_dir(out_dir, s) / "zoo" for s, st in pairs if st in _ON_SEED_ZOO)
               if not (zoo / "zoo.json").is_file()]
    if missing:
        raise MissingInputError(f"no zoo in {', '.join(map(str, missing))}: run seed_study (notebook 10) first")
    todo = [(seed, study) for seed, study in pairs if not side_study_file(out_dir, seed, study).is_file()]
    # the longest studies first, so that the workers finish together
    order = {"ablations": 0, "resnet": 1, "top_models": 2, "finetuning_cost": 3}
    todo.sort(key=lambda pair: order[pair[1]])
    bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc="seed studies", disable=not progress)
    if jobs == 1 or len(todo) <= 1:
        for seed, study in todo:
            bar.set_postfix_str(f"seed {seed}: {study}")
            run_side_study(out_dir, seed, study, settings, device)
            bar.update(1)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending = {pool.submit(_task, str(out_dir), seed, study, settings, device, threads)
                       for seed, study in todo}
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()  # a worker's failure is raised here
                        bar.update(1)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    bar.close()
    return [side_study_file(out_dir, seed, study) for seed, study in pairs]


def _label(claim: str, width: int = 58) -> str:
    """A claim's text for an axis: without its unit, wrapped at ``width`` characters."""
    import textwrap  # noqa: PLC0415

    return "\n".join(textwrap.wrap(claim.removesuffix(" (points)"), width))


def plot_study_differences(differences: pd.DataFrame, title: str) -> plt.Figure:
    """Each claim of ``claims.study_differences`` (one row each): the mean difference over seeds with its t
    interval and every seed's value, 0 marked; claims of *no* difference ("equal") over a grey band of
    ±``EQUIVALENCE_MARGIN`` points (inside it: reproduces), and each claim's verdict at the right."""
    from matplotlib.lines import Line2D  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    n = len(differences)
    fig, ax = plt.subplots(figsize=(11, 0.75 * max(n, 3) + 1.4))
    seeds = sorted({int(c.split()[1]) for c in differences.columns if c.startswith("seed ") and c.endswith("(points)")})
    markers = seed_markers(seeds)
    colour = method_colour("mehl+")  # every claim here is about MEHL-Soup+
    for i, expected in enumerate(differences["expected"]):
        if str(expected) == "equal":
            ax.fill_betweenx([i - 0.4, i + 0.4], -EQUIVALENCE_MARGIN, EQUIVALENCE_MARGIN, color="0.88", zorder=0)
    differences_panel(ax, differences, [_label(c) for c in differences["claim"]], [colour] * n, markers)
    for i, (outcome, seen) in enumerate(zip(differences["verdict"], differences["seeds"])):
        ax.annotate(f"{outcome} ({seen} seeds)", (1.01, i), xycoords=("axes fraction", "data"), va="center",
                    fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(device_title(title))
    fig.tight_layout()
    handles = [Line2D([], [], color=colour, marker="o", ls="-", label="mean, t interval over seeds")]
    handles += [Line2D([], [], color=colour, marker=markers[s], mfc="none", ls="none", label=f"seed {s}")
                for s in seeds]
    handles.append(Patch(color="0.88", label=f"'equal' claims: ±{EQUIVALENCE_MARGIN} points"))
    legend_below(fig, handles)
    return fig
