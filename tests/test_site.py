"""The rendered course in site/ (scripts/make_site.py): present, within budget, and not stale."""
import importlib.util
import json
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_site", ROOT / "scripts" / "make_site.py")
make_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_site)


def test_every_lesson_has_a_fresh_page():
    stale = make_site.stale_pages()
    assert not stale, (f"site/ is stale for {', '.join(stale)}: their lessons' cells changed since the pages were "
                       f"rendered (or were never rendered). Run `make site` (or python scripts/make_site.py "
                       f"{' '.join(sorted({s.split('-')[0] for s in stale}))}) and commit site/.")


def test_pages_within_budget_and_complete():
    manifest = make_site.read_manifest()
    names = set(make_site.pages())
    assert set(manifest["pages"]) == names
    total = 0
    for name in names:
        page = (make_site.SITE / f"{name}.html").read_text()
        size = len(page.encode())
        assert size <= make_site.PAGE_LIMIT, f"site/{name}.html is {size / 1e6:.2f} MB"
        assert manifest["pages"][name]["bytes"] == size
        assert "<style" not in page and 'href="notebook.css"' in page      # the stylesheet is shared
        assert page.count('class="jp-OutputArea') > 5                       # executed: it has outputs
        assert "Traceback (most recent call last)" not in page
        total += size
    assert "06_guidance" in names and "04_sampling-flowers102" in names
    injected = "Parameters injected by scripts/make_site.py"
    assert injected in (make_site.SITE / "04_sampling-flowers102.html").read_text()
    assert injected not in (make_site.SITE / "04_sampling.html").read_text()
    assert manifest["pages"]["04_sampling-flowers102"]["params"] == {"DATASET": "flowers102"}
    on_disk = sum(f.stat().st_size for f in make_site.SITE.iterdir() if f.is_file())
    assert on_disk <= make_site.SITE_LIMIT, f"site/ is {on_disk / 1e6:.2f} MB"
    assert (make_site.SITE / "index.html").is_file() and (make_site.SITE / "notebook.css").stat().st_size > 10_000
    assert re.search(r"\]\(site/index\.html\)", (ROOT / "README.md").read_text()), "README must link site/index.html"


def test_source_hash_follows_sources_not_outputs(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# A"), nbformat.v4.new_code_cell("x = 1")])
    path = tmp_path / "a.ipynb"
    nbformat.write(nb, path)
    h = make_site.source_hash(path)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[1].execution_count = 3
    nb.metadata["kernelspec"] = {"name": "python3"}
    nbformat.write(nb, path)
    assert make_site.source_hash(path) == h                     # outputs and metadata do not make a page stale
    nb.cells[1].source = "x = 2"
    nbformat.write(nb, path)
    assert make_site.source_hash(path) != h                     # an edited cell does
    nb.cells[1].source = "x = 1"
    nb.cells[0].cell_type = "raw"
    nbformat.write(nb, path)
    assert make_site.source_hash(path) != h                     # so does a changed cell type


@pytest.mark.slow
def test_execute_injects_parameters_and_html_shares_the_stylesheet(tmp_path, monkeypatch):
    params = nbformat.v4.new_code_cell('DATASET = "fashion-mnist"   # the default', metadata={"tags": ["parameters"]})
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell("import os\nprint(DATASET, os.environ.get('DDPM_NB_TINY'))")])
    path = tmp_path / "lesson.ipynb"
    nbformat.write(nb, path)
    monkeypatch.setattr(make_site, "NOTEBOOKS", tmp_path)
    monkeypatch.setenv("DDPM_NB_TINY", "1")
    done = make_site.execute(path, {"DATASET": "flowers102"}, timeout=120)
    assert done.cells[1].metadata["tags"] == ["injected-parameters"]
    assert done.cells[2].outputs[0]["text"] == "flowers102 None\n"     # injected after the defaults; full size
    page, css = make_site.to_html(done, "lesson", "a note")
    assert "<style" not in page and "jp-OutputArea" in css and "a note" in page


