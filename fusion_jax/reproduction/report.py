"""Reports of a reproduction folder: results.md, per_image.csv, plots/*.png, report.html (offline).

Every run under OUT/runs/<method>/<protocol>/ is one row: means over generated images of SimRef / SimTarget /
Paste (x100, over images where the person's face was found), CLIP-T (100 x cosine; CLIPScore = 2.5 x that, floored
at 0, beside it), CLIP-I, and FID against all usable photos of --data, each with a 95% interval from resampling
identities. Faces not found are counted in the table (column "no face"), never dropped silently. The protocol's
published rows print beside ours with the recognizer each paper used; the data photos that were not usable are
listed by name. With tiny metric models every file starts with the MEANINGLESS banner.
"""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from fusion_jax.reproduction import stats
from fusion_jax.reproduction.protocol import ProtocolConfig
from fusion_jax.reproduction.tiny_models import MEANINGLESS

CSV_FIELDS = ("method", "protocol", "unit", "identity", "prompt_index", "prompt", "seed", "image", "face_found",
              "sim_ref", "sim_target", "paste", "clip_t", "clip_i", "face_crop")


def collect(out: Path) -> list[dict[str, Any]]:
    """Every run of OUT: its run.json plus per-image records (one row per person per image) and features."""
    runs = []
    for run_file in sorted((out / "runs").glob("*/*/run.json")):
        run = json.loads(run_file.read_text())
        rows, features, groups = [], [], []
        for rec_file in sorted((run_file.parent / "measure").rglob("*.json")):
            rec = json.loads(rec_file.read_text())
            features.append(np.load(rec_file.with_suffix(".inception.npy")))
            groups.append(rec["unit"])
            for person in rec["persons"]:
                rows.append({"method": rec["method"], "protocol": rec["protocol"], "unit": rec["unit"],
                             "identity": person["identity"], "prompt_index": rec["prompt_index"],
                             "prompt": rec["prompt"], "seed": rec["seed"], "image": rec["image"],
                             "face_found": person["face_found"], "sim_ref": person.get("sim_ref", float("nan")),
                             "sim_target": person.get("sim_target", float("nan")),
                             "paste": person.get("paste", float("nan")), "clip_t": rec["clip_t"],
                             "clip_i": rec["clip_i"], "face_crop": person.get("face_crop", "")})
        run["rows"], run["features"], run["feature_units"] = rows, features, groups
        run["dir"] = run_file.parent
        runs.append(run)
    return runs


def summarize(run: dict[str, Any], data_features: np.ndarray) -> dict[str, Any]:
    """Means and bootstrap intervals of one run's columns (x100 similarities)."""
    protocol = ProtocolConfig(**run["protocol"])
    rows = run["rows"]
    ids = [r["unit"] for r in rows]  # resampling unit: the identity (two-person protocols: the pair)
    out: dict[str, Any] = {"method": run["method"], "protocol": protocol.name, "images": len(run["features"]),
                           "no_face": sum(not r["face_found"] for r in rows), "faces_expected": len(rows),
                           "identities": len({r["identity"] for r in rows})}
    for key, scale in (("sim_ref", 100.0), ("sim_target", 100.0), ("paste", 100.0), ("clip_t", 1.0),
                       ("clip_i", 1.0)):
        values = np.array([r[key] for r in rows], np.float64) * scale
        out[key] = stats.bootstrap_mean_interval(values, ids, num_samples=protocol.bootstrap_samples)
    clip = np.array([r["clip_t"] for r in rows], np.float64)
    out["clip_score"] = stats.bootstrap_mean_interval(2.5 * np.maximum(clip, 0.0), ids,
                                                      num_samples=protocol.bootstrap_samples)
    feats = np.asarray(run["features"], np.float64)
    if len(feats) >= 2 and len(data_features) >= 2:
        out["fid"] = stats.bootstrap_statistic_interval(
            run["feature_units"], lambda idx: stats.fid(feats[idx], data_features),
            num_samples=protocol.fid_bootstrap_samples)
    else:
        out["fid"] = (float("nan"),) * 3
    out["fid_samples"] = protocol.fid_bootstrap_samples
    return out


