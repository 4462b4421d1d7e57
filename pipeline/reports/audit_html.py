"""The audit's pictures: one self-contained HTML page (thumbnails inlined as base64 JPEG, no external
resource, so it opens anywhere and can be mailed) and a gallery PNG of the top label issues."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path, PurePosixPath
from typing import Optional

from ..data.folders import thumbnail
from ..files import atomic_write, starts_with

THUMB = 160  # pixels, the longer side of a thumbnail
GROUP_SHOWN = 6  # thumbnails of a duplicate group; the others are named
#: How the page begins (pages of earlier audits too): ``is_page`` knows one audit may replace by it.
PAGE_HEAD = "<!doctype html><html><head><meta charset='utf-8'><title>audit of "
#: The PNG text chunk (keyword, text) audit writes into gallery.png: ``is_gallery`` knows its own by it.
GALLERY_MARK = ("transfer-pipeline", "audit gallery")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def data_uri(image) -> Optional[str]:
    if image is None:
        return None
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def photo_figure(root: str, rel: str, caption: str) -> str:
    uri = data_uri(thumbnail(Path(root) / rel, THUMB))
    pic = f'<img src="{uri}" alt="">' if uri else '<div class="missing">unreadable</div>'
    return f'<figure>{pic}<figcaption>{html.escape(caption)}</figcaption></figure>'


STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}h2{margin-top:1.6em}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}
figure{display:inline-block;margin:2px 6px;text-align:center;font-size:11px;max-width:170px;word-break:break-all}
img{max-width:160px;max-height:160px;display:block;margin:auto}.missing{width:120px;height:90px;background:#ddd}
.given{color:#b00}.suggested{color:#070}"""


def render(result: dict, top: int) -> str:
    """The HTML text of an audit ``result`` (``analyse``'s, with its ``knn`` neighbour indices)."""
    root, esc = result["data_root"], html.escape
    parts = [f"{PAGE_HEAD}{esc(root)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Audit of {esc(root)}</h1>",
             f"<p>{result['rows']} photos, classes {esc(', '.join(result['classes']))}; out-of-fold probabilities "
             f"from {result['folds']} refits of {esc(result['head'])} (accuracy {result['oof_acc']:.3f}); "
             f"near copies: cosine similarity &ge; {result['threshold']} and the same layout.</p>",
             f"<h2>Likely wrong labels ({len(result['label_issues'])})</h2>"]
    knn, paths, given = result.get("knn"), result.get("_paths"), result.get("_given")
    parts.append("<table><tr><th>photo</th><th>given &rarr; suggested</th><th>nearest training photos</th></tr>")
    for it in result["label_issues"][:top]:
        neighbours = ""
        if knn is not None and paths is not None:
            neighbours = "".join(photo_figure(root, paths[j], f"{given[j]}") for j in knn[it["row"]])
        parts.append(f"<tr><td>{photo_figure(root, it['path'], it['path'])}</td><td><span class='given'>"
                     f"{esc(it['given'])}</span> &rarr; <span class='suggested'>{esc(it['suggested'])}</span><br>score "
                     f"{it['score']:.3f}</td><td>{neighbours}</td></tr>")
    parts.append("</table>")
    parts.append(f"<h2>Like no other photo ({len(result['outliers'])})</h2><div>")
    parts += [photo_figure(root, o["path"], f"{o['path']} ({o['given']}, {o['score']:.3f})")
              for o in result["outliers"][:top]]
    parts.append(f"</div><h2>Duplicates ({len(result['duplicates'])} groups)</h2><table>")
    for g in result["duplicates"][:top]:
        kind = "same bytes" if g["exact"] else f"cosine {g['similarity']:.3f}"
        more = len(g["paths"]) - GROUP_SHOWN  # named, not hidden: the copy to remove may be among them
        parts.append(f"<tr><td>{kind}</td><td>" + "".join(photo_figure(root, p, f"{p} ({c})")
                                                          for p, c in zip(g["paths"][:GROUP_SHOWN], g["classes"]))
                     + (f"<p>and {more} more: {esc(', '.join(g['paths'][GROUP_SHOWN:]))}</p>" if more > 0 else "")
                     + "</td></tr>")
    parts.append("</table>")
    if result.get("test_cache"):
        parts.append(f"<h2>Leaks: test photos also in the training folder ({len(result['leaks'])})</h2><table>")
        for lk in result["leaks"][:top]:
            kind = "same bytes" if lk["exact"] else f"cosine {lk['similarity']:.3f}"
            parts.append(f"<tr><td>{kind}</td><td>{photo_figure(result['test_root'], lk['test'], 'test ' + lk['test'])}"
                         f"{photo_figure(root, lk['train'], 'train ' + lk['train'])}</td></tr>")
        parts.append("</table>")
    if result.get("unreadable"):
        parts.append(f"<h2>Unreadable files, not audited ({len(result['unreadable'])})</h2><ul>")
        parts += [f"<li>{esc(u['path'])}: {esc(u['reason'])}</li>" for u in result["unreadable"]]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(result: dict, path: Path, top: int) -> Path:
    text = render(result, top)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def is_page(path: Path) -> bool:
    """Whether ``path`` is a report.html an audit wrote (by how it begins)."""
    return starts_with(path, PAGE_HEAD.encode())


def png_texts(path: Path, limit: int = 1 << 16) -> dict:
    """The tEXt chunks before a PNG's pixels (its first ``limit`` bytes), as {keyword: text}; {} when ``path`` is
    no PNG or cannot be read. Read chunk by chunk: a user's huge PNG is never decoded."""
    try:
        with open(path, "rb") as f:
            head = f.read(limit)
    except OSError:
        return {}
    if not head.startswith(PNG_MAGIC):
        return {}
    texts, at = {}, len(PNG_MAGIC)
    while at + 8 <= len(head):
        size, kind = int.from_bytes(head[at:at + 4], "big"), head[at + 4:at + 8]
        if kind == b"IDAT" or at + 8 + size > len(head):
            break
        if kind == b"tEXt":
            key, _, text = head[at + 8:at + 8 + size].partition(b"\0")
            texts[key.decode("latin-1")] = text.decode("latin-1")
        at += 12 + size
    return texts


def is_report(path: Path, gallery: str = "") -> bool:
    """Whether ``path`` is a report.json an audit wrote (a JSON object with its keys); with ``gallery``, one that
    names a gallery of that file name (a report of label issues)."""
    if not starts_with(path, b"{"):
        return False
    try:
        report = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    ours = isinstance(report, dict) and {"data_root", "label_issues", "folds"} <= report.keys()
    return ours and (not gallery or PurePosixPath(str(report.get("gallery") or "")).name == gallery)


def is_gallery(path: Path) -> bool:
    """Whether ``path`` is a gallery.png an audit wrote: one with ``GALLERY_MARK``, or one written before audit
    marked its gallery (a matplotlib PNG named by the audit's report.json beside it). A user's own picture of
    that name is neither."""
    texts = png_texts(path)
    if texts.get(GALLERY_MARK[0]) == GALLERY_MARK[1]:
        return True
    return texts.get("Software", "").startswith("Matplotlib") and is_report(path.with_name("report.json"), path.name)


def write_gallery(result: dict, path: Path, top: int) -> Path:
    from ..runs.figures import DPI, label_issues_figure

    items = [{**it, "image": thumbnail(Path(result["data_root"]) / it["path"], 256)}
             for it in result["label_issues"][:min(top, 24)]]
    fig = label_issues_figure(items)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata=dict([GALLERY_MARK])))