def test_shrink_images_keeps_every_pixel():
    import base64
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [0, 1, 4])
    ax.imshow([[0, 1], [1, 0]], extent=(0, 1, 0, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    png = buf.getvalue()
    page = f'<p>x</p><img src="data:image/png;base64,{base64.b64encode(png).decode()}"/><img src="data:image/jpeg;base64,/9j/"/>'
    out = make_site.shrink_images(page)
    webp = re.search(r'src="data:image/webp;base64,([^"]+)"', out)
    assert webp and 'data:image/jpeg;base64,/9j/' in out and len(out) < len(page)
    pixels = lambda raw: Image.open(io.BytesIO(raw)).convert("RGBA").tobytes()
    assert pixels(base64.b64decode(webp.group(1))) == pixels(png)


def test_shrink_images_turns_a_gif_into_the_same_animation(tmp_path):
    import base64
    import io

    import numpy as np
    from PIL import Image, ImageSequence

    from ddpm_nb import animate

    rng = np.random.default_rng(0)
    frames = [np.kron(rng.integers(0, 255, (8, 8, 1), dtype=np.uint8), np.ones((4, 4, 3), np.uint8)) for _ in range(3)]
    gif = animate.write_gif(frames, tmp_path / "a.gif", fps=5).read_bytes()
    out = make_site.shrink_images(f'<img src="data:image/gif;base64,{base64.b64encode(gif).decode()}" width="64"/>')
    webp = re.search(r'src="data:image/webp;base64,([^"]+)" width="64"', out)
    assert webp, "an upscaled GIF must come out smaller as WebP, with its attributes kept"
    decode = lambda raw: [(np.asarray(f.convert("RGB")), f.info.get("duration"))
                          for f in ImageSequence.Iterator(Image.open(io.BytesIO(raw)))]
    got, want = decode(base64.b64decode(webp.group(1))), decode(gif)
    assert len(got) == len(want) == 3
    for (a, da), (b, db) in zip(got, want):
        np.testing.assert_array_equal(a, b)
        assert da == db


def _pages():
    return sorted(p for p in make_site.SITE.glob("*.html") if p.name != "index.html")


def test_pages_link_to_their_neighbours_and_the_index_says_what_each_teaches():
    order = list(make_site.pages())
    for i, name in enumerate(order):
        nav = re.search(r"<nav>(.*?)</nav>", (make_site.SITE / f"{name}.html").read_text()).group(1)
        assert 'href="index.html"' in nav
        assert (f'href="{order[i - 1]}.html"' in nav) == (i > 0)
        assert (i + 1 < len(order)) == (i + 1 < len(order) and f'href="{order[i + 1]}.html"' in nav)
    index = (make_site.SITE / "index.html").read_text()
    learn = make_site.learn_lines()
    assert len(learn) == len({nb.stem for nb, _ in make_site.pages().values()})
    for stem, line in learn.items():
        assert re.sub(r"\s+", " ", line.split(";")[0])[:40] in index.replace("&#x27;", "'").replace("&quot;", '"'), stem


def test_pages_load_nothing_from_a_network():
    """Read offline, a page must still show its formulas: MathJax comes from site/mathjax/, nothing from a CDN."""
    mathjax = make_site.SITE / "mathjax" / "tex-chtml.js"
    fonts = list((make_site.SITE / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert mathjax.stat().st_size > 1e6 and len(fonts) > 20 and (make_site.SITE / "mathjax" / "LICENSE").is_file()
    for path in _pages():
        page = path.read_text()
        assert not re.search(r'<(?:script|link)[^>]+(?:src|href)="(?:https?:)?//', page), path.name
        assert not re.search(r"cdnjs|unpkg|jsdelivr", page), path.name
        assert page.count('src="mathjax/tex-chtml.js"') == 1 and "window.MathJax" in page, path.name
        assert 'src="colab-badge.svg"' in page and "colab.research.google.com/assets" not in page, path.name
    # and the rewrite is what make_site applies to every new page
    sample = ('<!-- Load mathjax -->\n<script src="https://cdnjs.cloudflare.com/ajax/libs/mathjax/2.7.7/latest.js">'
              ' </script>\n<!-- MathJax configuration -->\n<script type="text/x-mathjax-config">x</script>'
              '<script src="https://cdnjs.cloudflare.com/ajax/libs/require.js/2.1.10/require.min.js"></script>')
    assert make_site.offline(sample).count("<script") == 2 and "https" not in make_site.offline(sample)


PROBE = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  document.body.setAttribute("data-probe", JSON.stringify({
    images: document.images.length, broken: broken, math: document.querySelectorAll("mjx-container").length,
    raw: document.body.innerText.includes("$$"), closed: [...document.querySelectorAll("details.solution")]
      .filter(d => !d.open).length}));
}, 4000));
</script>"""


@pytest.mark.skipif(not any(Path(p).exists() for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser")),
                    reason="no Chromium on this machine (apt-get install chromium): the browser check is skipped")
def test_every_page_reads_offline_in_a_browser(tmp_path):
    """Headless Chromium with every network request sent nowhere: each page's formulas typeset, every image
    loads, and the solutions start closed."""
    import shutil
    import subprocess
    chromium = next(p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists())
    site = tmp_path / "site"
    shutil.copytree(make_site.SITE, site)
    for path in _pages():
        copy = site / path.name
        copy.write_text(copy.read_text().replace("</body>", PROBE + "</body>", 1))
        proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               "--proxy-server=127.0.0.1:9", f"--user-data-dir={tmp_path / 'profile'}",
                               "--virtual-time-budget=30000", "--dump-dom", copy.as_uri()],
                              capture_output=True, text=True, timeout=300)
        m = re.search(r'data-probe="([^"]*)"', proc.stdout)
        assert m, f"{path.name}: the page did not finish loading offline\n{proc.stderr[-1500:]}"
        probe = json.loads(m.group(1).replace("&quot;", '"'))
        assert probe["broken"] == 0 and probe["images"] > 0, (path.name, probe)
        assert probe["math"] > 0 and not probe["raw"], (path.name, probe)   # typeset, no $$ left as text
        solutions = path.read_text().count('<details class="solution">')
        assert solutions > 0 and probe["closed"] == solutions, (path.name, probe)