def _fmt(triple) -> str:
    mean, low, high = triple
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.1f} [{low:.1f}, {high:.1f}]"


def _pub(row: dict, key: str) -> str:
    return f"{row[key]:.1f}" if key in row else "-"


def write_csv(path: Path, runs: list[dict], meaningless: bool) -> None:
    with open(path, "w", newline="") as f:
        if meaningless:
            f.write(f"# {MEANINGLESS}\n")
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for run in runs:
            for r in run["rows"]:
                w.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in CSV_FIELDS})


def results_markdown(summaries: list[dict], runs: list[dict], names: dict, meaningless: bool) -> str:
    lines = []
    if meaningless:
        lines += [f"> **{MEANINGLESS}**", ""]
    lines += ["# Reproduction results", "",
              f"Recognizer: {names.get('recognizer')}; face detector: {names.get('detector')}; "
              f"CLIP: {names.get('clip')}; Inception: {names.get('inception')}.", "",
              "SimRef / SimTarget / Paste: 100 x ArcFace-style cosine over images whose face was found (FlashFace's "
              "protocol: Paste = SimRef - SimTarget); CLIP-T: 100 x cosine(image, prompt); CLIPScore: 2.5 x "
              "max(CLIP-T, 0); CLIP-I: 100 x cosine(image, reference photos); FID vs all usable photos of --data. "
              "[low, high]: 95% bootstrap interval over identities (FID: few resamples, see column).", "",
              "| method | protocol | identities | images | no face | SimRef | SimTarget | Paste | CLIP-T | CLIPScore "
              "| CLIP-I | FID (resamples) | recognizer |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['method']} (ours) | {s['protocol']} | {s['identities']} | {s['images']} | "
                     f"{s['no_face']}/{s['faces_expected']} | {_fmt(s['sim_ref'])} | {_fmt(s['sim_target'])} | "
                     f"{_fmt(s['paste'])} | {_fmt(s['clip_t'])} | {_fmt(s['clip_score'])} | {_fmt(s['clip_i'])} | "
                     f"{_fmt(s['fid'])} ({s['fid_samples']}) | {names.get('recognizer')} |")
    seen = set()
    for run in runs:
        protocol = ProtocolConfig(**run["protocol"])
        if protocol.name in seen:
            continue
        seen.add(protocol.name)
        for row in protocol.published:
            lines.append(f"| {row['method']} (published: {row.get('source', '?')}) | {protocol.name} | | | | "
                         f"{_pub(row, 'sim_ref')} | {_pub(row, 'sim_target')} | {_pub(row, 'paste')} | "
                         f"{_pub(row, 'clip_t')} | | {_pub(row, 'clip_i')} | {_pub(row, 'fid')} | "
                         f"{row.get('recognizer', '?')} |")
    lines.append("")
    for run in runs:
        plan, protocol = run["plan"], ProtocolConfig(**run["protocol"])
        lines += [f"## {run['method']} / {protocol.name}", "",
                  f"- {protocol.title or protocol.name}: {protocol.num_references} reference(s), "
                  f"{protocol.num_targets} held-out target(s) per identity, {protocol.people_per_image} person/image, "
                  f"seeds {protocol.seeds}, {len(run['prompts'])} prompt(s); model `{run['model']}`, identity weights "
                  f"`{run['identity_weights'] or 'none (untrained modules)'}`.",
                  f"- Paper's recognizer: {protocol.recognizer_note or '-'}; CLIP: {protocol.clip_note or '-'}; "
                  f"FID: {protocol.fid_note or '-'}."]
        lines.append(f"- Photos without a detected face (not used): {', '.join(plan['faceless']) or 'none'}.")
        too_few = ", ".join(f"{k} ({v} usable photo(s))" for k, v in plan["too_few"].items())
        lines.append(f"- Identities left out, fewer than {protocol.photos_needed} usable photos: {too_few or 'none'}.")
        if plan["unreadable"]:
            lines.append(f"- Unreadable photos: {', '.join(plan['unreadable'])}.")
        lines.append("")
    return "\n".join(lines) + "\n"


