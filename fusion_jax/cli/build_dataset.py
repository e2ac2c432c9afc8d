"""Build the `face_identities` TFDS dataset from a folder of identity sub-folders.

    fusion-jax build-dataset --input ROOT --data-dir OUT [--captions captions.jsonl]
        [--model-dir ~/.insightface/models/buffalo_l] [--backend auto|insightface|opencv]

The last line printed is the build summary as one JSON object (keys `examples`, `identities`,
`skipped_corrupt`, `skipped_no_face`, `skipped_single_photo_identities`, plus details).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from fusion_jax.data.face_identities import FaceIdentitiesBuildConfig, build_face_identities
from fusion_jax.data.faces import DEFAULT_MODEL_DIR, FaceAnalyzerConfig


def parse_args(argv=None, prog: Optional[str] = None) -> argparse.Namespace:
    defaults = FaceIdentitiesBuildConfig()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="folder with one sub-folder of photos per identity")
    parser.add_argument("--data-dir", required=True, help="TFDS data dir to write face_identities into")
    parser.add_argument("--captions", default=None, help='JSONL file of {"file": ..., "caption": ...}')
    parser.add_argument("--caption-template", default=defaults.caption_template, help="caption for photos without one; {identity} = folder name")
    parser.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, help="insightface model folder (never downloaded)")
    parser.add_argument("--backend", default="auto", choices=["auto", "insightface", "opencv"], help="face detector backend")
    parser.add_argument("--det-size", type=int, default=640, help="square detector input side")
    parser.add_argument("--det-thresh", type=float, default=0.5, help="minimum detector score")
    parser.add_argument("--reference-size", type=int, default=defaults.reference_size, help="side of the stored aligned face crop")
    parser.add_argument("--reference-margin", type=float, default=defaults.reference_margin, help="context around the ArcFace template")
    parser.add_argument("--max-image-side", type=int, default=defaults.max_image_side, help="downscale larger photos (0: keep)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    args = parse_args(argv, prog)
    config = FaceIdentitiesBuildConfig(
        input_dir=args.input,
        captions_file=args.captions,
        caption_template=args.caption_template,
        reference_size=args.reference_size,
        reference_margin=args.reference_margin,
        max_image_side=args.max_image_side,
        analyzer=FaceAnalyzerConfig(
            model_dir=args.model_dir, backend=args.backend, det_size=(args.det_size, args.det_size), det_thresh=args.det_thresh
        ),
    )
    summary = build_face_identities(args.data_dir, config)
    print(summary.to_json(), flush=True)
    return 0

