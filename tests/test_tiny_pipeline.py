"""The tiny pipeline folder loads in diffusers / transformers (PyTorch) and their outputs match ours.

Ours are loaded with `fusion_jax.weights.load_pipeline`, theirs with `StableDiffusionPipeline.from_pretrained`
(which also validates model_index.json and the scheduler config). Float32 on both sides; relative L2 < 1e-4.
Also covers the prompt tokenizer wrapper, since its reference is the tokenizer folder written here.
"""

import hashlib

import diffusers
import numpy as np
import pytest
import torch
from flax import nnx

from fusion_jax import tiny, weights
from fusion_jax.models.clip import CLIPTextModel
from fusion_jax.tokenizer import PromptTokenizer, load_tokenizer
from parity_helpers import rel_l2, nchw, nhwc

REL_TOL = 1e-4
PROMPTS = ["a photo of the cat and the dog", "portrait of a woman, smiling!", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def ours(folder):
    return weights.load_pipeline(folder)


@pytest.fixture(scope="module")
def theirs(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval()
    return pipe


def test_folder_layout_and_pytorch_classes(folder, theirs):
    for relative in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                     "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                     "scheduler/scheduler_config.json"):
        assert (folder / relative).is_file(), relative
    assert type(theirs.unet).__name__ == "UNet2DConditionModel"
    assert type(theirs.vae).__name__ == "AutoencoderKL"
    assert type(theirs.text_encoder).__name__ == "CLIPTextModel"
    assert type(theirs.tokenizer).__name__ == "CLIPTokenizer"
    assert type(theirs.scheduler).__name__ == "DDIMScheduler"


def test_tokenizer_matches_transformers_and_covers_english(ours, theirs):
    ids = ours.tokenizer(PROMPTS)
    expected = theirs.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                return_tensors="np")["input_ids"]
    assert ids.dtype == np.int32 and ids.shape == (3, 77)
    np.testing.assert_array_equal(ids, expected)
    # every character round-trips (no unknown tokens; CLIP's decode spaces out punctuation), and the BPE
    # merges are used ("the" is one token)
    for row, prompt in zip(ids, PROMPTS):
        assert theirs.tokenizer.decode(row, skip_special_tokens=True).replace(" ", "") == prompt.replace(" ", "")
    assert theirs.tokenizer.convert_tokens_to_ids("the</w>") in ids[0]
    assert ids[0, 0] == ours.tokenizer.bos_token_id
    assert ids[2, 1] == ours.tokenizer.eos_token_id == ours.text_encoder.config.eos_token_id


def test_tokenizer_wrapper_pads_truncates_and_validates(folder):
    tok = load_tokenizer(folder)  # pipeline folder -> tokenizer/ subfolder
    assert tok.max_length == 77 and tok.vocab_size == len(tiny.tiny_vocab())
    single = tok("the cat")
    assert single.shape == (1, 77)
    assert list(single[0, -3:]) == [tok.pad_token_id] * 3
    short = PromptTokenizer.from_pretrained(folder / "tokenizer", max_length=6)
    long_ids = short(["abcdefghij"])
    assert long_ids.shape == (1, 6) and long_ids[0, 0] == tok.bos_token_id and long_ids[0, -1] == tok.eos_token_id
    assert short([]).shape == (0, 6)
    with pytest.raises(TypeError, match="prompts must be strings"):
        tok(["ok", 3])
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(folder / "unet")
    with pytest.raises(ValueError, match="max_length"):
        PromptTokenizer(tok.hf_tokenizer, max_length=1)


def test_text_encoder_matches_transformers(ours, theirs):
    ids = ours.tokenizer(PROMPTS)
    with torch.no_grad():
        expected = theirs.text_encoder(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    got = nnx.jit(lambda m, x: m(x, output_hidden_states=True))(ours.text_encoder, ids)
    assert isinstance(ours.text_encoder, CLIPTextModel)
    assert rel_l2(got.last_hidden_state, expected.last_hidden_state) < REL_TOL
    assert rel_l2(got.pooler_output, expected.pooler_output) < REL_TOL
    assert rel_l2(got.hidden_states[-2], expected.hidden_states[-2]) < REL_TOL


def test_vae_matches_diffusers(ours, theirs):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
    latents = rng.normal(size=(2, 16, 16, 4)).astype(np.float32)
    with torch.no_grad():
        posterior = theirs.vae.encode(nchw(images)).latent_dist
        decoded = theirs.vae.decode(nchw(latents)).sample
    got = nnx.jit(lambda m, x: m.encode(x))(ours.vae, images)
    assert rel_l2(got.mean, nhwc(posterior.mean)) < REL_TOL
    assert rel_l2(got.std, nhwc(posterior.std)) < REL_TOL
    assert rel_l2(nnx.jit(lambda m, z: m.decode(z))(ours.vae, latents), nhwc(decoded)) < REL_TOL
    assert ours.vae.config.scaling_factor == theirs.vae.config.scaling_factor


def test_unet_matches_diffusers(ours, theirs):
    rng = np.random.default_rng(1)
    sample = rng.normal(size=(2, 16, 16, 4)).astype(np.float32)
    context = rng.normal(size=(2, 77, 32)).astype(np.float32)
    timesteps = np.array([10, 700], np.int32)
    with torch.no_grad():
        expected = theirs.unet(nchw(sample), torch.from_numpy(timesteps.astype(np.int64)),
                               torch.from_numpy(context)).sample
    got = nnx.jit(lambda m, x, t, c: m(x, t, c))(ours.unet, sample, timesteps, context)
    assert got.shape == sample.shape
    assert rel_l2(got, nhwc(expected)) < REL_TOL


def test_scheduler_config_reads_back(ours, theirs):
    assert theirs.scheduler.config.num_train_timesteps == ours.schedule.num_train_timesteps
    assert theirs.scheduler.config.beta_schedule == ours.schedule.beta_schedule
    assert theirs.scheduler.config.prediction_type == ours.schedule.prediction_type


def _digests(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_seed_changes_weights(folder, tmp_path):
    again = tiny.write_tiny_pipeline(tmp_path / "again", seed=0)
    assert _digests(again) == _digests(folder)
    config = tiny.tiny_text_encoder_config()
    make = lambda: CLIPTextModel(config, rngs=nnx.Rngs(0))  # noqa: E731
    a = weights.state_dict(tiny.randomize_params(nnx.eval_shape(make), seed=0))
    b = weights.state_dict(tiny.randomize_params(nnx.eval_shape(make), seed=1))
    assert a.keys() == b.keys()
    assert all(not np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError, match="seed"):
        tiny.write_tiny_pipeline(tmp_path / "bad", seed="0")
