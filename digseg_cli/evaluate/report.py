"""Evaluation reports: the files ``digseg eval`` always writes, from an ``EvalResult``.

One job: write ``metrics.json``, ``per_class.csv``, ``per_image.csv``, ``confusion_matrix.csv``,
``confusion_matrix.png`` (a heat map drawn with OpenCV/PIL, no matplotlib), the worst images as overlays
(``worst/*.jpg``) and ``report.md`` linking them — each file written atomically. Number formatting for
humans lives here too (``fmt``), so the CLI table and the report show the same digits. It computes no
metric and knows nothing of models or datasets.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from digseg_cli.files import atomic_write_bytes, atomic_write_text
from digseg_cli.inference.images import default_palette
from digseg_cli.inference.overlay import make_overlay

DIGITS = 4


def fmt(value: Any) -> str:
    """A fraction as shown to people (4 decimals); ``—`` for undefined (NaN/None); a record (say `--compile`'s) as
    its `key: value` pairs."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {fmt(v)}" for k, v in value.items()) or "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, float):
        return f"{value:.{DIGITS}f}"
    return str(value)


def json_safe(obj: Any) -> Any:
    """NaN/inf → None (JSON has no NaN), numpy scalars → Python, recursively."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row])
    return buf.getvalue()


def _png_bytes(array: np.ndarray, fmt_: str = "PNG", **params: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt_, **params)
    return buf.getvalue()


def confusion_heatmap(cm: np.ndarray, names: list[str]) -> np.ndarray:
    """Row-normalised confusion matrix as an RGB picture (rows GT, columns prediction; viridis)."""
    import cv2
    from PIL import Image, ImageDraw

    c = cm.shape[0]
    rows = cm.sum(1, keepdims=True).astype(np.float64)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)  # [C,C] in [0,1]
    cell = int(np.clip(640 // max(c, 1), 1, 40))
    grid = cv2.applyColorMap((norm * 255).round().astype(np.uint8), cv2.COLORMAP_VIRIDIS)[:, :, ::-1]  # BGR→RGB
    grid = np.repeat(np.repeat(grid, cell, axis=0), cell, axis=1)
    labelled = cell >= 14
    margin = 24 if labelled else 4
    top = 22
    canvas = Image.new("RGB", (grid.shape[1] + margin + 4, grid.shape[0] + margin + top + 4), "white")
    canvas.paste(Image.fromarray(np.ascontiguousarray(grid)), (margin, margin + top))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), "rows: ground truth, columns: prediction (row-normalised)", fill=(0, 0, 0))
    if labelled:
        for k in range(c):
            pos = margin + k * cell + cell // 2 - 4
            draw.text((pos, top + 4), str(k), fill=(0, 0, 0))
            draw.text((4, top + pos), str(k), fill=(0, 0, 0))
            if cell >= 28:
                txt = f"{norm[k, k]:.2f}"
                draw.text(
                    (margin + k * cell + 4, margin + top + k * cell + cell // 2 - 5),
                    txt,
                    fill=(255, 255, 255) if norm[k, k] < 0.6 else (0, 0, 0),
                )
    return np.asarray(canvas)


def worst_panel(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, names: list[str]) -> np.ndarray:
    """Image | ground truth overlay | prediction overlay, side by side (ignored pixels are left uncoloured)."""
    background_first = bool(names) and names[0].lower() == "background"
    draw_names = names[1:] if background_first else names
    palette = default_palette(len(draw_names) + 1)

    def shown(labels: np.ndarray) -> np.ndarray:
        labels = labels.astype(np.int64)
        if background_first:
            return np.where(labels < len(names), labels, 0)
        return np.where((labels >= 0) & (labels < len(names)), labels + 1, 0)  # label k → colour k+1

    legend = len(draw_names) <= 12
    panels = [
        image,
        make_overlay(image, shown(gt), palette, draw_names, 0.55, legend=legend),
        make_overlay(image, shown(pred), palette, draw_names, 0.55, legend=False),
    ]
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)


def _safe_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80]


def _report_md(result, files: dict[str, str], worst: list[tuple[str, float, str]]) -> str:
    m = result.metrics
    head = m["headline"]
    lines = [
        f"# digseg eval — {m.get('dataset') or 'dataset'} ({m.get('split') or '-'})",
        "",
        f"**{head['name']}: {fmt(head['value'])}**",
        "",
        f"Protocol: {m.get('protocol') or '-'}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {fmt(v)} |" for k, v in m["metrics"].items()]
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    fixed = {
        "source": m.get("source"),
        "absent rule": m["absent_rule"],
        "label mode": m.get("label_mode"),
        "threshold": m.get("threshold"),
        "ignore index": m["ignore_index"],
        "images": m["num_images"],
        "classes": m["num_classes"],
    }
    lines += [f"| {k} | {fmt(v)} |" for k, v in {**fixed, **m.get("settings", {})}.items()]
    lines += [
        "",
        "## Per class",
        "",
        "| id | class | IoU | Dice | precision | recall | GT pixels | counted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['id']} | {c['name']} | {fmt(c['iou'])} | {fmt(c['dice'])} | {fmt(c['precision'])} | "
        f"{fmt(c['recall'])} | {c['gt_pixels']} | {'yes' if c['counted'] else 'no'} |"
        for c in m["per_class"]
    ]
    lines += [
        "",
        "## Confusion matrix",
        "",
        f"![confusion matrix]({files['confusion_matrix.png']}) "
        f"(counts: [{files['confusion_matrix.csv']}]({files['confusion_matrix.csv']}))",
        "",
    ]
    if worst:
        lines += ["## Worst images", "", "Each: image | ground truth | prediction.", ""]
        for stem, score, rel in worst:
            lines += [f"### {stem} — {fmt(score)}", "", f"![{stem}]({rel})", ""]
    lines += ["Files: " + ", ".join(f"[{n}]({n})" for n in ("metrics.json", "per_class.csv", "per_image.csv")), ""]
    return "\n".join(lines)


def write_reports(result, out_dir: Path) -> list[Path]:
    """Write every report file of ``result`` into ``out_dir``; return their paths."""
    from digseg_cli._version import __version__

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    names = result.label_names
    cm = result.confusion.numpy()

    metrics = {
        **result.metrics,
        "digseg_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    written.append(atomic_write_text(out_dir / "metrics.json", json.dumps(json_safe(metrics), indent=2) + "\n"))
    pc_keys = ["id", "name", "iou", "dice", "precision", "recall", "gt_pixels", "pred_pixels", "tp", "counted"]
    pc_rows = [[c[k] for k in pc_keys] for c in result.metrics["per_class"]]
    written.append(atomic_write_text(out_dir / "per_class.csv", _csv_text(pc_keys, pc_rows)))
    img_keys = list(dict.fromkeys(k for row in result.per_image for k in row))
    written.append(
        atomic_write_text(
            out_dir / "per_image.csv", _csv_text(img_keys, [[r.get(k) for k in img_keys] for r in result.per_image])
        )
    )
    cm_rows = [[n, *cm[i].tolist()] for i, n in enumerate(names)]
    written.append(atomic_write_text(out_dir / "confusion_matrix.csv", _csv_text(["gt\\pred", *names], cm_rows)))
    written.append(atomic_write_bytes(out_dir / "confusion_matrix.png", _png_bytes(confusion_heatmap(cm, names))))
    worst = []
    for rank, (score, stem, image, gt, pred) in enumerate(result.worst, start=1):
        rel = f"worst/{rank:02d}_{_safe_name(stem)}.jpg"
        panel = worst_panel(image, gt, pred, names)
        written.append(atomic_write_bytes(out_dir / rel, _png_bytes(panel, "JPEG", quality=90)))
        worst.append((stem, score, rel))
    files = {"confusion_matrix.png": "confusion_matrix.png", "confusion_matrix.csv": "confusion_matrix.csv"}
    written.append(atomic_write_text(out_dir / "report.md", _report_md(result, files, worst)))
    return written
