"""FaceStudio's alpha sweep on the miniature (the claim "the hybrid weight trades style-image fidelity for text
fidelity").

Every held-out row (identity, prompt) gets a style image that contradicts its prompt: a photo of another held-out
person whose background colour and pattern both differ from the prompt's, its face box mid-grey as in FaceStudio's
training (`masked_target`). A generated image then cannot follow both: per image, style fidelity is the fraction of
the two background attributes the attribute reader reads as the style image's, text fidelity the fraction it reads
as the prompt's. The sweep samples the same rows and initial noise at each alpha; the claim holds when, between
alpha 0 (text branch only) and alpha 1 (style branch only), style fidelity rises and text fidelity falls, each by a
paired difference whose 95% bootstrap interval over identities lies above 0.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from fusion_jax import miniature as mm
from fusion_jax.data import synthfaces
from fusion_jax.miniature_style import STYLE_ATTRIBUTES  # what a face-masked photo shows

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # hybrid weights sampled (1 = style image branch only)
_SWEEP_ROW = re.compile(r"^(.+)_alpha(\d\.\d\d)$")
STYLE_PHOTO = 15  # which photo of the style person (the eval set's references and targets use the first ones)


def row_name(variant: str, alpha: float) -> str:
    """The per-image row of `variant` sampled at `alpha`: 'facestudio_alpha0.50'."""
    return f"{variant}_alpha{alpha:.2f}"


def sweep_of(row: str) -> tuple[str, str] | None:
    """(variant, alpha text) of a sweep row, None for any other row."""
    match = _SWEEP_ROW.match(row)
    return (match.group(1), match.group(2)) if match else None


def plot_name(variant: str) -> str:
    """The sweep's plot file of `variant`."""
    return f"evaluation_{variant}_alpha.png"


def contradicting_styles(eval_set: mm.EvalSet, faces: synthfaces.SynthFaceConfig, seed: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(M, H, W, 3) uint8 face-masked style photos, one per row, and their attribute labels (M, 4): another
    held-out person (the last held-out identities, in turn), background colour and pattern drawn among the values
    the row's prompt does not name, expression and gaze at random."""
    from fusion_jax.data.pipeline import box_mask

    heldout = synthfaces.split_identity_ids(faces, "heldout")
    rng = np.random.default_rng([seed, 1717])
    c_idx = synthfaces.ATTRIBUTE_NAMES.index("background_colour")
    p_idx = synthfaces.ATTRIBUTE_NAMES.index("background_pattern")
    images, labels = [], []
    for i, (identity, prompt) in enumerate(zip(eval_set.identity_ids, eval_set.labels)):
        others = [int(x) for x in heldout[::-1] if int(x) != int(identity)]
        person = others[i % min(len(others), 32)]
        colours = [c for k, c in enumerate(synthfaces.BACKGROUND_COLOURS) if k != prompt[c_idx]]
        patterns = [p for k, p in enumerate(synthfaces.BACKGROUND_PATTERNS) if k != prompt[p_idx]]
        attrs = synthfaces.PromptAttributes(
            expression=str(rng.choice(synthfaces.EXPRESSIONS)), gaze=str(rng.choice(synthfaces.GAZES)),
            background_colour=str(rng.choice(colours)), background_pattern=str(rng.choice(patterns)))
        record = synthfaces.render_face(person, STYLE_PHOTO, faces, attrs)
        mask = box_mask(np.asarray(record["face_box"]), record["image"].shape[0])
        images.append(np.where(mask > 0.5, np.uint8(128), record["image"]))
        labels.append(record["attribute_labels"])
    return np.stack(images), np.stack(labels)


def fidelity_scores(metrics, generated: np.ndarray, eval_set: mm.EvalSet, style_labels: np.ndarray
                    ) -> dict[str, np.ndarray]:
    """Per image: `style_fidelity` (fraction of STYLE_ATTRIBUTES read as the style image's) and `text_fidelity`
    (read as the prompt's) on those attributes, which the style image and the prompt never share."""
    read = np.asarray(metrics.reader(generated))
    a = [synthfaces.ATTRIBUTE_NAMES.index(n) for n in STYLE_ATTRIBUTES]
    return {"style_fidelity": (read[:, a] == style_labels[:, a]).mean(axis=1).astype(np.float64),
            "text_fidelity": (read[:, a] == eval_set.labels[:, a]).mean(axis=1).astype(np.float64)}


def trade_off_claim(per_image: dict[str, dict[str, np.ndarray]], groups: np.ndarray, seed: int,
                    variant: str = "facestudio", label: str = "") -> dict[str, Any]:
    """The claim's row for check_claims: `variant`'s alpha 1 - alpha 0 style fidelity and alpha 0 - alpha 1 text
    fidelity (`label` names the variant in the claim when a run has several)."""
    from fusion_jax.synth_reproduction import paired_difference

    claim = "FaceStudio: the alpha sweep trades style-image fidelity for text fidelity" + (f" ({label})" if label
                                                                                           else "")
    first, last = row_name(variant, ALPHAS[0]), row_name(variant, ALPHAS[-1])
    if first not in per_image or last not in per_image:
        return {"claim": claim, "verdict": "not testable here",
                "figure": "needs a FaceStudio variant (its alpha sweep) in this run's variants"}
    style = paired_difference(per_image[last]["style_fidelity"], per_image[first]["style_fidelity"], groups, seed)
    text = paired_difference(per_image[first]["text_fidelity"], per_image[last]["text_fidelity"], groups, seed)
    held = style["ci95"][0] > 0 and text["ci95"][0] > 0
    rows = [(a, per_image[row_name(variant, a)]) for a in ALPHAS if row_name(variant, a) in per_image]
    curve = ", ".join(f"{a:g}: {r['style_fidelity'].mean():.2f} / {r['text_fidelity'].mean():.2f}" for a, r in rows)
    return {"claim": claim, "verdict": "held" if held else "not held", "difference": style["difference"],
            "ci95": style["ci95"], "text_difference": text["difference"], "text_ci95": text["ci95"],
            "figure": f"style fidelity alpha 1 - 0: {style['difference']:+.3f} [{style['ci95'][0]:+.3f}, "
                      f"{style['ci95'][1]:+.3f}]; text fidelity alpha 0 - 1: {text['difference']:+.3f} "
                      f"[{text['ci95'][0]:+.3f}, {text['ci95'][1]:+.3f}] (background colour + pattern against a "
                      f"style photo that contradicts the prompt; style / text fidelity by alpha: {curve})"}


def write_plot(path, summary: dict[str, dict], variant: str = "facestudio") -> bool:
    """Style fidelity vs text fidelity of `variant`, one point per alpha (the trade-off curve); False when no
    sweep of it ran."""
    from fusion_jax.reproduction.report import scatter_png

    rows = [(a, summary[row_name(variant, a)]) for a in ALPHAS if row_name(variant, a) in summary]
    if not rows:
        return False
    series = {f"alpha {a:g}": (np.array([s["text_fidelity"]]), np.array([s["style_fidelity"]])) for a, s in rows}
    scatter_png(path, series, "text fidelity (background as the prompt says)",
                "style fidelity (background as the style image)", f"{variant} alpha sweep (1 reference)")
    return True


__all__ = ["ALPHAS", "STYLE_ATTRIBUTES", "row_name", "sweep_of", "plot_name", "contradicting_styles",
           "fidelity_scores", "trade_off_claim", "write_plot"]
