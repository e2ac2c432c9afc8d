"""Write a complete, tiny, randomly initialised Stable Diffusion pipeline folder in diffusers' layout.

Why: with no network and no model weights, the README's first command, the sampler and many tests still need a
real pipeline folder to load. This one is made with our own modules and exported through `fusion_jax.weights`
(no PyTorch needed), and it loads in diffusers / transformers too (`StableDiffusionPipeline.from_pretrained`).

Layout written under `path`:
    model_index.json
    unet/          config.json + diffusion_pytorch_model.safetensors
    vae/           config.json + diffusion_pytorch_model.safetensors
    text_encoder/  config.json + model.safetensors
    tokenizer/     vocab.json + merges.txt (+ tokenizer_config.json, special_tokens_map.json)
    scheduler/     scheduler_config.json

The tokenizer is a genuine CLIP byte-level BPE: its vocabulary holds the 256 byte symbols, each also with the
end-of-word marker `</w>`, a few merges for common English words, and the two special tokens; so any text
tokenizes (lowercase English words mostly character by character).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from flax import nnx

from fusion_jax import weights
from fusion_jax.models.clip import CLIPTextConfig, CLIPTextModel
from fusion_jax.models.unet import UNet2DConditionModel, UNetConfig
from fusion_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77  # tokens per prompt, as in Stable Diffusion
# A few BPE merges (in priority order) so the merge path of the tokenizer is exercised; words without them
# stay character-wise.
TINY_MERGES = (("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>"), ("i", "n"))


# ----------------------------------------------------------------------------------------------------------
# Component configs
# ----------------------------------------------------------------------------------------------------------


def tiny_vocab() -> dict[str, int]:
    """CLIP-layout vocabulary: 256 byte symbols, the same with `</w>`, merge results, then <bos>, <eos>."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in TINY_MERGES] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def tiny_text_encoder_config() -> CLIPTextConfig:
    """A 2-layer, 32-wide CLIP text encoder over the tiny vocabulary (77-token context, like SD)."""
    vocab = tiny_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CONTEXT_LENGTH, hidden_act="quick_gelu",
        bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[EOS_TOKEN],
    )


def tiny_vae_config() -> AutoencoderKLConfig:
    """A two-resolution VAE (images are 2x the latent size), 4 latent channels, SD's scaling factor."""
    return AutoencoderKLConfig(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4,
        sample_size=32, scaling_factor=0.18215,
    )


def tiny_unet_config(cross_attention_dim: int = 32) -> UNetConfig:
    """An SD 1.x-shaped UNet with two resolutions (16 and 32 channels) and cross-attention in both."""
    return UNetConfig(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=cross_attention_dim, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


# ----------------------------------------------------------------------------------------------------------
# Random weights
# ----------------------------------------------------------------------------------------------------------


def randomize_params(model: nnx.Module, seed: int) -> nnx.Module:
    """Fill every parameter (in place; works on an `nnx.eval_shape` model) with seeded NumPy draws.

    Kernels ~ N(0, 1/fan_in) (activations keep their scale through depth), embeddings ~ N(0, 0.02^2) as CLIP,
    norm scales 1 + N(0, 0.02^2), biases N(0, 0.02^2). Host-side NumPy: no per-op JAX compiles, and the same
    seed gives the same bytes on every machine.
    """
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        shape, dtype, leaf = tuple(value.shape), value.dtype, str(path[-1])
        noise = rng.standard_normal(shape)
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            array = noise / np.sqrt(fan_in)
        elif leaf == "scale":
            array = 1.0 + 0.02 * noise
        else:  # bias, embedding, raw parameters such as CLIP's class_embedding
            array = 0.02 * noise
        var.set_value(np.asarray(array, dtype=np.float32).astype(dtype))
    return model


def _random_model(make, seed: int) -> nnx.Module:
    return randomize_params(nnx.eval_shape(make), seed)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer files
# ----------------------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """CLIP / GPT-2's reversible map from the 256 byte values to printable unicode symbols."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(mapping.items()))


def write_tiny_tokenizer(folder: str | os.PathLike) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs) for the tiny vocabulary."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(tiny_vocab(), f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in TINY_MERGES))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    with open(folder / "special_tokens_map.json", "w") as f:
        json.dump(special, f, indent=2)
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH,
                   "do_lower_case": True, **special}, f, indent=2)
    return folder


# ----------------------------------------------------------------------------------------------------------
# The pipeline folder
# ----------------------------------------------------------------------------------------------------------


def _diffusers_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:  # diffusers is only needed to *read* the folder in PyTorch
        return "0.42.0"


def _write_json(file: Path, data: dict) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def write_tiny_pipeline(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny random pipeline to `path` (created; existing component files are replaced).

    The same seed writes the same weights. Returns the folder, ready for `weights.load_pipeline(path)`.
    """
    from fusion_jax.schedulers import NoiseSchedule

    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ValueError(f"path {str(root)!r} exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)

    text_config = tiny_text_encoder_config()
    text_encoder = _random_model(lambda: CLIPTextModel(text_config, rngs=nnx.Rngs(0)), seed)
    vae = _random_model(lambda: AutoencoderKL(tiny_vae_config(), rngs=nnx.Rngs(0)), seed + 1)
    unet_config = tiny_unet_config(cross_attention_dim=text_config.hidden_size)
    unet = _random_model(lambda: UNet2DConditionModel(unet_config, rngs=nnx.Rngs(0)), seed + 2)

    weights.save_text_encoder(text_encoder, root / "text_encoder")
    weights.save_vae(vae, root / "vae")
    weights.save_unet(unet, root / "unet")
    write_tiny_tokenizer(root / "tokenizer")
    _write_json(root / "scheduler" / "scheduler_config.json",
                {"_class_name": "DDIMScheduler", **NoiseSchedule().to_diffusers_config()})
    _write_json(root / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _diffusers_version(),
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    })
    return root


def tiny_pipeline_dir(cache_dir: str = "") -> Path:
    """The project's tiny random pipeline, written once (atomically, so parallel processes can race) under
    `cache_dir` (default $XDG_CACHE_HOME or ~/.cache, then fusion_jax/) and reused."""
    if not cache_dir:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache_dir = os.path.join(base, "fusion_jax")
    folder = Path(cache_dir) / "tiny_pipeline"
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny_pipeline.", dir=folder.parent))
    write_tiny_pipeline(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process won the race: its folder is complete
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
