"""``report.html`` of ``lightfusion batch``: one self-contained page to review a cohort by scrolling.

Per case: a small montage (rows axial / coronal / sagittal through one point; columns MRI, PET or CT,
fused; :func:`LightFusionLib.demo.make_montage`) embedded as a JPEG data URI, so the page shows
everything when copied elsewhere alone; the full-size PNG and the fused volume are linked relative to
the page (they open while the page stays beside the output folder). Then the status, the one-line
message, the input warnings, planes and seconds, the inputs. Failed cases come first, then cases with
warnings, then the rest; what was not matched (BIDS) is listed at the end. No scripts, no external
resources.
"""
from __future__ import annotations

import base64
import html
import os
import tempfile
from pathlib import Path

import numpy as np

from .fileio import atomic_output

THUMB_WIDTH = 384  # pixels: a 3x3 montage of 128-pixel cells
JPEG_QUALITY = 85

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}
.case{display:flex;gap:1em;background:#fff;border:1px solid #ddd;border-left:6px solid #999;margin:.8em 0;padding:.7em}
.case.failed{border-left-color:#c62828} .case.warned{border-left-color:#f9a825} .case.ok{border-left-color:#2e7d32}
.case img{width:384px;height:auto;image-rendering:auto;background:#000}
.noimg{width:384px;height:120px;display:flex;align-items:center;justify-content:center;background:#eee;color:#777}
.badge{display:inline-block;padding:0 .5em;border-radius:.6em;color:#fff;font-size:.85em}
.b-failed{background:#c62828} .b-fused{background:#2e7d32} .b-kept{background:#1565c0}
.msg{font-family:ui-monospace,monospace;font-size:.85em;white-space:pre-wrap}
.warn{color:#8d6e00} .small{font-size:.85em;color:#555} a{color:#1565c0}
"""


def thumbnail_data_uri(png: str | Path, width: int = THUMB_WIDTH) -> str | None:
    """A montage PNG as a ``data:image/jpeg;base64,...`` URI about ``width`` pixels wide (block-mean
    downsampled), or None when the file is missing or unreadable."""
    import SimpleITK as sitk

    from .fileio import captured_native_stderr

    try:
        with captured_native_stderr():
            rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))
    except (RuntimeError, OSError):
        return None
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    factor = max(1, rgb.shape[1] // width)
    if factor > 1:
        h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
        blocks = rgb[:h, :w].reshape(h // factor, factor, w // factor, factor, -1).astype(np.float32)
        rgb = np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)
    fd, name = tempfile.mkstemp(suffix=".jpg", prefix="lightfusion-thumb-")
    os.close(fd)
    try:
        sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(rgb), isVector=True), name, True, JPEG_QUALITY)
        data = Path(name).read_bytes()
    except RuntimeError:
        return None
    finally:
        Path(name).unlink(missing_ok=True)
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def _link(path: str | None, folder: Path, text: str | None = None) -> str:
    if not path:
        return ""
    try:
        href = Path(os.path.relpath(path, folder)).as_posix()
    except ValueError:  # another drive (Windows)
        href = Path(path).as_uri()
    return f'<a href="{html.escape(href)}">{html.escape(text or Path(path).name)}</a>'


def _order(row: dict) -> tuple:
    failed = row["status"] == "failed"
    return (0 if failed else 1 if row.get("warnings") else 2, row["id"])


def _case_html(row: dict, folder: Path) -> str:
    failed = row["status"] == "failed"
    kind = "failed" if failed else "warned" if row.get("warnings") else "ok"
    thumb = None if failed or not row.get("montage") else thumbnail_data_uri(row["montage"])
    if thumb:
        image = f'<img src="{thumb}" alt="montage of {html.escape(row["id"])}">'
        if row.get("montage"):
            image = f'<a href="{html.escape(Path(os.path.relpath(row["montage"], folder)).as_posix())}">{image}</a>'
    else:
        image = f'<div class="noimg">{"failed: no montage" if failed else "no montage"}</div>'
    parts = [f'<div class="case {kind}" id="case-{html.escape(row["id"])}">', image, "<div>",
             f'<b>{html.escape(row["id"])}</b> <span class="badge b-{html.escape(row["status"])}">'
             f'{html.escape(row["status"])}</span> <span class="small">{html.escape(row.get("task") or "")}</span>']
    if row.get("message"):
        parts.append(f'<div class="msg">{html.escape(row["message"])}</div>')
    for warning in row.get("warnings") or []:
        parts.append(f'<div class="warn">&#9888; {html.escape(warning)}</div>')
    timing = []
    if row.get("seconds") is not None:
        timing.append(f'{row["seconds"]:.1f} s')
    if row.get("planes"):
        timing.append(f'{row["planes"]} planes')
    if row.get("backend"):
        timing.append(html.escape(row["backend"]))
    if timing:
        parts.append(f'<div class="small">{", ".join(timing)}</div>')
    parts.append(f'<div class="small">MRI {html.escape(str(row.get("mri", "")))}<br>'
                 f'{html.escape((row.get("task") or "other").split("-")[0].upper())} {html.escape(str(row.get("other", "")))}'
                 + (f'<br>{html.escape(row["match"])}' if row.get("match") else "") + "</div>")
    if not failed and row.get("output"):
        parts.append(f'<div class="small">fused: {_link(row["output"], folder)}'
                     + (f' &middot; montage: {_link(row["montage"], folder)}' if row.get("montage") else "")
                     + (f' &middot; sidecar: {_link(row["sidecar"], folder)}' if row.get("sidecar") else "") + "</div>")
    parts.append("</div></div>")
    return "\n".join(parts)


def render_report(summary: dict, folder: str | Path) -> str:
    """The page for a batch ``summary`` (what ``summary.json`` holds); links relative to ``folder``."""
    folder = Path(folder).resolve()
    rows = sorted(summary["cases"], key=_order)
    totals = summary["totals"]
    title = f"LightFusion batch: {summary.get('input', '')}"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>",
           f'<div class="small">{html.escape(summary.get("finished", ""))} &middot; lightfusion '
           f'{html.escape(str(summary.get("version", "")))} &middot; output {html.escape(str(summary.get("out", "")))}'
           + ("" if summary.get("complete", True) else " &middot; <b>incomplete: the batch was stopped</b>") + "</div>",
           "<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in totals) + "</tr><tr>"
           + "".join(f"<td>{html.escape(str(v))}</td>" for v in totals.values()) + "</tr></table>"]
    settings = summary.get("settings") or {}
    if settings:
        out.append('<div class="small">settings: ' + html.escape(", ".join(f"{k}={v}" for k, v in settings.items()
                                                                            if v not in (None, ""))) + "</div>")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        out.append(f"<h2>Failed ({len(failed)})</h2><ul>" + "".join(
            f'<li><a href="#case-{html.escape(r["id"])}">{html.escape(r["id"])}</a>: '
            f'<span class="msg">{html.escape(r.get("message") or "")}</span></li>' for r in failed) + "</ul>")
    out.append(f"<h2>Cases ({len(rows)})</h2>")
    out.extend(_case_html(r, folder) for r in rows)
    skipped = summary.get("skipped") or []
    if skipped:
        out.append(f"<h2>Not fused ({len(skipped)})</h2><ul>" + "".join(
            f'<li>{html.escape(s["path"])}: {html.escape(s["reason"])}</li>' for s in skipped) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(summary: dict, path: str | Path) -> Path:
    """Write the review page atomically."""
    path = Path(path)
    text = render_report(summary, path.parent)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
