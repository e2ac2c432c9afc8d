"""Reproduction of published identity-preservation results on real photos (FlashFace Table 1 and friends).

One job per module:
  protocol.py     typed protocol configs (configs/reproduce/*.yaml) with the papers' published numbers
  stats.py        SimRef / SimTarget / Paste from embeddings, bootstrap intervals over identities, FID
  face_metric.py  face detection + any insightface ONNX recognizer (ArcFace) through fusion_jax.data.faces
  clip_metric.py  CLIP-T / CLIP-I with our CLIP towers and projections, from a local transformers CLIP folder
  tiny_models.py  tiny random metric models (`--metric-models tiny`): every path offline, numbers meaningless
  dataset.py      FOLDER/<identity>/<photo> -> references + held-out target per identity, problems by name
  harness.py      generate (resumable, batched) and measure every image; per-image records
  report.py       results.md, per_image.csv, plots/*.png, report.html
The command line is `fusion_jax/cli/reproduce.py` (`python infer/reproduce.py --help`).
"""
