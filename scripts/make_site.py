"""Render every lesson at full size into site/: an HTML copy of the course to read without running it.

    make site                                   # the stale or missing pages (all of them on a first run)
    python scripts/make_site.py --all           # every page again
    python scripts/make_site.py 04_sampling     # one lesson (every page of it)

Each lesson runs top to bottom in a fresh kernel, at full size (DDPM_NB_TINY is removed from the
environment), on the CPU unless a GPU is there, with the shipped models. Lesson 04 is
rendered twice, once per shipped model (DATASET = "fashion-mnist" and "flowers102"; 05 only with its
default, which its GIFs would not leave room for in the budget below): a cell tagged
`injected-parameters` after the `parameters` cell sets DATASET, as papermill does. Figures and
GIFs are embedded in the page (base64; as lossless WebP, a third to a quarter smaller), so each
page is one self-contained file, except for the notebook stylesheet, which is shared: site/notebook.css.

site/manifest.json records, per page, the SHA-256 of the lesson's cell sources (cell types and
sources, in order; not outputs or metadata), the wall time, the page size and the machine.
tests/test_site.py fails when a lesson's cells changed since its page was rendered: re-run
`make site`. Budget (the repository must stay small enough to travel to a GPU machine): each page
<= 2 MB, all of site/ <= 10 MB; a page over budget is not written and the run exits with status 2.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

from ddpm_nb.utils import DiskFullError, atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SITE = ROOT / "site"
PAGE_LIMIT = 2_000_000     # bytes per page
SITE_LIMIT = 10_000_000    # bytes for all of site/
# page name -> (lesson file stem, parameters injected after its `parameters` cell)
VARIANTS = {"04_sampling": {"DATASET": "flowers102"}}


def lessons() -> list[Path]:
    """The course's notebooks in order (the private _scratch* ones excluded)."""
    return sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def pages() -> dict[str, tuple[Path, dict]]:
    """Every page of the site: name -> (notebook, injected parameters)."""
    out = {}
    for nb in lessons():
        out[nb.stem] = (nb, {})
        if nb.stem in VARIANTS:
            params = VARIANTS[nb.stem]
            out[nb.stem + "-" + "-".join(str(v) for v in params.values())] = (nb, params)
    return out


def params_text(params: dict, sep: str = ", ") -> str:
    """The injected parameters as Python assignments: DATASET = 'flowers'."""
    return sep.join(f"{k} = {v!r}" for k, v in params.items())


def source_hash(notebook: Path) -> str:
    """SHA-256 of a notebook's cell types and sources, in order (outputs and metadata ignored)."""
    cells = json.loads(notebook.read_text())["cells"]
    h = hashlib.sha256()
    for c in cells:
        src = c["source"] if isinstance(c["source"], str) else "".join(c["source"])
        h.update(c["cell_type"].encode() + b"\0" + src.encode() + b"\0")
    return h.hexdigest()


def read_manifest() -> dict:
    path = SITE / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {"pages": {}}


def stale_pages(manifest: dict | None = None) -> list[str]:
    """Pages whose lesson changed since they were rendered, or that were never rendered."""
    manifest = read_manifest() if manifest is None else manifest
    rendered = manifest.get("pages", {})
    return [name for name, (nb, _) in pages().items()
            if name not in rendered or rendered[name]["source_sha256"] != source_hash(nb)
            or not (SITE / f"{name}.html").is_file()]


def _atomic_write(path: Path, data: str) -> None:
    """Temp file + rename (`ddpm_nb.utils.atomic_write_bytes`): a full disk leaves the old page whole and
    raises DiskFullError, which `main` reports in one line."""
    atomic_write_bytes(path, data.encode())


