"""Face Fusion (issue 3 "What must hold"): identity slot exactness, order invariance, caching, region masks,
trainable filter, bad input. Models are tiny diffusers UNets with perturbed random weights, converted with
`fusion_jax.weights` (fast to build; every parameter non-trivial)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fusion_jax import weights
from fusion_jax.identity import fusion as F
from fusion_jax.identity.context import IdentityContext
from fusion_jax.models.attention import Attention
from fusion_jax.models.unet import UNet2DConditionModel, UNetConfig
from fusion_jax.schedulers import NoiseSchedule

TINY = UNetConfig(
    sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, cross_attention_dim=16,
    attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def make_unet(seed: int = 0) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(seed)
    reference = TorchUNet.from_config(TINY.to_dict())
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = nnx.eval_shape(lambda: UNet2DConditionModel(TINY, rngs=nnx.Rngs(0)))
    return weights.load_state_dict(model, {k: v.numpy() for k, v in reference.state_dict().items()})


def jitted(model, fn):
    """`fn(model, *args)` compiled, with the model's state as an argument."""
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda st, *args: fn(nnx.merge(graphdef, st), *args))
    return lambda *args: compiled(state, *args)


def inputs(seed=0, batch=2, identities=None, refs=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 8, 8, 4)).astype(np.float32)
    ehs = rng.standard_normal((batch, 5, 16)).astype(np.float32)
    shape = (batch, refs, 8, 8, 4) if identities is None else (batch, identities, refs, 8, 8, 4)
    ref = rng.standard_normal(shape).astype(np.float32)
    empty = rng.standard_normal((1, 5, 16)).astype(np.float32)
    return x, ehs, ref, empty


def base_call(m, x, ehs):
    return m(x, 500, ehs)


@pytest.mark.parametrize("combine", ["joint", "decoupled"])
def test_identity_none_and_strength_zero_are_exactly_base(combine):
    unet = make_unet()
    x, ehs, ref, empty = inputs()
    base = jitted(unet, base_call)(x, ehs)
    cfg = F.FusionConfig(combine=combine, init="copy")
    F.attach_identity_projections(unet, cfg)
    with_refs = jitted(unet, lambda m, x, e, r, emp, s: m(x, 500, e, identity=F.encode_references(
        m, r, emp, cfg, strength=s)))
    assert np.array_equal(jitted(unet, base_call)(x, ehs), base)  # identity=None after attaching
    assert np.array_equal(with_refs(x, ehs, ref, empty, 0.0), base)  # strength 0
    per_sample = np.asarray(with_refs(x, ehs, ref, empty, np.array([[0.0], [1.0]], np.float32)))
    assert np.array_equal(per_sample[0], base[0])  # strength is per sample / identity
    assert np.abs(per_sample[1] - base[1]).max() > 1e-3  # ... and the identity path does act


def test_new_model_differs_from_base_only_through_identity_path():
    unet = make_unet()
    before = weights.state_dict(unet)
    x, ehs, ref, empty = inputs()
    base = jitted(unet, base_call)(x, ehs)
    cfg = F.FusionConfig(combine="decoupled", init="zero")
    names = F.attach_identity_projections(unet, cfg)
    after = weights.state_dict(unet)
    new_keys = set(after) - set(before)
    assert new_keys == {f"{n}.attn2.{p}.weight" for n in names for p in ("to_k_ref", "to_v_ref")}
    assert all(np.array_equal(before[k], after[k]) for k in before)  # base weights untouched
    # init 'zero' + decoupled: the new value projection is zero, so references change nothing yet
    out = jitted(unet, lambda m, x, e, r, emp: m(x, 500, e, identity=F.encode_references(m, r, emp, cfg)))(
        x, ehs, ref, empty)
    assert np.array_equal(out, base)


def _numpy_attention(q, k, v, heads):
    b, lq, d = q.shape
    split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, -1)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, lq, d), s


def _linear(layer, x):
    y = x @ np.asarray(layer.kernel.get_value(), np.float64)
    return y + np.asarray(layer.bias.get_value()) if layer.bias is not None else y


