"""The tf.data training stream (fusion_jax.data.pipeline) over an in-memory face source.

Records are synthetic: each photo is a flat dark background with a red face box, and each aligned
crop is filled with a grey level that encodes its source index, so a test can read back from the
pixels which photo became which reference. No face detector runs here.
"""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from fusion_jax.data.pipeline import PipelineConfig, SamplingPlan, make_global_batch, make_pipeline
from fusion_jax.data.sources import InMemoryFaceSource, make_record

FACE_COLOR = np.array([220, 60, 60], np.uint8)
BACKGROUND = 20
# Photos per identity: identity 0 has a single photo (never a target), the others 2-5.
PHOTOS_PER_IDENTITY = [1, 2, 3, 4, 5, 3, 3, 4]  # 24 targets


def crop_level(index):
    return 10 + 7 * index  # distinct grey level per source index (< 255 for 25 photos)


def make_source(height=40, width=56, crop_size=16, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for identity, count in enumerate(PHOTOS_PER_IDENTITY):
        for photo in range(count):
            index = len(records)
            image = np.full((height, width, 3), BACKGROUND, np.uint8)
            side = int(rng.integers(10, 20))
            x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
            image[y0 : y0 + side, x0 : x0 + side] = FACE_COLOR
            crop = np.full((crop_size, crop_size, 3), crop_level(index), np.uint8)
            records.append(make_record(image, crop, [x0, y0, x0 + side, y0 + side], np.zeros((5, 2)), identity, photo, f"photo {index}"))
    return InMemoryFaceSource(records)


BASE = PipelineConfig(
    resolution=32, num_references=3, reference_size=16, batch_size=4, num_parallel_calls=2, prefetch=1,
    process_index=0, process_count=1, color_jitter=0.0, augment_references=False, seed=3,
)


@pytest.fixture(scope="module")
def source():
    return make_source()


def take(iterator, count):
    batches = [next(iterator) for _ in range(count)]
    iterator.close()
    return batches


def test_references_are_other_photos_of_the_same_identity(source):
    batches = take(make_pipeline(source, BASE), 6)
    for batch in batches:
        for b in range(BASE.batch_size):
            target = batch["source_index"][b]
            refs = batch["reference_source_index"][b]
            assert source.identities[target] != 0  # single-photo identities give no targets
            assert target not in refs
            assert batch["identity"][b] == source.identities[target]
            assert np.all(source.identities[refs] == source.identities[target])
            available = PHOTOS_PER_IDENTITY[source.identities[target]] - 1
            real = min(BASE.num_references, available)
            assert batch["num_real_references"][b] == real == len(set(refs.tolist()))
            np.testing.assert_array_equal(refs, np.resize(refs[:real], BASE.num_references))  # padded by repeating
            # The pixels are those of the chosen photos' crops.
            levels = batch["references"][b].reshape(BASE.num_references, -1)
            expected = np.array([crop_level(i) for i in refs], np.float32) / 127.5 - 1.0
            np.testing.assert_allclose(levels, np.repeat(expected[:, None], levels.shape[1], 1), atol=1e-6)


def test_vary_references_draws_one_to_n_distinct_photos_uniformly(source):
    """vary_references: per example, k ~ U{1..N} distinct photos of the identity (fewer when it has fewer), padded
    to N by repeating them; the default stream is unchanged by the option existing (same draws without it)."""
    config = dataclasses.replace(BASE, vary_references=True, batch_size=8)
    counts = {k: 0 for k in range(1, BASE.num_references + 1)}
    capped = 0
    for batch in take(make_pipeline(source, config), 40):
        for b in range(config.batch_size):
            target, refs = batch["source_index"][b], batch["reference_source_index"][b]
            real = int(batch["num_real_references"][b])
            assert target not in refs and np.all(source.identities[refs] == source.identities[target])
            assert real == len(set(refs.tolist())) and 1 <= real <= BASE.num_references
            np.testing.assert_array_equal(refs, np.resize(refs[:real], BASE.num_references))
            available = PHOTOS_PER_IDENTITY[source.identities[target]] - 1
            if available >= BASE.num_references:  # identities with enough photos show the drawn count itself
                counts[real] += 1
            else:
                capped += 1
                assert real <= available
    total = sum(counts.values())
    assert capped > 0 and total > 60
    # Uniform over 1..3: each count's share within 4.5 binomial standard deviations of 1/3.
    for k, c in counts.items():
        assert abs(c / total - 1 / 3) < 4.5 * np.sqrt((1 / 3) * (2 / 3) / total), (k, counts)
    # Off (the default), every example takes as many distinct photos as it can.
    batch = take(make_pipeline(source, dataclasses.replace(BASE, batch_size=8)), 1)[0]
    available = np.array([PHOTOS_PER_IDENTITY[source.identities[t]] - 1 for t in batch["source_index"]])
    np.testing.assert_array_equal(batch["num_real_references"], np.minimum(available, BASE.num_references))


def test_batches_have_the_contract_shapes_and_ranges(source):
    batch = take(make_pipeline(source, BASE), 1)[0]
    B, R, S, N = BASE.batch_size, BASE.resolution, BASE.reference_size, BASE.num_references
    expected = {
        "target": ((B, R, R, 3), np.float32), "references": ((B, N, S, S, 3), np.float32), "face_mask": ((B, R, R, 1), np.float32),
        "drop_text": ((B,), np.bool_), "drop_reference": ((B,), np.bool_), "identity": ((B,), np.int64),
        "num_real_references": ((B,), np.int32),
    }
    for name, (shape, dtype) in expected.items():
        assert batch[name].shape == shape and batch[name].dtype == dtype, name
    assert batch["caption"].dtype.kind == "U"
    assert [f"photo {i}" for i in batch["source_index"]] == batch["caption"].tolist()
    assert batch["target"].min() >= -1.0 and batch["target"].max() <= 1.0


def test_without_augmentation_target_is_the_photo_and_mask_the_box():
    source = make_source(height=32, width=32)
    config = dataclasses.replace(BASE, random_crop=False, flip=False)
    batch = take(make_pipeline(source, config), 1)[0]
    for b, index in enumerate(batch["source_index"]):
        record = source[index]
        np.testing.assert_allclose(batch["target"][b], record["image"] / 127.5 - 1.0, atol=1e-6)
        x0, y0, x1, y1 = record["face_box"].astype(int)
        mask = np.zeros((32, 32, 1), np.float32)
        mask[y0:y1, x0:x1] = 1.0
        np.testing.assert_array_equal(batch["face_mask"][b], mask)


def test_face_mask_follows_random_crop_and_flip(source):
    """Inside the mask the (cropped, resized, maybe flipped) target is face-coloured; outside it is not."""
    from scipy import ndimage

    batches = take(make_pipeline(source, dataclasses.replace(BASE, min_crop_fraction=0.6)), 4)
    face = FACE_COLOR / 127.5 - 1.0
    for batch in batches:
        for target, mask in zip(batch["target"], batch["face_mask"][..., 0] > 0):
            assert mask.sum() > 0
            is_face = np.all(np.abs(target - face) < 0.05, axis=-1)
            inner = ndimage.binary_erosion(mask, iterations=2)
            outer = ~ndimage.binary_dilation(mask, iterations=2)
            assert is_face[inner].all() and not is_face[outer].any()


def test_two_hosts_see_disjoint_shards_covering_the_data(source):
    plan = SamplingPlan(source.identities, seed=3, process_index=0, process_count=2)
    per_host = plan.per_host
    assert len(plan.targets) == 24  # even: the two shards cover everything (odd case: next test)
    seen = []
    for host in range(2):
        config = dataclasses.replace(BASE, process_index=host, process_count=2, batch_size=1)
        seen.append([int(b["source_index"][0]) for b in take(make_pipeline(source, config), per_host)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(plan.targets.tolist())


def test_odd_target_count_rotates_the_left_over_target():
    identities = np.repeat(np.arange(3), [3, 2, 2])  # 7 targets, 2 hosts: 3 each, 1 left over per epoch
    plans = [SamplingPlan(identities, seed=0, process_index=p, process_count=2) for p in range(2)]
    left_out = []
    for epoch in range(12):
        orders = [plan.host_order(epoch) for plan in plans]
        assert len(orders[0]) == len(orders[1]) == 3 and not set(orders[0]) & set(orders[1])
        (missing,) = set(range(7)) - set(orders[0]) - set(orders[1])
        left_out.append(missing)
    assert len(set(left_out)) > 1  # not always the same photo


def test_resume_from_saved_state_reproduces_the_next_batches(source):
    uninterrupted = take(make_pipeline(source, BASE), 8)  # 32 examples: crosses the 24-target epoch
    first = make_pipeline(source, BASE)
    take(first, 3)
    state = first.get_state()
    assert all(isinstance(v, int) for v in state.values()) and state["next_example"] == 12
    # A fresh pipeline with another thread count, restored from the state, continues exactly.
    resumed = take(make_pipeline(source, dataclasses.replace(BASE, num_parallel_calls=1), state=state), 5)
    for expected, got in zip(uninterrupted[3:], resumed):
        assert expected.keys() == got.keys()
        for name in expected:
            np.testing.assert_array_equal(expected[name], got[name], err_msg=name)
    # set_state on a running iterator jumps as well.
    first.set_state({"next_example": 0})
    np.testing.assert_array_equal(take(first, 1)[0]["target"], uninterrupted[0]["target"])
    with pytest.raises(ValueError, match="seed"):
        make_pipeline(source, dataclasses.replace(BASE, seed=4), state=state)


def test_seed_determines_the_stream(source):
    a = take(make_pipeline(source, BASE), 2)
    b = take(make_pipeline(source, BASE), 2)
    c = take(make_pipeline(source, dataclasses.replace(BASE, seed=99)), 2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["target"], y["target"])
    assert not all(np.array_equal(x["source_index"], z["source_index"]) for x, z in zip(a, c))


def test_condition_dropout_rates(source):
    """Drawn flags over 400 examples match their probabilities (binomial sd about 0.024: 4 sd allowed)."""
    config = dataclasses.replace(BASE, p_drop_text=0.3, p_drop_reference=0.6)
    pipeline = make_pipeline(source, config)
    flags = np.array([pipeline.load_example(k)[4:6] for k in range(400)], dtype=float)
    np.testing.assert_allclose(flags.mean(0), [0.3, 0.6], atol=0.1)
    never = make_pipeline(source, dataclasses.replace(BASE, p_drop_text=0.0, p_drop_reference=0.0))
    assert not any(any(never.load_example(k)[4:6]) for k in range(50))


def test_tokenizer_sees_empty_prompt_for_dropped_text(source):
    def tokenize(texts):
        return np.array([[len(t), 1] for t in texts])

    config = dataclasses.replace(BASE, tokenize=tokenize, p_drop_text=0.5, batch_size=8)
    batch = take(make_pipeline(source, config), 1)[0]
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (8, 2)
    expected = [0 if dropped else len(text) for text, dropped in zip(batch["caption"], batch["drop_text"])]
    np.testing.assert_array_equal(batch["input_ids"][:, 0], expected)


@pytest.mark.parametrize("axes,mesh_shape", [(("data", "fsdp"), (4, 2)), (("data",), (4, 2))])
def test_global_batch_is_sharded_over_the_batch_axes(source, axes, mesh_shape):
    assert jax.device_count() == 8, "conftest.py provides 8 fake CPU devices"
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    host = take(make_pipeline(source, dataclasses.replace(BASE, batch_size=8)), 1)[0]
    batch = make_global_batch(host, mesh, axes)
    assert isinstance(batch["caption"], np.ndarray)  # text stays on the host
    target = batch["target"]
    assert isinstance(target, jax.Array) and target.shape == host["target"].shape
    assert target.sharding.spec == PartitionSpec(axes if len(axes) > 1 else axes[0], None, None, None)
    per_shard = 8 // int(np.prod([mesh.shape[a] for a in axes]))
    for shard in target.addressable_shards:
        assert shard.data.shape[0] == per_shard
        np.testing.assert_array_equal(np.asarray(shard.data), host["target"][shard.index])
    np.testing.assert_array_equal(np.asarray(batch["identity"]), host["identity"])
    with pytest.raises(ValueError, match="batch_axes"):
        make_global_batch(host, mesh, ("model",))


@pytest.mark.parametrize("field,value", [("num_references", 5), ("p_drop_text", 1.5), ("batch_size", 0)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"PipelineConfig.{field}"):
        dataclasses.replace(BASE, **{field: value})


# ------------------------------------------------------------------------------------------------
# Pre-encoded mode (tiny random VAE and CLIP text encoder)


@pytest.fixture(scope="module")
def preencoded(source, tmp_path_factory):
    from flax import nnx

    from fusion_jax.data.preencoded import PreencodeConfig, preencode_source
    from fusion_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from fusion_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

    vae = AutoencoderKL(AutoencoderKLConfig(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, latent_channels=4, mid_block_add_attention=False), rngs=nnx.Rngs(0))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=8, intermediate_size=8, projection_dim=4, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=6, eos_token_id=2), rngs=nnx.Rngs(1))

    def tokenize(texts):  # characters -> ids, <bos>=0 ... <eos>=2, length 6
        return np.array([[0] + [3 + ord(c) % 60 for c in t[:4]] + [2] * (5 - len(t[:4])) for t in texts], np.int32)

    folder = str(tmp_path_factory.mktemp("preencoded"))
    config = PreencodeConfig(resolution=32, reference_size=16, batch_size=8, photos_per_shard=10, storage_dtype="float16")
    metadata = preencode_source(source, folder, vae, text, tokenize, config)
    return folder, metadata, vae, text, tokenize


def test_preencoded_moments_match_the_encoders(source, preencoded):
    """Stored moments and text embeddings equal direct encoder outputs (float16 storage: rel. 1e-3)."""
    from fusion_jax.data.pipeline import make_target
    from fusion_jax.data.preencoded import PreencodedSource

    folder, metadata, vae, text, tokenize = preencoded
    assert metadata["photos"] == len(source) and len(metadata["shards"]) == 3  # 25 photos, 10 per shard
    stored = PreencodedSource(folder)
    np.testing.assert_array_equal(stored.identities, source.identities)
    crop_config = dataclasses.replace(BASE, random_crop=False, flip=False)
    for index in (0, 13, 24):
        target, box = make_target(source[index], crop_config, np.random.default_rng(0))
        posterior = vae.encode(target[None].astype(np.float32) / 127.5 - 1.0)
        np.testing.assert_allclose(stored.arrays["latent_mean"][index], np.asarray(posterior.mean[0]), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(stored.arrays["latent_logvar"][index], np.asarray(posterior.logvar[0]), rtol=2e-3, atol=2e-3)
        crop = source[index]["face_crop"][None].astype(np.float32) / 127.5 - 1.0
        np.testing.assert_allclose(stored.arrays["reference_latent_mean"][index], np.asarray(vae.encode(crop).mean[0]), rtol=2e-3, atol=2e-3)
        hidden = text(tokenize([source[index]["caption"]])).last_hidden_state[0]
        np.testing.assert_allclose(stored.arrays["text_embedding"][index], np.asarray(hidden), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(stored.arrays["face_box"][index], box, atol=0.02)
        assert stored.captions[index] == source[index]["caption"]


def test_preencoded_stream_samples_like_the_raw_one_and_resumes(source, preencoded):
    from fusion_jax.data.preencoded import PreencodedConfig, PreencodedSource, make_preencoded_pipeline

    folder = preencoded[0]
    stored = PreencodedSource(folder)
    config = PreencodedConfig(num_references=3, p_drop_text=0.5, seed=3, batch_size=4, num_parallel_calls=2,
                              process_index=0, process_count=1)
    full = take(make_preencoded_pipeline(stored, config), 4)
    # Same seed and plan as the raw pipeline: the same targets and references in the same order.
    raw = take(make_pipeline(source, BASE), 4)
    for pre, raw_batch in zip(full, raw):
        np.testing.assert_array_equal(pre["source_index"], raw_batch["source_index"])
        np.testing.assert_array_equal(pre["reference_source_index"], raw_batch["reference_source_index"])
        assert pre["latent_mean"].shape == (4, 16, 16, 4) and pre["reference_latent_mean"].shape == (4, 3, 8, 8, 4)
        for b, (target, refs) in enumerate(zip(pre["source_index"], pre["reference_source_index"])):
            np.testing.assert_array_equal(pre["reference_latent_mean"][b], stored.arrays["reference_latent_mean"][refs])
            expected_text = stored.empty_text_embedding if pre["drop_text"][b] else stored.arrays["text_embedding"][target]
            np.testing.assert_array_equal(pre["text_embedding"][b], expected_text)
    # vary_references draws the same reference counts and photos in both streams.
    varied = take(make_preencoded_pipeline(stored, dataclasses.replace(config, vary_references=True)), 3)
    for pre, raw_batch in zip(varied, take(make_pipeline(source, dataclasses.replace(BASE, vary_references=True)), 3)):
        np.testing.assert_array_equal(pre["reference_source_index"], raw_batch["reference_source_index"])
        np.testing.assert_array_equal(pre["num_real_references"], raw_batch["num_real_references"])
    first = make_preencoded_pipeline(stored, config)
    take(first, 2)
    resumed = take(make_preencoded_pipeline(stored, config, state=first.get_state()), 2)
    for expected, got in zip(full[2:], resumed):
        for name in expected:
            np.testing.assert_array_equal(expected[name], got[name], err_msg=name)


def test_preencode_command_line_on_synthfaces(tmp_path):
    """`train/preencode.py` end to end: tiny SD pipeline folder (written by fusion_jax.tiny), synthfaces source."""
    import json
    import os
    import subprocess
    import sys

    from fusion_jax import tiny
    from fusion_jax.data.preencoded import PreencodedSource

    model = tiny.write_tiny_pipeline(tmp_path / "pipeline", seed=0)
    out = tmp_path / "encoded"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, os.path.join(repo, "train", "preencode.py"), "--model", str(model), "--out", str(out),
               "--synthfaces", "2", "--synthfaces-photos", "2", "--resolution", "32", "--reference-size", "16"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = json.loads(result.stdout.strip().splitlines()[-1])
    assert metadata["photos"] == 4 and metadata["shapes"]["latent_mean"] == [16, 16, 4]
    stored = PreencodedSource(str(out))
    np.testing.assert_array_equal(stored.identities, [0, 0, 1, 1])
    assert np.isfinite(stored.arrays["latent_mean"]).all() and np.abs(stored.arrays["text_embedding"]).sum() > 0


def test_masked_target_and_stored_face_embedding():
    """The token methods' fields: `masked_target` is the target with its face box mid-grey (128, i.e. ~0.0) and nothing else
    changed; `face_embedding` is the target photo's stored ArcFace embedding (zeros, has_face_embedding False,
    for photos stored without one)."""
    from fusion_jax.data.sources import InMemoryFaceSource

    plain = make_source(height=32, width=32)
    rng = np.random.default_rng(7)
    embeddings = {i: rng.standard_normal(512).astype(np.float32) for i in range(len(plain)) if i % 2 == 0}
    records = [dict(plain[i], embedding=embeddings.get(i, np.zeros(512, np.float32)),
                    has_embedding=np.bool_(i in embeddings)) for i in range(len(plain))]
    config = dataclasses.replace(BASE, random_crop=False, flip=False)
    batch = take(make_pipeline(InMemoryFaceSource(records), config), 1)[0]
    inside = batch["face_mask"][..., 0] > 0
    np.testing.assert_allclose(batch["masked_target"][inside], 128 / 127.5 - 1.0, atol=1e-6)  # float32 rounding
    np.testing.assert_array_equal(batch["masked_target"][~inside], batch["target"][~inside])
    for b, index in enumerate(batch["source_index"]):
        assert batch["has_face_embedding"][b] == (int(index) in embeddings)
        np.testing.assert_array_equal(batch["face_embedding"][b], embeddings.get(int(index), np.zeros(512)))
    assert batch["face_embedding"].dtype == np.float32
