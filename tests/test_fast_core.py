"""The GPU-efficient MEHL core (issue #5) checked on the CPU: [b, P] buffer, fused update, bf16 directions,
autocast, deferred finite checks, key-by-key reads, background prefetch."""
from __future__ import annotations

import pytest
import torch

import soupkit
from soupkit import CheckpointPool, make_soup
from soupkit.engine import directions
from soupkit.errors import DivergenceError
from soupkit.engine.loop import HyperplaneSpace

from conftest import save_files

FAST = dict(inner_iterations=12, progress=False, check_basin=False)


def _space_inputs(base, states, dtype=torch.float64):
    layers = soupkit.layer_map(base, True)
    pool = CheckpointPool(states)
    centre = {k: v for k, v in pool.center(dtype=dtype).items() if k in layers.forward_keys}
    stack = pool.load_stack(range(len(states)), dtype=dtype, subtract=centre, keys=layers.mixed)
    return layers, centre, stack


def test_stack_is_one_buffer_and_its_inner_products_equal_the_per_tensor_ones(bn_setup):
    base, states, _ = bn_setup
    layers, centre, stack = _space_inputs(base, states)
    assert isinstance(stack, directions.Stack) and stack.flat.shape == (5, sum(centre[k].numel() for k in layers.mixed))
    assert stack.flat.is_contiguous()
    for k in layers.mixed:  # the per-key tensors are views of the one buffer
        assert stack[k].untyped_storage().data_ptr() == stack.flat.untyped_storage().data_ptr()
        assert torch.equal(stack[k][3], states[3][k].double() - centre[k])
    g = {k: torch.randn_like(centre[k]) for k in layers.mixed}
    for k in layers.mixed:
        ref = torch.stack([(states[i][k].double() - centre[k]).mul(g[k]).sum() for i in range(5)])
        assert torch.allclose(directions.inner(stack[k].reshape(5, -1), g[k]), ref, rtol=1e-12, atol=1e-12)


def test_fused_update_equals_the_reference_update(bn_setup):
    base, states, _ = bn_setup
    layers, centre, stack = _space_inputs(base, states)
    w0 = torch.zeros(5, len(layers), dtype=torch.float64)
    space = HyperplaneSpace(base, {k: v.clone() for k, v in centre.items()}, stack, layers, w0)
    w = torch.randn(5, len(layers), dtype=torch.float64)
    moved = space.move_to(w)
    for k in layers.mixed:
        g = layers.group[k]
        col = w[:, g] if g >= 0 else w.mean(dim=1)
        ref = centre[k] + torch.tensordot(col, stack[k], dims=1)  # the reference: Σ_i w_i D_i, then added
        assert torch.allclose(moved[k], ref, rtol=1e-12, atol=1e-12), k


def test_bf16_directions_are_close_to_fp32(bn_setup):
    """Stored in bf16 (8 significant bits, unit roundoff u = 2^-8), every direction element is within u of its
    fp32 value, so an inner product <d, g> moves by at most u Σ|d_i g_i| and a move Σ_j c_j d_j by u Σ_j |c_j d_j|
    (the bounds hold whatever the cancellation; the products accumulate in fp32)."""
    base, states, _ = bn_setup
    layers = soupkit.layer_map(base, True)
    pool = CheckpointPool(states)
    centre = {k: v for k, v in pool.center().items() if k in layers.forward_keys}
    full = pool.load_stack(range(5), subtract=centre, keys=layers.mixed)
    half = pool.load_stack(range(5), dtype=torch.bfloat16, subtract=centre, keys=layers.mixed)
    assert half.flat.dtype == torch.bfloat16 and half.flat.element_size() * 2 == full.flat.element_size()
    u = 2.0 ** -8
    gen = torch.Generator().manual_seed(0)
    rounded = False
    for k in layers.trainable:
        d = full[k].reshape(5, -1)
        g = torch.randn(centre[k].shape, generator=gen)
        a, b = directions.inner(d, g), directions.inner(half[k].reshape(5, -1), g)
        assert b.dtype == torch.float32
        assert ((a - b).abs() <= u * (d.abs() @ g.reshape(-1).abs()) * 1.01 + 1e-6).all(), k
        rounded |= not torch.equal(a, b)
        c = torch.randn(5, generator=gen)
        x, y = centre[k].clone(), centre[k].clone()
        directions.add_moved(x, d, c)
        directions.add_moved(y, half[k].reshape(5, -1), c)
        bound = u * (c.abs() @ d.abs()).reshape(x.shape) * 1.01 + 1e-6
        assert ((x - y).abs() <= bound).all(), k
    assert rounded  # bf16 did round some products: the bounds were put to the test


def test_bf16_directions_and_autocast_soups_stay_close(bn_setup):
    base, states, loader = bn_setup
    ref = make_soup("mehl+", base, states, loader, model_batch_size=2, **FAST)
    half = make_soup("mehl+", base, states, loader, model_batch_size=2, direction_dtype="bf16", **FAST)
    cast = make_soup("mehl+", base, states, loader, model_batch_size=2, autocast="bf16", **FAST)
    for other in (half, cast):
        # bf16 has 8 bits of mantissa: losses agree to ~1 %
        assert other.history == pytest.approx(ref.history, rel=2e-2, abs=2e-2)
        assert torch.allclose(other.coefficients, ref.coefficients, atol=5e-2)