def layer_with_slot(combine: str, seed: int = 0) -> Attention:
    rngs = nnx.Rngs(seed)
    attn = Attention(8, heads=2, dim_head=4, cross_attention_dim=6, kernel="xla", rngs=rngs)
    attn.to_k_ref = nnx.Linear(8, 8, use_bias=False, rngs=rngs)
    attn.to_v_ref = nnx.Linear(8, 8, use_bias=False, rngs=rngs)
    attn.identity_combine = combine
    return attn


@pytest.mark.parametrize("combine", ["joint", "decoupled"])
def test_identity_slot_matches_independent_formula(combine):
    """attn2 with references == to_out(softmax over [text; ref] tokens) (joint) or to_out(text attn +
    strength * ref attn) (decoupled), computed here in float64 NumPy from the same weights."""
    attn = layer_with_slot(combine)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 8)).astype(np.float32)
    text = rng.standard_normal((2, 5, 6)).astype(np.float32)
    tokens = rng.standard_normal((2, 7, 8)).astype(np.float32)
    strength = np.array([[0.7], [1.0]], np.float32)
    ctx = IdentityContext({"l": jnp.asarray(tokens)}, {"l": jnp.zeros((2, 7), jnp.int32)}, jnp.asarray(strength))
    ours = attn(x, text, identity=ctx, layer_name="l", spatial_shape=(4, 4))
    q = _linear(attn.to_q, x)
    kt, vt = _linear(attn.to_k, text), _linear(attn.to_v, text)
    kr, vr = _linear(attn.to_k_ref, tokens), _linear(attn.to_v_ref, tokens)
    if combine == "joint":  # strength s multiplies the reference tokens' softmax weights
        split = lambda a: a.reshape(2, -1, 2, 4)  # noqa: E731
        s_text = np.einsum("bqhd,bkhd->bhqk", split(q), split(kt)) / 2.0
        s_ref = np.einsum("bqhd,bkhd->bhqk", split(q), split(kr)) / 2.0 + np.log(strength)[:, :, None, None]
        s_all = np.concatenate([s_text, s_ref], -1)
        p = np.exp(s_all - s_all.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        mixed = np.einsum("bhqk,bkhd->bqhd", p, np.concatenate([split(vt), split(vr)], 1)).reshape(2, 16, 8)
    else:
        mixed = _numpy_attention(q, kt, vt, 2)[0] + strength[:, :, None] * _numpy_attention(q, kr, vr, 2)[0]
    expected = _linear(attn.to_out[0], mixed)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


def test_joint_output_does_not_depend_on_reference_order():
    unet = make_unet(1)
    cfg = F.FusionConfig(combine="joint")
    F.attach_identity_projections(unet, cfg)
    x, ehs, ref, empty = inputs(refs=3)
    run = jitted(unet, lambda m, x, e, r, emp: m(x, 500, e, identity=F.encode_references(m, r, emp, cfg)))
    out = np.asarray(run(x, ehs, ref, empty))
    permuted = np.asarray(run(x, ehs, ref[:, [2, 0, 1]], empty))
    assert np.abs(out - np.asarray(jitted(unet, base_call)(x, ehs))).max() > 1e-3
    np.testing.assert_allclose(permuted, out, rtol=1e-5, atol=1e-5)


def test_fixed_references_cached_equal_recomputed_every_step():
    unet = make_unet(2)
    cfg = F.FusionConfig(reference_timestep="fixed")
    F.attach_identity_projections(unet, cfg)
    x, ehs, ref, empty = inputs()
    steps = jnp.array([900, 600, 300, 50])

    def denoise(m, x, e, r, emp, cached: bool):
        ctx = F.encode_references(m, r, emp, cfg) if cached else None

        def body(i, lat):
            context = ctx if cached else F.encode_references(m, r, emp, cfg)  # recomputed inside the step
            eps = F.fusion_forward(m, lat, steps[i], e, r, emp, cfg, context=context)
            return lat - 0.1 * eps

        return jax.lax.fori_loop(0, steps.shape[0], body, x)

    cached = jitted(unet, lambda m, *a: denoise(m, *a, cached=True))(x, ehs, ref, empty)
    recomputed = jitted(unet, lambda m, *a: denoise(m, *a, cached=False))(x, ehs, ref, empty)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(recomputed), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("combine", ["joint", "decoupled"])
def test_multi_identity_region_mask_isolates_identities(combine):
    """One attention layer, 4x4 queries, identities A (left half) and B (bottom-right quarter)."""
    attn = layer_with_slot(combine, seed=1)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 16, 8)).astype(np.float32)
    text = rng.standard_normal((1, 5, 6)).astype(np.float32)
    tokens = rng.standard_normal((1, 6, 8)).astype(np.float32)
    ids = jnp.asarray([[0, 0, 0, 1, 1, 1]], jnp.int32)
    boxes = np.array([[[0, 0, 16, 32], [16, 16, 32, 32]]], np.float32)  # pixels of a 32x32 image
    masks = F.region_masks_from_boxes(boxes, (32, 32), [(4, 4)])
    region = np.asarray(masks["4x4"][0])  # (K, 16)
    in_a, in_b = region[0], region[1]
    assert in_a.sum() == 8 and in_b.sum() == 4 and not (in_a & in_b).any()

    def run(tok):
        ctx = IdentityContext({"l": jnp.asarray(tok)}, {"l": ids}, jnp.ones((1, 2)), masks)
        return np.asarray(attn(x, text, identity=ctx, layer_name="l", spatial_shape=(4, 4)))[0]

    out = run(tokens)
    changed_b = tokens.copy()
    changed_b[:, 3:] = rng.standard_normal((1, 3, 8))
    out_b = run(changed_b)
    text_only = np.asarray(attn(x, text))[0]
    assert np.array_equal(out[in_a], out_b[in_a])  # A's queries do not see B's tokens
    assert np.abs(out[in_b] - out_b[in_b]).max() > 1e-4  # B's queries do
    outside = ~(in_a | in_b)
    np.testing.assert_array_equal(out[outside], text_only[outside])  # outside all regions: text only
    assert np.abs(out[in_a] - text_only[in_a]).max() > 1e-4


