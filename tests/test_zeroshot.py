"""soupkit.zoo.zeroshot: θ_0 of model-soups' fine-tunes, in their checkpoint layout, accepted beside them."""
from __future__ import annotations

import pytest
import torch

from soupkit.pool.checkpoint_pool import CheckpointPool
from soupkit.pool.formats import load_state_dict
from soupkit.runtime._compat import import_open_clip
from soupkit.zoo.clip import build_model_soups_model, create_clip
from soupkit.zoo.zeroshot import main, zeroshot_head, zeroshot_state_dict

TINY = "soupkit-test-zeroshot-tiny"
TINY_CFG = {  # the tokenizer emits CLIP's full vocabulary
    "embed_dim": 16, "quick_gelu": True,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
NAMES = ["cat", "dog", "bird"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


@pytest.fixture()
def arch(tmp_path):
    from soupkit.zoo.clip import register_model_config

    register_model_config(TINY, TINY_CFG, tmp_path / "configs")
    return TINY


def test_head_is_the_scaled_unit_mean_of_the_template_embeddings(arch):
    torch.manual_seed(0)
    clip = create_clip(arch).eval()
    head = zeroshot_head(clip, arch, NAMES, TEMPLATES)
    assert head.shape == (3, 16)
    tokenizer = import_open_clip().get_tokenizer(arch)
    with torch.no_grad():  # by hand: per class, unit embeddings of each template, their mean, normalised, x scale
        for c, name in enumerate(NAMES):
            emb = clip.encode_text(tokenizer([t.format(name) for t in TEMPLATES]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            torch.testing.assert_close(head[c], mean / mean.norm() * clip.logit_scale.exp(), rtol=1e-5, atol=1e-6)


def test_checkpoint_has_the_released_layout_and_joins_a_pool_as_theta0(arch, tmp_path):
    torch.manual_seed(0)
    state = zeroshot_state_dict(arch, None, classnames=NAMES, templates=TEMPLATES)
    released = build_model_soups_model(3, arch, keep_text_leftovers=True).state_dict()
    assert set(state) == set(released) and all(state[k].shape == released[k].shape for k in state)
    assert torch.count_nonzero(state["classification_head.bias"]) == 0
    fine_tune = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(fine_tune, tmp_path / "model_0.pt")
    theta0 = tmp_path / "zeroshot.pt"
    torch.save(state, theta0)
    pool = CheckpointPool([tmp_path / "model_0.pt"], pretrained=theta0)
    torch.testing.assert_close(pool.load_pretrained()["classification_head.weight"],
                               state["classification_head.weight"])


def test_command_writes_imagenet_zeroshot_safetensors(arch, tmp_path, capsys, monkeypatch):
    # one template instead of OpenAI's 80 keeps this to seconds; the 1 000 ImageNet names stay
    monkeypatch.setattr(import_open_clip(), "OPENAI_IMAGENET_TEMPLATES", TEMPLATES[:1])
    out = tmp_path / "zs" / "zeroshot.safetensors"
    assert main(["--arch", arch, "--pretrained", "none", "--out", str(out), "--no-progress"]) == 0
    state = load_state_dict(out)
    assert state["classification_head.weight"].shape == (1000, 16)  # ImageNet's classes
    assert "pretrained=" in capsys.readouterr().out
    with pytest.raises(ValueError, match="safetensors"):
        main(["--arch", arch, "--pretrained", "none", "--out", str(tmp_path / "zs.pt")])
