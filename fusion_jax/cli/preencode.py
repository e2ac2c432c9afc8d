"""Pre-encode a face dataset once: VAE latent moments, text embeddings and face embeddings to TFRecords.

    fusion-jax preencode --model SD_PIPELINE_FOLDER --out OUT \\
        (--face-identities TFDS_DATA_DIR | --synthfaces IDENTITIES) [--resolution 512] [--reference-size 224]

`--model` is a diffusers pipeline folder (or HF cache entry) with `vae/`, `text_encoder/` and
`tokenizer/`. Training then reads OUT with `fusion_jax.data.preencoded.make_preencoded_pipeline`, so it
runs neither the VAE nor the text encoder. The last line printed is the metadata as JSON.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from fusion_jax.data.preencoded import PreencodeConfig, preencode_source


def parse_args(argv=None, prog: Optional[str] = None) -> argparse.Namespace:
    defaults = PreencodeConfig()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="diffusers pipeline folder with vae/, text_encoder/, tokenizer/")
    parser.add_argument("--out", required=True, help="empty folder to write the TFRecord shards into")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--face-identities", metavar="DATA_DIR", help="TFDS data dir holding a built face_identities")
    group.add_argument("--synthfaces", type=int, metavar="IDENTITIES", help="synthetic identities (train split)")
    parser.add_argument("--synthfaces-photos", type=int, default=8, help="photos per synthetic identity")
    parser.add_argument("--resolution", type=int, default=defaults.resolution, help="target crop side fed to the VAE")
    parser.add_argument("--reference-size", type=int, default=defaults.reference_size, help="reference crop side")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="photos per encoder call")
    parser.add_argument("--photos-per-shard", type=int, default=defaults.photos_per_shard)
    parser.add_argument("--storage-dtype", default=defaults.storage_dtype, choices=["float16", "float32"])
    return parser.parse_args(argv)


def open_source(args):
    if args.face_identities:
        from fusion_jax.data.face_identities import FaceIdentitiesSource

        return FaceIdentitiesSource(args.face_identities)
    from fusion_jax.data.synthfaces import SynthFaceConfig, SynthFaces

    return SynthFaces(SynthFaceConfig(image_size=args.resolution, crop_size=args.reference_size, num_train_identities=args.synthfaces,
                                      num_heldout_identities=0, photos_per_identity=args.synthfaces_photos))


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    args = parse_args(argv, prog)
    from fusion_jax.tokenizer import load_tokenizer
    from fusion_jax.weights import load_text_encoder, load_vae

    config = PreencodeConfig(resolution=args.resolution, reference_size=args.reference_size, batch_size=args.batch_size,
                             photos_per_shard=args.photos_per_shard, storage_dtype=args.storage_dtype)
    metadata = preencode_source(open_source(args), args.out, load_vae(args.model), load_text_encoder(args.model),
                                load_tokenizer(args.model), config)
    print(json.dumps(metadata), flush=True)
    return 0