def _grads(unet, mode, cfg, batch):
    graphdef, selected, rest = nnx.split(unet, F.trainable_filter(mode), ...)
    schedule = NoiseSchedule()

    @jax.jit
    def grad_fn(selected, rest):
        def loss(sel):
            return F.fusion_loss(nnx.merge(graphdef, sel, rest), batch, jax.random.key(0), schedule, cfg)[0]
        return jax.grad(loss)(selected)

    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(grad_fn(selected, rest))}


def _fusion_batch(refs_dropped: bool = False):
    x, ehs, ref, empty = inputs(seed=3)
    return {"latents": jnp.asarray(x), "text_emb": jnp.asarray(ehs), "empty_text_emb": jnp.asarray(empty),
            "reference_latents": jnp.asarray(ref)}


def test_gradients_reach_only_what_the_trainable_filter_selects():
    unet = make_unet(3)
    cfg = F.FusionConfig(init="copy", text_dropout=0.0, reference_dropout=0.0, lora_rank=2)
    names = F.attach_identity_projections(unet, cfg)
    n_wrapped = F.attach_lora(unet, cfg.lora_rank)
    assert n_wrapped == 4 * 2 * len(names)  # to_q, to_k, to_v, to_out[0] of attn1 and attn2 in every block
    all_params = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(unet, nnx.Param))}
    batch = _fusion_batch()

    grads = _grads(unet, "identity", cfg, batch)
    assert set(grads) == {p for p in all_params if ".to_k_ref." in p or ".to_v_ref." in p}
    assert len(grads) == 2 * len(names)
    assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in grads.values())

    lora_grads = _grads(unet, "identity+lora", cfg, batch)
    lora_keys = {p for p in lora_grads if ".lora." in p}
    assert set(lora_grads) == set(grads) | lora_keys and len(lora_keys) == 2 * n_wrapped
    assert all(np.abs(g).max() > 0 for p, g in lora_grads.items() if p.endswith("lora_b"))  # B starts at 0

    graphdef, selected, rest = nnx.split(unet, F.trainable_filter("all"), ...)
    assert len(jax.tree.leaves(rest)) == 0 and len(jax.tree.leaves(selected)) == len(all_params)

    # references dropped for every sample: the identity projections get exactly zero gradient
    dropped = _grads(unet, "identity", F.FusionConfig(text_dropout=0.0, reference_dropout=1.0), batch)
    assert all(np.array_equal(g, np.zeros_like(g)) for g in dropped.values())