def scatter_png(path: Path, series: dict[str, tuple[np.ndarray, np.ndarray]], xlabel: str, ylabel: str,
                 title: str) -> None:
    """A scatter plot: matplotlib when installed, else a plain PIL drawing (axes, points, legend, labels)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        for name, (x, y) in series.items():
            ax.scatter(x, y, s=12, label=name)
        ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.set_title(title, fontsize=8), ax.legend(fontsize=7)
        fig.tight_layout(), fig.savefig(path, dpi=100), plt.close(fig)
        return
    except ImportError:
        pass
    from PIL import Image, ImageDraw

    w, h, m = 480, 380, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = np.concatenate([s[0] for s in series.values()] or [np.zeros(1)])
    ys = np.concatenate([s[1] for s in series.values()] or [np.zeros(1)])
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = (xs[ok], ys[ok]) if ok.any() else (np.zeros(1), np.zeros(1))
    x0, x1 = float(xs.min()), float(xs.max()) + 1e-9
    y0, y1 = float(ys.min()), float(ys.max()) + 1e-9
    d.rectangle([m, m // 2, w - m // 2, h - m], outline="black")
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for i, (name, (x, y)) in enumerate(series.items()):
        c = colors[i % len(colors)]
        for a, b in zip(x, y):
            if np.isfinite(a) and np.isfinite(b):
                px = m + (a - x0) / (x1 - x0) * (w - 1.5 * m)
                py = h - m - (b - y0) / (y1 - y0) * (h - 1.5 * m)
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)
        d.text((m + 8, m // 2 + 6 + 12 * i), name, fill=c)
    for k in range(5):  # ticks and values on both axes
        fx, fy = k / 4, k / 4
        px, py = m + fx * (w - 1.5 * m), h - m - fy * (h - 1.5 * m)
        d.line([px, h - m, px, h - m + 4], fill="black")
        d.text((px - 12, h - m + 6), f"{x0 + fx * (x1 - x0):.3f}", fill="black")
        d.line([m - 4, py, m, py], fill="black")
        d.text((1, py - 5), f"{y0 + fy * (y1 - y0):.3f}", fill="black")
    d.text((w // 2 - 40, h - m + 22), xlabel, fill="black")
    d.text((4, 4), f"{title}  (y: {ylabel})", fill="black")
    img.save(path)


def _histogram_png(path: Path, series: dict[str, np.ndarray], xlabel: str, title: str) -> None:
    """Distributions as stacked 1-D strips (each value a tick) -- readable without matplotlib."""
    ys = {name: np.full(len(v), float(i)) for i, (name, v) in enumerate(series.items())}
    scatter_png(path, {n: (np.asarray(series[n], np.float64), ys[n]) for n in series}, xlabel, "run (row)", title)


def write_plots(out: Path, runs: list[dict], meaningless: bool) -> list[Path]:
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    tag = " (MEANINGLESS: tiny metric models)" if meaningless else ""
    label = lambda run: f"{run['method']}/{run['protocol']['name']}"  # noqa: E731
    tradeoff = {label(r): (np.array([x["clip_t"] for x in r["rows"]]), 100 * np.array([x["sim_target"]
                                                                                       for x in r["rows"]]))
                for r in runs}
    files = [plots / "simtarget_vs_clipt.png", plots / "similarity_distributions.png"]
    scatter_png(files[0], tradeoff, "CLIP-T", "SimTarget x100", "SimTarget vs CLIP-T per image" + tag)
    dist = {}
    for r in runs:
        for key in ("sim_ref", "sim_target"):
            dist[f"{label(r)} {key}"] = 100 * np.array([x[key] for x in r["rows"]], np.float64)
    _histogram_png(files[1], dist, "similarity x100", "SimRef / SimTarget distributions" + tag)
    return files


def write_html(out: Path, markdown: str, runs: list[dict], meaningless: bool, max_units: int = 12) -> None:
    """report.html: the table and, per unit, its reference crops beside its generated images (relative links)."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>fusion-jax reproduction</title><style>"
             "body{font-family:sans-serif;margin:20px} table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px} img{height:96px;margin:1px} img.face{height:48px;border:1px solid #c00} .banner{background:#fdd;"
             "padding:8px;font-weight:bold} .refs{border-right:3px solid #888;padding-right:6px;margin-right:6px}"
             "</style></head><body>"]
    if meaningless:
        parts.append(f"<p class='banner'>{html.escape(MEANINGLESS)}</p>")
    table = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    if table:
        parts.append("<table>")
        for i, ln in enumerate(table):
            if i == 1:
                continue
            cells = [c.strip() for c in ln.strip("|").split("|")]
            tag = "th" if i == 0 else "td"
            parts.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
        parts.append("</table>")
    for ln in markdown.splitlines():
        if ln.startswith("- ") or ln.startswith("## ") or ln.startswith("Recognizer"):
            parts.append(f"<p>{html.escape(ln.lstrip('#- '))}</p>")
    for run in runs:
        parts.append(f"<h2>{html.escape(run['method'])} / {html.escape(run['protocol']['name'])}</h2>")
        by_unit: dict[str, list[dict]] = {}
        for r in run["rows"]:
            by_unit.setdefault(r["unit"], []).append(r)
        crops = {p: f"data/crops/{p}.png" for s in run["plan"]["identities"] for p in s["references"]}
        for unit, rows in list(by_unit.items())[:max_units]:
            refs = sorted({p for s in run["plan"]["identities"] if s["name"] in unit.split("+")
                           for p in s["references"]})
            imgs = sorted({r["image"] for r in rows})
            face_of = {}
            for r in rows:
                if r["face_crop"]:
                    face_of.setdefault(r["image"], []).append(r["face_crop"])
            cell = "".join(f"<img src='{html.escape(crops[p])}' title='{html.escape(p)}'>" for p in refs
                           if (out / crops[p]).is_file())
            gen = "".join(f"<img src='{html.escape(i)}' title='{html.escape(i)}'>"
                          + "".join(f"<img class='face' src='{html.escape(c)}' title='face the recognizer read'>"
                                    for c in face_of.get(i, []))
                          for i in imgs)
            parts.append(f"<div><b>{html.escape(unit)}</b><br><span class='refs'>{cell}</span>{gen}</div>")
    for plot in sorted((out / "plots").glob("*.png")):
        parts.append(f"<p><img style='height:300px' src='plots/{html.escape(plot.name)}'></p>")
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))


def write_reports(out: Path, data_features: np.ndarray, names: dict, meaningless: bool) -> dict[str, Path]:
    """Write every report file of OUT from what is measured there; returns their paths."""
    runs = collect(out)
    summaries = [summarize(r, data_features) for r in runs]
    markdown = results_markdown(summaries, runs, names, meaningless)
    (out / "results.md").write_text(markdown)
    write_csv(out / "per_image.csv", runs, meaningless)
    plots = write_plots(out, runs, meaningless)
    write_html(out, markdown, runs, meaningless)
    (out / "summary.json").write_text(json.dumps(
        {"meaningless": meaningless, "metric_models": names,
         "rows": [{k: v for k, v in s.items()} for s in summaries]}, indent=1, default=float))
    return {"results": out / "results.md", "csv": out / "per_image.csv", "html": out / "report.html",
            "plots": plots[0]}


__all__ = ["collect", "summarize", "write_reports"]
