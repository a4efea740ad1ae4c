"""SoupConfig's four groups (Algorithm, Variant, Systems, Run): every option has one group, the flat API
(``make_soup(..., lr=...)``, ``with_options``, ``from_options``/``options``) reaches it, and each group checks
its own values."""
from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch

import soupkit
from soupkit.config import HYPERPLANE_DEFAULTS, Algorithm, Run, SoupConfig, Systems, Variant, parse_dtype, with_options
from soupkit.errors import OptionError, PlanError
from soupkit.methods.registry import METHODS, Method, config_for, register
from soupkit.methods.result import SoupResult

GROUPS = {"algorithm": Algorithm, "variant": Variant, "systems": Systems, "run": Run}

# the flat SoupConfig's options and defaults before the grouping: names and defaults are public, they must not move
FLAT_DEFAULTS = {
    "device": "cpu", "dtype": torch.float32, "progress": True, "seed": 0, "lr": 0.01, "weight_decay": 0.0,
    "epochs": 5.0, "inner_iterations": None, "outer_iterations": None, "model_batch_size": None, "warmup": 0.2,
    "schedule": "cosine", "batch_size": None, "clip_grad_norm": None, "logit_scale": False, "layer_grouping": None,
    "decentralize": True, "normalize_directions": False, "recenter": False, "prefetch": False,
    "direction_dtype": None, "autocast": None, "sync_every": 25, "ties": "reject", "select_loader": None,
    "eval_every": 50, "run_dir": None, "check_basin": True, "parallel": None, "memory_cap_mb": None,
    "scale_grid": None,  # added with task arithmetic (None: that method's own grid)
    "extend_passes": None, "warm_start": None,  # added later (warm starts), so their defaults are 'off'
}

# a value other than the default for every option (recenter=True would need decentralize: it is tried below)
OTHER_VALUES = {
    "lr": 0.02, "weight_decay": 0.1, "epochs": 2.0, "inner_iterations": 3, "outer_iterations": 4,
    "model_batch_size": 5, "warmup": 0.1, "schedule": "constant", "batch_size": 16, "clip_grad_norm": 2.0,
    "logit_scale": True, "layer_grouping": "module", "ties": "accept", "scale_grid": (0.5, 1.0),
    "decentralize": False, "normalize_directions": True, "recenter": False,
    "device": "cuda:1", "dtype": torch.float64, "prefetch": True, "direction_dtype": torch.bfloat16,
    "autocast": "bf16", "sync_every": 2, "parallel": "data", "memory_cap_mb": 100.0,
    "progress": False, "seed": 3, "select_loader": [(torch.zeros(1), torch.zeros(1))], "eval_every": 9,
    "run_dir": "runs/x", "check_basin": False, "extend_passes": 2, "warm_start": "runs/previous",
}


def _group_of() -> dict[str, list[str]]:
    homes: dict[str, list[str]] = {}
    for group, cls in GROUPS.items():
        for f in fields(cls):
            homes.setdefault(f.name, []).append(group)
    return homes


def test_soupconfig_is_the_four_groups():
    assert [f.name for f in fields(SoupConfig)] == list(GROUPS)
    assert all(isinstance(getattr(SoupConfig(), g), cls) for g, cls in GROUPS.items())
    with pytest.raises(TypeError, match="SoupConfig.algorithm must be of type Algorithm, got Systems"):
        SoupConfig(algorithm=Systems())  # type: ignore[arg-type]


def test_every_option_has_exactly_one_group_and_round_trips():
    homes = _group_of()
    assert {name: groups for name, groups in homes.items() if len(groups) != 1} == {}
    assert sorted(SoupConfig.option_names()) == sorted(homes) == sorted(FLAT_DEFAULTS) == sorted(OTHER_VALUES)
    assert len(SoupConfig.option_names()) == len(set(SoupConfig.option_names())) == 33
    assert SoupConfig().options() == FLAT_DEFAULTS  # same names, same defaults
    assert SoupConfig.from_options() == SoupConfig()
    cfg = SoupConfig.from_options(**OTHER_VALUES)
    for name, value in OTHER_VALUES.items():
        assert getattr(getattr(cfg, homes[name][0]), name) == value, name
    assert cfg.options() == OTHER_VALUES
    assert SoupConfig.from_options(**cfg.options()) == cfg
    recentred = SoupConfig.from_options(recenter=True)
    assert recentred.variant.recenter and SoupConfig.from_options(**recentred.options()) == recentred
    for name in METHODS:  # every method's defaults too
        defaults = config_for(name)
        assert SoupConfig.from_options(**defaults.options()) == defaults
        assert with_options(defaults, name) == defaults