def test_bad_input_errors_name_the_argument():
    unet = make_unet()
    cfg = F.FusionConfig()
    F.attach_identity_projections(unet, cfg)
    x, ehs, ref, empty = inputs(identities=2)
    with pytest.raises(ValueError, match="ref_latents"):
        F.encode_references(unet, ref[:, 0, 0], empty, cfg)  # (B, h, w, C): no reference axis
    with pytest.raises(ValueError, match="ref_latents"):
        F.encode_references(unet, ref[..., :3], empty, cfg)  # wrong channel count
    with pytest.raises(ValueError, match="ref_latents"):
        F.encode_references(unet, ref[:1], empty, cfg, batch=2)  # batch mismatch
    three_boxes = np.tile(np.array([[[0, 0, 8, 8]]], np.float32), (2, 3, 1))
    with pytest.raises(ValueError, match="boxes"):
        F.encode_references(unet, ref, empty, cfg, boxes=three_boxes, image_size=(64, 64), latent_size=(8, 8))
    outside = np.array([[[0, 0, 8, 8], [40, 40, 70, 60]]] * 2, np.float32)
    with pytest.raises(ValueError, match="boxes"):
        F.encode_references(unet, ref, empty, cfg, boxes=outside, image_size=(64, 64), latent_size=(8, 8))
    with pytest.raises(ValueError, match="fusion.combine"):
        F.FusionConfig(combine="concat")
    with pytest.raises(ValueError, match="train.trainable"):
        F.trainable_filter("lora")
    with pytest.raises(ValueError, match="fusion.blocks"):
        F.participating_layers(unet, F.FusionConfig(blocks=("left_blocks",)))
    with pytest.raises(ValueError, match="fusion_loss: batch has no 'reference_latents'"):
        F.fusion_loss(unet, {"latents": x, "text_emb": ehs, "empty_text_emb": empty}, jax.random.key(0),
                      NoiseSchedule(), cfg)


def test_current_references_inside_a_sampling_loop_with_remat():
    """`current`: references are re-encoded at every step's t inside lax.fori_loop (the sampler's shape), also
    with remat on (the capture crosses nnx.remat); remat does not change the forward values."""
    from fusion_jax.models.unet import set_remat

    unet = make_unet(4)
    cfg = F.FusionConfig(reference_timestep="current")
    F.attach_identity_projections(unet, cfg)
    x, ehs, ref, empty = inputs()
    ref_noise = np.random.default_rng(5).standard_normal(ref.shape).astype(np.float32)
    steps = jnp.array([800, 400, 100])
    schedule = NoiseSchedule()

    def denoise(m, x, e, r, emp, noise):
        def body(i, lat):
            eps = F.fusion_forward(m, lat, steps[i], e, r, emp, cfg, schedule=schedule, ref_noise=noise)
            return lat - 0.1 * eps
        return jax.lax.fori_loop(0, steps.shape[0], body, x)

    plain = np.asarray(jitted(unet, denoise)(x, ehs, ref, empty, ref_noise))
    base = np.asarray(jitted(unet, lambda m, x, e: jax.lax.fori_loop(
        0, 3, lambda i, lat: lat - 0.1 * m(lat, steps[i], e), x))(x, ehs))
    assert np.abs(plain - base).max() > 1e-3
    set_remat(unet, True)
    remat = np.asarray(jitted(unet, denoise)(x, ehs, ref, empty, ref_noise))
    np.testing.assert_allclose(remat, plain, rtol=1e-5, atol=1e-5)
