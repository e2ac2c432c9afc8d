"""Pixel folding (models/pixels.py) against PyTorch's pixel_unshuffle, the exact codec round trip, and a folded
pixel UNet trained through the experiment (the loss sees the same folded targets the sampler decodes)."""

import numpy as np
import pytest
import torch

from fusion_jax.models.pixels import PixelCodec, fold_factor, fold_pixels, unfold_pixels


def _torch_fold(images: np.ndarray, f: int) -> np.ndarray:
    """NHWC -> pixel_unshuffle (NCHW, channel order C, row, col) -> our NHWC order (row, col, C)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    y = torch.nn.functional.pixel_unshuffle(x, f)  # (N, C*f*f, H/f, W/f), channel = c*f*f + i*f + j
    n, _, h, w = y.shape
    c = images.shape[-1]
    y = y.reshape(n, c, f, f, h, w).permute(0, 4, 5, 2, 3, 1)  # (N, H/f, W/f, i, j, C)
    return y.reshape(n, h, w, f * f * c).numpy()


@pytest.mark.parametrize("f", [1, 2, 4])
def test_fold_matches_pixel_unshuffle_and_inverts(f):
    images = np.random.default_rng(0).normal(size=(2, 8, 16, 3)).astype(np.float32)
    folded = np.asarray(fold_pixels(images, f))
    np.testing.assert_array_equal(folded, _torch_fold(images, f))
    np.testing.assert_array_equal(np.asarray(unfold_pixels(folded, f)), images)
    codec = PixelCodec(f)
    assert codec.config.downscale_factor == f and 2 ** (len(codec.config.block_out_channels) - 1) == f
    np.testing.assert_array_equal(np.asarray(codec.decode(codec.encode(images).mean)), images)


def test_fold_errors_name_the_problem():
    assert fold_factor(3) == 1 and fold_factor(12) == 2 and fold_factor(48) == 4
    with pytest.raises(ValueError, match="3 \\* f\\^2 input channels.*has 4"):
        fold_factor(4)
    with pytest.raises(ValueError, match="multiple of 2"):
        fold_pixels(np.zeros((1, 5, 4, 3), np.float32), 2)
    with pytest.raises(ValueError, match="power of two"):
        PixelCodec(3)


def test_folded_pixel_unet_loss_sees_folded_targets(tmp_path):
    """One text-to-image loss of a 12-channel pixel UNet: equal to the plain loss computed on fold(target)."""
    import jax
    import jax.numpy as jnp

    from fusion_jax import miniature as mm
    from fusion_jax.config import load_config
    from fusion_jax.config_files import shipped_config_dir
    from fusion_jax.experiment import build_experiment, text_to_image_loss

    model_cfg = mm.MiniatureModelConfig(widths=(8, 16), text_width=16)
    mm.write_miniature_pipeline(tmp_path / "pipeline", model_cfg)
    config = load_config(str(shipped_config_dir() / "synthfaces" / "text_to_image.yaml"), [
        f"model.pipeline={tmp_path / 'pipeline'}", f"workdir={tmp_path / 'run'}", "data.batch_size=2"])
    exp = build_experiment(config)
    assert exp.unet_config.in_channels == 12 and exp.unet_config.sample_size == 16
    from flax import nnx

    model = exp.model_factory(nnx.Rngs(0))
    batch = next(iter(exp.batch_iterator_factory(config)))
    assert "references" not in batch  # the text-to-image stream renders none (num_references 0)
    rng = jax.random.key(3)
    loss, _ = exp.loss_fn(model, batch, rng)
    k_in, k_obj = jax.random.split(rng)
    text = model.text_encoder(batch["input_ids"]).last_hidden_state
    empty = model.text_encoder(jnp.asarray(exp.tokenizer([""])[0])[None]).last_hidden_state
    expected, _ = text_to_image_loss(model.unet, fold_pixels(batch["target"], 2), text, empty, k_obj, exp.schedule,
                                     config.objective.text_dropout, config.objective.min_snr_gamma)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