def execute(notebook: Path, params: dict, timeout: int):
    """Run a lesson in a fresh kernel at full size; returns the executed notebook node."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    if params:
        at = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
        if at is None:
            raise SystemExit(f"error: {notebook.name} has no cell tagged 'parameters' to inject {params} after")
        src = "# Parameters injected by scripts/make_site.py for this page\n" + params_text(params, "\n")
        cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
        nb.cells.insert(at + 1, cell)
    env_tiny = os.environ.pop("DDPM_NB_TINY", None)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        if env_tiny is not None:
            os.environ["DDPM_NB_TINY"] = env_tiny
    return nb


_STYLE = re.compile(r"<style[^>]*>.*?</style>\s*", flags=re.S)
_IMG = re.compile(r'src="data:image/(png|gif);base64,([A-Za-z0-9+/=\s]+)"')


def shrink_images(page: str) -> str:
    """Re-encode every embedded PNG and GIF as lossless WebP (animated for GIFs, same frame delays) where
    that is smaller: the same pixels, in a third (figures) to a quarter (upscaled GIFs) of the bytes.
    Every current browser shows WebP. The GIF files the lessons write are not touched."""
    import base64
    import io

    from PIL import Image, ImageSequence

    def webp(m):
        raw = base64.b64decode(m.group(2))
        im, out = Image.open(io.BytesIO(raw)), io.BytesIO()
        if m.group(1) == "gif" and getattr(im, "n_frames", 1) > 1:
            frames = [(f.convert("RGB"), f.info.get("duration", 100)) for f in ImageSequence.Iterator(im)]
            frames[0][0].save(out, "WEBP", save_all=True, append_images=[f for f, _ in frames[1:]],
                              duration=[d for _, d in frames], loop=0, lossless=True, method=4)
        else:
            im.save(out, "WEBP", lossless=True, method=6)
        if out.tell() >= len(raw):
            return m.group(0)
        return 'src="data:image/webp;base64,' + base64.b64encode(out.getvalue()).decode() + '"'

    return _IMG.sub(webp, page)


# What a page needs to be read offline: nbconvert's lab template loads require.js, MathJax 2, Mermaid and the
# widget manager from CDNs. The pages have no diagrams and no live widgets (a progress bar's saved widget state
# is noise on a static page), so those go, and MathJax 3 comes from site/mathjax/ (vendored, see its README).
_OFFLINE_DROP = [
    re.compile(r'<script src="https://[^"]*require[^"]*"></script>'),
    re.compile(r"<script>\s*\(function\(\) \{\s*function addWidgetsRenderer\(\).*?</script>", re.S),
    re.compile(r'<script type="module">[^<]*mermaid.*?</script>', re.S),
    re.compile(r'<script type="application/vnd\.jupyter\.widget-(?:view|state)\+json">.*?</script>', re.S),
]
_MATHJAX2 = re.compile(r'<!-- Load mathjax -->\s*<script src="https://[^"]*mathjax[^"]*">\s*</script>\s*'
                       r'<!-- MathJax configuration -->\s*<script type="text/x-mathjax-config">.*?</script>', re.S)
MATHJAX3 = """<!-- MathJax 3, vendored in site/mathjax/: formulas typeset without a network -->
<script>
window.MathJax = {tex: {inlineMath: [["$", "$"], ["\\\\(", "\\\\)"]], displayMath: [["$$", "$$"], ["\\\\[", "\\\\]"]],
                        processEscapes: true, processEnvironments: true, tags: "ams"},
                  options: {ignoreHtmlClass: "tex2jax_ignore", processHtmlClass: "tex2jax_process"}};