def test_autocast_runs_the_forward_in_bf16_on_cpu(bn_setup):
    base, states, loader = bn_setup
    layers, centre, stack = _space_inputs(base, states, torch.float32)
    w0 = torch.zeros(5, len(layers))
    seen = []
    handle = base.fc2.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        plain = HyperplaneSpace(base, {k: v.clone() for k, v in centre.items()}, stack, layers, w0)
        cast = HyperplaneSpace(base, {k: v.clone() for k, v in centre.items()}, stack, layers, w0,
                               autocast=torch.bfloat16)
        x, y = loader[0]
        w1, w2 = w0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        base.eval()
        a, b = plain.loss(w1, x, y), cast.loss(w2, x, y)
    finally:
        handle.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert b.dtype == torch.float32 and w2.grad.dtype == torch.float32
    assert abs(a.item() - b.item()) < 2e-2 * abs(a.item())
    assert torch.allclose(w1.grad, w2.grad, atol=2e-2 * w1.grad.abs().max().item())


@pytest.mark.parametrize("sync_every", [1, 5, 50])
def test_deferred_checks_still_raise_on_nan_within_n_steps(bn_setup, sync_every):
    base, states, loader = bn_setup
    seen = []

    class TurnsNaN(list):  # batch 7 onwards is NaN (the checks before the run read the first batches only)
        def __iter__(self):
            for x, y in super().__iter__():
                seen.append(len(seen))
                yield (x * float("nan") if len(seen) > 7 else x), y

    data = TurnsNaN(loader)
    with pytest.raises(DivergenceError, match=r"non-finite loss/gradient at inner step \d+") as err:
        make_soup("hl", base, states, data, inner_iterations=40, sync_every=sync_every, progress=False,
                  check_basin=False)
    step = int(str(err.value).split("inner step ")[1].split()[0])
    served = len(seen)
    assert step <= 7  # the step it started at, wherever the check happened
    assert served - step <= sync_every + 8  # it stopped within N steps (+ the batches read before the run)


def test_deferred_label_check_on_the_host_path(bn_setup):
    base, states, loader = bn_setup
    bad = [(x, y + 5) for x, y in loader]
    with pytest.raises(soupkit.DataError, match="labels must lie in"):
        make_soup("mehl", base, states, bad, model_batch_size=2, sync_every=10, **FAST)


def test_history_does_not_depend_on_sync_every(bn_setup):
    base, states, loader = bn_setup
    a = make_soup("mehl+", base, states, loader, model_batch_size=2, sync_every=1, **FAST)
    b = make_soup("mehl+", base, states, loader, model_batch_size=2, sync_every=7, **FAST)
    assert a.history == b.history and torch.equal(a.coefficients, b.coefficients)


def test_key_by_key_reads_lower_mehls_resident_models(bn_setup, tmp_path):
    """From files, a checked model is read tensor by tensor into the stack: b models resident, not b + 1."""
    base, states, loader = bn_setup
    paths = save_files(states, tmp_path)
    in_memory = CheckpointPool(states)
    files = CheckpointPool(paths)
    a = make_soup("mehl+", base, in_memory, loader, model_batch_size=2, **FAST)
    b = make_soup("mehl+", base, files, loader, model_batch_size=2, **FAST)
    assert a.stats["max_resident_models"] == 3  # in-memory sources: the stack + the model being read
    assert b.stats["max_resident_models"] == 2  # files: the stack only
    assert torch.equal(a.coefficients, b.coefficients) and a.history == b.history


def test_load_stack_from_files_equals_in_memory(bn_setup, tmp_path):
    base, states, _ = bn_setup
    keys = list(soupkit.layer_map(base, True).mixed)
    centre = CheckpointPool(states).center()
    for fmt in ("safetensors", "pt"):
        (tmp_path / fmt).mkdir()
        pool = CheckpointPool(save_files(states, tmp_path / fmt, fmt))
        pool.check_values()
        pool.max_resident = pool.resident
        got = pool.load_stack([4, 1], subtract=centre, keys=keys)
        assert pool.max_resident == 2
        for k in keys:
            assert torch.equal(got[k][0], states[4][k] - centre[k]) and torch.equal(got[k][1], states[1][k] - centre[k])


def test_background_prefetch_gives_identical_results(bn_setup, tmp_path):
    base, states, loader = bn_setup
    paths = save_files(states, tmp_path)
    for options in (dict(), dict(recenter=True, normalize_directions=True), dict(direction_dtype=torch.bfloat16)):
        a = make_soup("mehl+", base, paths, loader, model_batch_size=2, **options, **FAST)
        b = make_soup("mehl+", base, paths, loader, model_batch_size=2, prefetch=True, **options, **FAST)
        assert torch.equal(a.coefficients, b.coefficients) and a.history == b.history, options
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_clip_scales_the_products_like_clipping_the_gradient(bn_setup):
    base, states, loader = bn_setup
    layers, centre, stack = _space_inputs(base, states)
    w0 = torch.zeros(5, len(layers), dtype=torch.float64)
    x, y = loader[0]
    base.double().eval()
    try:
        grads = {}
        for clip in (None, 1e-3):
            space = HyperplaneSpace(base, {k: v.clone() for k, v in centre.items()}, stack, layers, w0,
                                    clip_grad_norm=clip)
            w = w0.clone().requires_grad_(True)
            space.loss(w, x.double(), y)
            grads[clip] = w.grad
        # the reference: ∇θ clipped to norm 1e-3, then the inner products
        leaves = {k: centre[k].clone().requires_grad_(True) for k in layers.trainable}
        loss = torch.nn.functional.cross_entropy(torch.func.functional_call(base, {**centre, **leaves}, (x.double(),)), y)
        g = torch.autograd.grad(loss, list(leaves.values()))
        norm = torch.sqrt(sum(t.pow(2).sum() for t in g))
    finally:
        base.float()
    assert torch.allclose(grads[1e-3], grads[None] * min(1.0, 1e-3 / (norm.item() + 1e-6)), rtol=1e-10, atol=1e-14)
