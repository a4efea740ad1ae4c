"""soupkit.zoo.clip: model-soups checkpoint layout, strict loading, and logits equal to ModelWrapper's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from soupkit.errors import CheckpointLayoutError
from soupkit.zoo.clip import (MODEL_SOUPS_ARCH, TEXT_LEFTOVER_KEYS, SoupClassifier, build_model_soups_model,
                              convert_checkpoint, create_clip, load_model_soups_checkpoint, load_weights,
                              preprocess_config, register_model_config, to_model_soups_layout)

TINY = "soupkit-test-tiny-vit-quickgelu"
TINY_CFG = {  # same structure as ViT-B-32-quickgelu, ~30 K parameters
    "embed_dim": 16, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
NUM_CLASSES = 5


@pytest.fixture(scope="module", autouse=True)
def tiny_arch(tmp_path_factory):
    register_model_config(TINY, TINY_CFG, tmp_path_factory.mktemp("configs"))


def _model_soups_file(path, seed=0):
    """Write a checkpoint exactly as model-soups' ModelWrapper saves it; return (path, reference forward)."""
    torch.manual_seed(seed)
    clip = create_clip(TINY).eval()
    del clip.transformer  # what ModelWrapper.__init__ does
    state = {f"model.{k}": v for k, v in clip.state_dict().items()}
    state["classification_head.weight"] = torch.randn(NUM_CLASSES, 16)
    state["classification_head.bias"] = torch.randn(NUM_CLASSES)
    torch.save(state, path)

    def reference(x):
        feats = clip.encode_image(x)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return F.linear(feats, state["classification_head.weight"], state["classification_head.bias"])

    return state, reference


def test_model_soups_checkpoint_loads_strictly_with_same_logits(tmp_path):
    path = tmp_path / "model_0.pt"
    raw, reference = _model_soups_file(path)
    x = torch.randn(3, 3, 32, 32)
    for keep in (False, True):
        state = load_model_soups_checkpoint(path, keep_text_leftovers=keep)
        model = build_model_soups_model(NUM_CLASSES, TINY, keep_text_leftovers=keep).eval()
        assert set(model.state_dict()) == set(state)
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x))
    # the released layout is the image tower + head + exactly the six text leftovers
    kept = load_model_soups_checkpoint(path, keep_text_leftovers=True)
    assert set(kept) == set(raw)
    assert set(raw) - set(load_model_soups_checkpoint(path)) == set(TEXT_LEFTOVER_KEYS)


def test_layout_variants_are_mapped(tmp_path):
    raw, _ = _model_soups_file(tmp_path / "m.pt")
    target = set(to_model_soups_layout(raw))
    data_parallel = {f"module.{k}": v for k, v in raw.items()}
    open_clip_layout = {k.removeprefix("model."): v for k, v in raw.items()}
    full_clip = dict(raw, **{f"model.{k}": v for k, v in create_clip(TINY).state_dict().items()})
    for variant in (data_parallel, open_clip_layout, full_clip):
        assert set(to_model_soups_layout(variant)) == target


def test_layout_errors_name_file_and_keys(tmp_path):
    raw, _ = _model_soups_file(tmp_path / "m.pt")
    model = build_model_soups_model(NUM_CLASSES, TINY)
    state = to_model_soups_layout(raw)
    broken = dict(state)
    del broken["model.visual.proj"]
    broken["model.visual.extra"] = torch.zeros(1)
    broken["classification_head.bias"] = torch.zeros(NUM_CLASSES + 1)
    with pytest.raises(CheckpointLayoutError, match=r"ck\.pt: .*1 missing: model\.visual\.proj.*"
                                                    r"1 unexpected: model\.visual\.extra.*classification_head\.bias"):
        load_weights(model, broken, source="ck.pt")
    torch.save({"model.visual.proj": torch.zeros(2)}, tmp_path / "nohead.pt")
    with pytest.raises(CheckpointLayoutError, match=r"nohead\.pt: no 'classification_head\.weight'"):
        load_model_soups_checkpoint(tmp_path / "nohead.pt")


def test_convert_to_safetensors_roundtrip(tmp_path):
    _, reference = _model_soups_file(tmp_path / "model_1.pt", seed=1)
    out = convert_checkpoint(tmp_path / "model_1.pt", tmp_path / "model_1.safetensors")
    model = build_model_soups_model(NUM_CLASSES, TINY).eval()
    load_weights(model, load_model_soups_checkpoint(out), source=str(out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_fp16_checkpoint_can_be_cast(tmp_path):
    raw, _ = _model_soups_file(tmp_path / "m.pt")
    torch.save({k: v.half() for k, v in raw.items()}, tmp_path / "half.pt")
    state = load_model_soups_checkpoint(tmp_path / "half.pt", dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in state.values())


def _openai_vit_b32_spec() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of OpenAI CLIP ViT-B/32's image tower (width 768, 12 blocks, 7x7 patches + CLS)."""
    w, grid_tokens, out = 768, 50, 512
    spec = {"conv1.weight": (w, 3, 32, 32), "class_embedding": (w,), "positional_embedding": (grid_tokens, w),
            "ln_pre.weight": (w,), "ln_pre.bias": (w,), "ln_post.weight": (w,), "ln_post.bias": (w,),
            "proj": (w, out)}
    for i in range(12):
        b = f"transformer.resblocks.{i}."
        spec.update({b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,),
                     b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
                     b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
                     b + "mlp.c_fc.weight": (4 * w, w), b + "mlp.c_fc.bias": (4 * w,),
                     b + "mlp.c_proj.weight": (w, 4 * w), b + "mlp.c_proj.bias": (w,)})
    return {f"model.visual.{k}": v for k, v in spec.items()}


def test_vit_b32_quickgelu_matches_openai_layout():
    """The real architecture (~3 s to build): keys/shapes a model-soups file must have, QuickGELU, 224 px."""
    model = build_model_soups_model()
    assert isinstance(model, SoupClassifier)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = dict(_openai_vit_b32_spec(), **{"classification_head.weight": (1000, 512),
                                               "classification_head.bias": (1000,)})
    assert got == expected
    acts = {type(m).__name__ for m in model.modules()}
    assert "QuickGELU" in acts and "GELU" not in acts
    cfg = preprocess_config(model)
    assert tuple(cfg["size"]) == (224, 224) and cfg["interpolation"] == "bicubic"
    assert MODEL_SOUPS_ARCH == "ViT-B-32-quickgelu"