</script>
<script src="mathjax/tex-chtml.js" id="MathJax-script" async></script>"""


def offline(page: str) -> str:
    """The page without anything fetched from a network: MathJax from site/mathjax/, no CDN scripts."""
    if "mathjax/tex-chtml.js" not in page:
        page, n = _MATHJAX2.subn(lambda m: MATHJAX3, page)
        if n != 1:
            raise SystemExit("error: the page's MathJax block was not where make_site.py expects it (nbconvert's lab "
                             "template changed?): update _MATHJAX2")
    for pattern in _OFFLINE_DROP:
        page = pattern.sub("", page)
    return page


_BANNER = re.compile(r'<div style="font:14px sans-serif;padding:8px 16px;background:#f3f6fa;border-bottom:1px solid '
                     r'#d0d7de">(?:<nav>.*?</nav>)?<a href="index.html">ddpm_nb course</a> · (.*?)</div>', re.S)
BANNER_STYLE = "font:14px sans-serif;padding:8px 16px;background:#f3f6fa;border-bottom:1px solid #d0d7de"
COLAB_BADGE = """<svg xmlns="http://www.w3.org/2000/svg" width="117" height="20" role="img" aria-label="Open in Colab">
<rect width="117" height="20" rx="3" fill="#555"/><rect x="40" width="77" height="20" rx="3" fill="#f9ab00"/>
<rect x="40" width="4" height="20" fill="#f9ab00"/><g fill="#fff" font-family="Verdana,sans-serif" font-size="11">
<text x="6" y="14">Open</text><text x="47" y="14" fill="#333">in Colab</text></g></svg>
"""


def banner(name: str, note: str) -> str:
    """The strip at the top of a page: the index, the previous and next pages, and how the page was made."""
    order = list(pages())
    i = order.index(name) if name in order else -1
    links = ['<a href="index.html">ddpm_nb course</a>']
    if i > 0:
        links.insert(0, f'<a href="{order[i - 1]}.html">&larr; {html.escape(order[i - 1])}</a>')
    if 0 <= i < len(order) - 1:
        links.append(f'<a href="{order[i + 1]}.html">{html.escape(order[i + 1])} &rarr;</a>')
    return (f'<div style="{BANNER_STYLE}"><nav>{" · ".join(links)}</nav>'
            f'<a href="index.html">ddpm_nb course</a> · {note}</div>')


def _div_end(page: str, start: int) -> int:
    """The index just after the </div> that closes the <div> opening at `start`."""
    depth, i = 0, start
    tags = re.compile(r"<div\b|</div>")
    for m in tags.finditer(page, start):
        depth += 1 if m.group(0) == "<div" else -1
        if depth == 0:
            return m.end()
    raise ValueError("unbalanced <div> in the page")


def collapse_solutions(page: str) -> str:
    """Each cell tagged `solution` inside <details>, closed, as it is collapsed in JupyterLab and Colab."""
    out, pos = [], 0
    for m in re.finditer(r'<div class="jp-Cell[^"]*celltag_solution[^"]*"[^>]*>', page):
        if m.start() < pos:
            continue
        end = _div_end(page, m.start())
        cell = page[m.start():end]
        title = re.search(r"# @title (Solution \d+[^<]*)", cell)
        label = html.unescape(title.group(1)).strip() if title else "Solution"
        out += [page[pos:m.start()], f'<details class="solution"><summary style="cursor:pointer;font:600 15px '
                f'sans-serif;margin:8px 0">{html.escape(label)} (click to open)</summary>', cell, "</details>"]
        pos = end
    return "".join(out) + page[pos:]


def enlarge_small_images(page: str) -> str:
    """Images of at most 128 px shown at 3x (or more, up to 384 px), with nearest-neighbour scaling."""
    import base64
    import io

    from PIL import Image

    def bigger(m):
        tag = m.group(0)
        if "style=" in tag:
            return tag
        try:
            w, h = Image.open(io.BytesIO(base64.b64decode(m.group(2)))).size
        except Exception:
            return tag
        if max(w, h) > 128:
            return tag
        k = max(3, 384 // max(w, h))
        return tag.replace("<img ", f'<img style="width:{k * w}px;image-rendering:pixelated" ', 1)

    return re.sub(r'<img [^>]*src="data:image/(png|gif|webp);base64,([A-Za-z0-9+/=\s]+)"[^>]*>', bigger, page)


def finish(page: str, name: str) -> str:
    """Everything a rendered page gets after nbconvert: offline, navigation, a local Colab badge, solutions
    collapsed, small images enlarged. Idempotent, so `--rewrite` can apply it to pages already rendered."""
    page = offline(page)
    page = _BANNER.sub(lambda m: banner(name, m.group(1)), page, count=1)
    page = page.replace('src="https://colab.research.google.com/assets/colab-badge.svg"', 'src="colab-badge.svg"')
    if '<details class="solution">' not in page:
        page = collapse_solutions(page)
    return enlarge_small_images(page)


def to_html(nb, title: str, note: str) -> tuple[str, str]:
    """(page, stylesheet): the lab template's page with its <style> blocks moved into one shared file."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb, resources={"metadata": {"name": title}})
    css = "\n".join(m.group(0).split(">", 1)[1].rsplit("</style>", 1)[0] for m in _STYLE.finditer(body))
    body = _STYLE.sub("", body, count=0)
    body = body.replace("</head>", '<link rel="stylesheet" href="notebook.css">\n</head>', 1)
    body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + banner(title, html.escape(note)), body, count=1)
    return finish(shrink_images(body), title), css


def learn_lines() -> dict[str, str]:
    """Lesson stem -> its "What you learn" line, from the README's table of lessons (one source for both)."""
    out = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"\| \d+ \| \[([\w-]+)\]\(notebooks/[\w-]+\.ipynb\) \| (.*) \|$", line)
        if m:
            out[m.group(1)] = m.group(2).replace("\\|", "|")
    return out