def test_options_are_routed_without_touching_the_rest():
    cfg = with_options(HYPERPLANE_DEFAULTS, "mehl+", lr=0.5, device="meta", seed=4, normalize_directions=True)
    assert cfg.algorithm == replace(HYPERPLANE_DEFAULTS.algorithm, lr=0.5)
    assert cfg.systems == Systems(device="meta") and cfg.run == Run(seed=4)
    assert cfg.variant == Variant(normalize_directions=True)
    assert HYPERPLANE_DEFAULTS.algorithm.lr == 0.01  # frozen: the defaults are untouched
    # a string direction_dtype is still read as a dtype, through any door
    assert SoupConfig.from_options(direction_dtype="bf16").systems.direction_dtype is torch.bfloat16
    assert config_for("mehl+", direction_dtype="float16").systems.direction_dtype is torch.float16
    assert Systems(autocast="fp16").autocast_dtype is torch.float16 and Systems().autocast_dtype is None


def test_one_dtype_parser_reads_the_short_and_the_torch_names():
    """parse_dtype serves the options (direction_dtype) and the planner's --dtype: bf16/fp16/fp32 and torch's own
    names in any case; what either accepted before reads as before."""
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "Float32": torch.float32, "half": torch.float16, "float": torch.float32,
             "float64": torch.float64, "BF16": torch.bfloat16, "int8": torch.int8}
    for name, dtype in table.items():
        assert parse_dtype(name) is dtype, name
    assert parse_dtype(torch.float16) is torch.float16
    assert Systems(direction_dtype="fp32").direction_dtype is torch.float32  # fp32 was the planner's only
    with pytest.raises(OptionError, match=r"^direction_dtype='nope' is not a torch dtype"):
        parse_dtype("nope", "direction_dtype")
    with pytest.raises(OptionError, match="is not a torch dtype"):
        parse_dtype("Tensor")  # a torch attribute, not a dtype
    with pytest.raises(PlanError, match=r"^--dtype='int8' is not a floating torch dtype"):
        parse_dtype("int8", "--dtype", floating=True, error=PlanError)
    with pytest.raises(OptionError, match="not a floating"):
        parse_dtype(torch.int64, floating=True)


def test_an_unknown_option_raises_type_error_naming_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['learning_rate'\] for make_soup\('mehl\+'\); "
                                        r"valid: \[.*'lr'.*'recenter'.*'seed'"):
        config_for("mehl+", learning_rate=0.1)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['algorithm', 'nope'\] for SoupConfig; valid:"):
        SoupConfig.from_options(nope=1, algorithm=Algorithm())  # a group is not an option
    with pytest.raises(TypeError, match=r"valid: \[.*'check_basin'.*'device'"):
        with_options(HYPERPLANE_DEFAULTS, "hl", devcie="cpu")


BAD_VALUES = [  # (group, options, what the message says)
    (Algorithm, {"lr": 0.0}, "lr > 0"), (Algorithm, {"weight_decay": -1.0}, "weight_decay >= 0"),
    (Algorithm, {"schedule": "linear"}, "schedule must be"), (Algorithm, {"warmup": 1.0}, "warmup is a fraction"),
    (Algorithm, {"ties": "maybe"}, "ties must be"), (Algorithm, {"epochs": 0.0}, "epochs must be > 0"),
    (Algorithm, {"inner_iterations": 0}, "inner_iterations must be >= 1"),
    (Algorithm, {"outer_iterations": 0}, "outer_iterations must be >= 1"),
    (Algorithm, {"model_batch_size": 0}, "model_batch_size must be >= 1"),
    (Algorithm, {"batch_size": 0}, "batch_size must be >= 1"),
    (Algorithm, {"scale_grid": ()}, "scale_grid must hold at least one finite number"),
    (Algorithm, {"extend_passes": 0}, "extend_passes must be >= 1"),
    (Variant, {"recenter": True, "decentralize": False}, "cannot be combined with decentralize=False"),
    (Systems, {"direction_dtype": "nope"}, "is not a torch dtype"),
    (Systems, {"direction_dtype": torch.int8}, "must be a floating torch dtype"),
    (Systems, {"autocast": "fp8"}, "autocast must be None or one of"),
    (Systems, {"sync_every": 0}, "sync_every must be >= 1"),
    (Systems, {"parallel": "pipeline"}, "parallel must be 'data', 'model' or None"),
    (Run, {"eval_every": 0}, "eval_every must be >= 1"),
]


@pytest.mark.parametrize("group, options, message", BAD_VALUES,
                         ids=[f"{g.__name__}-{'-'.join(o)}" for g, o, _ in BAD_VALUES])
def test_a_bad_value_raises_value_error_in_its_group(group, options, message):
    with pytest.raises(ValueError, match=message):
        group(**options)
    with pytest.raises(soupkit.SoupkitError, match=message):  # one hierarchy: except SoupkitError catches it
        group(**options)
    with pytest.raises(ValueError, match=message):
        SoupConfig.from_options(**options)
    with pytest.raises(ValueError, match=message):
        config_for("mehl+", **options)


