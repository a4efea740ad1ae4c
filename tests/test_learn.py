"""The shared loop's pieces: inner-product gradients, schedule, batch stream."""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

import soupkit
from soupkit import CheckpointPool
from soupkit.engine.batches import BatchStream
from soupkit.engine.loop import HyperplaneSpace, SimplexSpace, lr_lambda


@pytest.mark.parametrize("layerwise", [False, True])
def test_inner_product_gradient_equals_autograd_through_the_full_combination(bn_setup, layerwise):
    base, states, loader = bn_setup
    k = len(states)
    layers = soupkit.layer_map(base, layerwise)
    pool = CheckpointPool(states)
    centre = {key: v for key, v in pool.center(dtype=torch.float64).items() if key in layers.forward_keys}
    stack = pool.load_stack(range(k), dtype=torch.float64, subtract=centre, keys=layers.mixed)
    alpha = torch.randn(k, len(layers), dtype=torch.float64) * 0.3
    space = HyperplaneSpace(base.double(), {key: v.clone() for key, v in centre.items()}, stack, layers,
                            torch.zeros_like(alpha))
    x, y = loader[0]
    x = x.double()
    w = alpha.clone().requires_grad_(True)
    base.eval()
    space.loss(w, x, y)
    ours = w.grad.clone()

    # reference: autograd through θ = Σ_i c_i θ_i with c_i = 1/K + α_i − mean(α): the coefficients of θ_i
    a = alpha.clone().requires_grad_(True)
    c = 1.0 / k + a - a.mean(dim=0, keepdim=True)
    theta = {}
    for key in layers.forward_keys:
        if key in layers.fixed:
            theta[key] = states[0][key]
        else:
            g = layers.group[key]
            col = c[:, g] if g >= 0 else c.mean(dim=1)
            combo = sum(col[i] * states[i][key].double() for i in range(k))
            theta[key] = combo if key in layers.trainable else combo.detach()
    loss = torch.nn.functional.cross_entropy(functional_call(base, theta, (x,)), y)
    (ref,) = torch.autograd.grad(loss, [a])
    base.float()
    assert torch.allclose(ours, ref, atol=1e-10, rtol=1e-8), (ours - ref).abs().max()


def test_simplex_space_gradient_is_autograd(bn_setup):
    base, states, loader = bn_setup
    layers = soupkit.layer_map(base, True)
    space = SimplexSpace(base, [dict(s) for s in states], layers, logit_scale=False)
    w = torch.randn(len(states), len(layers)).requires_grad_(True)
    x, y = loader[0]
    base.eval()
    space.loss(w, x, y)
    ours = w.grad.clone()
    w2 = w.detach().clone().requires_grad_(True)
    p = torch.softmax(w2, 0)
    theta = {k: sum(p[i, layers.group[k]] * s[k] for i, s in enumerate(states)) for k in layers.trainable}
    pb = torch.cat([p, p.mean(1, keepdim=True)], 1).detach()
    theta.update({k: sum(pb[i, layers.group[k]] * s[k] for i, s in enumerate(states)) for k in layers.buffers})
    theta.update({k: states[0][k] for k in layers.fixed})
    loss = torch.nn.functional.cross_entropy(functional_call(base, theta, (x,)), y)
    (ref,) = torch.autograd.grad(loss, [w2])
    assert torch.allclose(ours, ref, atol=1e-6)


def test_move_to_matches_the_closed_form(bn_setup):
    base, states, _ = bn_setup
    layers = soupkit.layer_map(base, True)
    pool = CheckpointPool(states)
    centre = {k: v for k, v in pool.center().items() if k in layers.forward_keys}
    stack = pool.load_stack([0, 2], subtract=centre, keys=layers.mixed)
    space = HyperplaneSpace(base, {k: v.clone() for k, v in centre.items()}, stack, layers, torch.zeros(2, len(layers)))
    w = torch.randn(2, len(layers))
    for step in (0.3, 0.7, 1.0):  # moving in several steps ends where one jump would
        space.move_to(w * step)
    g = layers.group["fc1.weight"]
    expected = centre["fc1.weight"] + w[0, g] * stack["fc1.weight"][0] + w[1, g] * stack["fc1.weight"][1]
    assert torch.allclose(space.theta["fc1.weight"], expected, atol=1e-6)


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(100, 0.2, "cosine")
    assert f(0) == pytest.approx(1 / 20) and f(19) == pytest.approx(1.0)
    assert f(20) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(99) < 0.01
    g = lr_lambda(10, 0.0, "constant")
    assert all(g(s) == 1.0 for s in range(10))


def test_batch_stream_counts_epochs_and_rebatches():
    data = [(torch.randn(n, 2), torch.zeros(n, dtype=torch.long)) for n in (5, 5, 3)]
    s = BatchStream(data, "cpu", batch_size=4)
    assert s.examples_per_epoch == 13 and s.batches_per_epoch == math.ceil(13 / 4)
    sizes = [len(s.next()[1]) for _ in range(4)]
    assert sizes == [4, 4, 4, 1] and s.epochs == pytest.approx(1.0)
    s.next()
    assert s.epochs == pytest.approx(17 / 13)
    with pytest.raises(ValueError, match="empty"):
        BatchStream([], "cpu")
    with pytest.raises(TypeError, match="re-iterable"):
        BatchStream(iter(data), "cpu")


def test_learned_soup_runs_at_a_constant_lr_by_default(bn_setup, monkeypatch):
    # model-soups' learned soup keeps lr 0.05 for every step (its cosine_lr is never called)
    import soupkit.engine.loop as learn  # noqa: PLC0415

    seen: list[tuple[int, float, str]] = []
    factors: list[float] = []

    def recording(steps, warmup, schedule):
        seen.append((steps, warmup, schedule))
        f = lr_lambda(steps, warmup, schedule)
        return lambda s: factors.append(f(s)) or factors[-1]

    lrs: list[float] = []
    step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(learn, "lr_lambda", recording)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    base, states, loader = bn_setup
    soupkit.make_soup("learned+", base, states, loader, progress=False, inner_iterations=10)
    assert seen == [(10, 0.0, "constant")]
    assert factors and all(f == 1.0 for f in factors)
    assert lrs[-10:] == [0.05] * 10  # the ten inner steps (earlier ones: make_soup's optimizer warm-up)