def write_index(manifest: dict) -> None:
    rows = []
    learn = learn_lines()
    for name, (nb, params) in pages().items():
        info = manifest["pages"].get(name)
        if info is None:
            continue
        what = f" ({params_text(params)})" if params else ""
        rows.append(f'<li><a href="{name}.html">{html.escape(nb.stem)}</a>{html.escape(what)}: '
                    f'{html.escape(learn.get(nb.stem, ""))} <small>(ran in {info["seconds"]:.0f} s, '
                    f'{info["bytes"] / 1e6:.2f} MB)</small></li>')
    m = manifest.get("machine", {})
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>ddpm_nb: the course, rendered</title></head>
<body style="font:16px/1.5 sans-serif;max-width:760px;margin:40px auto;padding:0 16px">
<h1>ddpm_nb: Denoising Diffusion Probabilistic Models, the course</h1>
<p>Every lesson executed top to bottom at full size with the shipped models, so the figures, tables
and GIFs below are real outputs. To run them yourself, open <code>notebooks/</code> in JupyterLab or
Colab (see the README). Rendered with <code>make site</code> on {html.escape(m.get('device', '?'))},
torch {html.escape(m.get('torch', '?'))}, torch threads: {html.escape(str(m.get('threads', '?')))}.</p>
<ol>
{chr(10).join(rows)}
</ol>
</body></html>
"""
    _atomic_write(SITE / "index.html", page)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("only", nargs="*", help="lesson names (e.g. 04_sampling); default: every stale page")
    p.add_argument("--all", action="store_true", help="render every page, stale or not")
    p.add_argument("--timeout", type=int, default=3600, help="seconds one cell may run")
    p.add_argument("--rewrite", action="store_true",
                   help="run nothing: apply the current page finishing (offline, navigation, collapsed solutions, "
                        "enlarged small images) to the pages already rendered")
    args = p.parse_args(argv)
    if args.rewrite:
        manifest = read_manifest()
        _atomic_write(SITE / "colab-badge.svg", COLAB_BADGE)
        for name in manifest.get("pages", {}):
            path = SITE / f"{name}.html"
            page = finish(path.read_text(), name)
            _atomic_write(path, page)
            manifest["pages"][name]["bytes"] = len(page.encode())
        _atomic_write(SITE / "manifest.json", json.dumps(manifest, indent=1) + "\n")
        write_index(manifest)
        print(f"rewrote {len(manifest.get('pages', {}))} pages (offline, navigation, solutions, small images)")
        return 0
    import torch

    every = pages()
    unknown = [o for o in args.only if o not in every and not any(nb.stem == o for nb, _ in every.values())]
    if unknown:
        print(f"error: no lesson named {', '.join(unknown)}; the pages are: {', '.join(every)}", file=sys.stderr)
        return 2
    manifest = read_manifest()
    if args.only:
        todo = [n for n, (nb, _) in every.items() if n in args.only or nb.stem in args.only]
    else:
        todo = list(every) if args.all else stale_pages(manifest)
    if not todo:
        print("site/ is up to date (every page matches its lesson's cells)")
        return 0
    SITE.mkdir(exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    manifest["machine"] = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
                           "threads": os.environ.get("DDPM_NB_THREADS") or "torch's default"}
    status = 0
    for name in todo:
        nb_path, params = every[name]
        print(f"{name}: running {nb_path.name} at full size{f' with {params}' if params else ''} ...", flush=True)
        t0 = time.perf_counter()
        try:
            nb = execute(nb_path, params, args.timeout)
        except Exception as e:  # a failing cell: report it, keep the pages that rendered, go on with the next
            print(e, file=sys.stderr)
            print(f"error: {name}: {nb_path.name} failed at full size ({type(e).__name__}); its page was not "
                  f"written. The failing cell and its traceback are above.", file=sys.stderr)
            status = 2
            continue
        seconds = time.perf_counter() - t0
        note = (f"{nb_path.name}{' with ' + params_text(params) if params else ''}, "
                f"executed at full size in {seconds:.0f} s on {device}, {time.strftime('%Y-%m-%d')}")
        page, css = to_html(nb, name, note)
        size = len(page.encode())
        if size > PAGE_LIMIT:
            print(f"error: {name}.html would be {size / 1e6:.2f} MB, over the {PAGE_LIMIT / 1e6:.0f} MB a page may "
                  f"take: make its figures or GIFs smaller; the page was not written", file=sys.stderr)
            status = 2
            continue
        _atomic_write(SITE / "notebook.css", css)
        _atomic_write(SITE / "colab-badge.svg", COLAB_BADGE)
        _atomic_write(SITE / f"{name}.html", page)
        manifest = dict(read_manifest(), machine=manifest["machine"])   # another `make site` may have added pages
        manifest["pages"][name] = {"notebook": f"notebooks/{nb_path.name}", "params": params,
                                   "source_sha256": source_hash(nb_path), "seconds": round(seconds, 1),
                                   "bytes": size, "date": time.strftime("%Y-%m-%d")}
        manifest["pages"] = {n: manifest["pages"][n] for n in every if n in manifest["pages"]}
        _atomic_write(SITE / "manifest.json", json.dumps(manifest, indent=1) + "\n")
        write_index(manifest)
        print(f"{name}: {seconds:.0f} s, {size / 1e6:.2f} MB -> site/{name}.html", flush=True)
    total = sum(f.stat().st_size for f in SITE.rglob("*") if f.is_file())
    print(f"site/: {total / 1e6:.2f} MB in all (budget {SITE_LIMIT / 1e6:.0f} MB)")
    if total > SITE_LIMIT:
        print(f"error: site/ is {total / 1e6:.2f} MB, over its {SITE_LIMIT / 1e6:.0f} MB budget: shrink the largest "
              f"pages' figures or GIFs", file=sys.stderr)
        status = 2
    return status


def cli(argv=None) -> int:
    """`main`, with a full disk reported in one line (exit 2): the pages already written stay as they are."""
    try:
        return main(argv)
    except DiskFullError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