def test_refused_options_and_methods_are_soupkit_errors(bn_setup):
    model, pool, loader = bn_setup
    with pytest.raises(soupkit.errors.OptionError, match="lr > 0"):
        soupkit.make_soup("mehl+", model, pool, loader, lr=-1.0, progress=False)
    with pytest.raises(soupkit.errors.UnknownOptionError, match="learning_rate"):
        soupkit.make_soup("mehl+", model, pool, loader, learning_rate=0.1, progress=False)
    with pytest.raises(soupkit.SoupkitError, match="unknown soup method 'nosuch'"):
        soupkit.make_soup("nosuch", model, pool, loader)
    assert issubclass(soupkit.errors.UnknownOptionError, TypeError)
    assert issubclass(soupkit.errors.OptionError, ValueError)


def test_every_group_has_a_bad_value_tried():
    assert {g for g, _, _ in BAD_VALUES} == set(GROUPS.values())


def test_make_soups_flat_options_land_in_their_groups(bn_setup):
    model, states, loader = bn_setup
    seen: list[SoupConfig] = []

    def capture(model, pool, loader, cfg) -> SoupResult:
        seen.append(cfg)
        return SoupResult("capture", pool.load(0, cfg.systems.device, cfg.systems.dtype),
                          torch.eye(len(pool))[0], stats={"epochs": 0})

    register("capture", Method(capture, "records its config", "Capture", "capture", "capture", "tab:cyan",
                               defaults=HYPERPLANE_DEFAULTS, constructs=False))
    try:
        soupkit.make_soup("capture", model, states[:2], loader, lr=0.02, clip_grad_norm=1.0, ties="accept",
                          normalize_directions=True, recenter=True, device="cpu", sync_every=3,
                          direction_dtype="bf16", progress=False, seed=11, eval_every=7, check_basin=False)
    finally:
        METHODS.pop("capture")
    cfg, = seen
    assert cfg.algorithm == replace(HYPERPLANE_DEFAULTS.algorithm, lr=0.02, clip_grad_norm=1.0, ties="accept")
    assert cfg.variant == Variant(normalize_directions=True, recenter=True)
    assert cfg.systems == Systems(device="cpu", sync_every=3, direction_dtype=torch.bfloat16)
    assert cfg.run == Run(progress=False, seed=11, eval_every=7, check_basin=False)

    # and a real method runs by them: b and the inner steps reach MEHL's loop
    result = soupkit.make_soup("mehl+", model, states, loader, model_batch_size=2, inner_iterations=3,
                               outer_iterations=2, progress=False)
    assert (result.stats["model_batch_size"], result.stats["inner_iterations"]) == (2, 3)
    assert result.stats["outer_iterations"] == 2


def test_main_table_settings_are_the_defaults_of_the_runs_built_on_them():
    """config.MAIN_TABLE_SETTINGS holds the main table's numbers once: the zoos' loaders, RunSpec, seed_study,
    SideStudySettings and the ablations' Setting default to them, and it takes its seed and learning settings from
    the methods' defaults."""
    import inspect

    from soupkit.config import LEARNED_DEFAULTS, MAIN_TABLE_SETTINGS as main
    from soupkit.experiments.ablations import Setting
    from soupkit.experiments.run import RunSpec
    from soupkit.experiments.seed_studies import SideStudySettings
    from soupkit.experiments.seeds import seed_study
    from soupkit.zoo.base import BaseZoo
    from soupkit.zoo.build import Zoo
    from soupkit.zoo.sources import ExternalZoo

    for loaders in (BaseZoo.loaders, Zoo.loaders, ExternalZoo.loaders):
        params = inspect.signature(loaders).parameters
        for key in ("batch_size", "eval_batch_size", "select_fraction"):
            assert params[key].default == main[key], (loaders.__qualname__, key)
    for key in ("select_fraction", "batch_size", "eval_batch_size", "seed"):
        assert getattr(RunSpec, key) == main[key], key
    params = inspect.signature(seed_study).parameters
    assert [params[k].default for k in ("heldout_size", "batch_size", "eval_batch_size")] == [
        main["heldout_size"], main["batch_size"], main["eval_batch_size"]]
    study = SideStudySettings()
    assert (study.ablation_heldout_size, study.batch_size, study.model_batch_size) == (
        main["heldout_size"], main["batch_size"], main["model_batch_size"])
    assert Setting().model_batch_size == main["model_batch_size"]
    hyperplane = HYPERPLANE_DEFAULTS.algorithm
    assert (main["seed"], main["learned_lr"], main["hyperplane_lr"], main["epochs"]) == (
        Run().seed, LEARNED_DEFAULTS.algorithm.lr, hyperplane.lr, hyperplane.epochs)
