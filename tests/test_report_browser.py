"""report.html in a real headless browser (Debian chromium): it loads offline, shows the tables,
and every embedded PNG decodes to the size written in that PNG's own header.

chromium is required: when it is missing the test FAILS and says how to install it.
"""

import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser

import pytest
from report_fixture import make_run

from circuitdiff.report import Settings, build_report

INSTALL = "apt-get update && apt-get install -y chromium  (Debian; .ci/run does this)"

# Appended to a copy of the page: after load, write each image's decoded size into the DOM.
PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var out = document.createElement("pre");
  out.id = "img-probe";
  out.textContent = JSON.stringify(imgs.map(function (im) {
    return {alt: im.alt, complete: im.complete, w: im.naturalWidth, h: im.naturalHeight};
  }));
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"chromium is not installed; the report's browser test needs it: {INSTALL}")


def dump_dom(browser: str, page, profile) -> str:
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


class Outline(HTMLParser):
    """Headings, table captions/cells and img alts of a DOM dump."""

    def __init__(self):
        super().__init__()
        self.h2, self.cells, self.imgs, self._tag = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        if tag == "img":
            self.imgs.append(dict(attrs).get("alt"))

    def handle_data(self, data):
        if self._tag == "h2":
            self.h2.append(data.strip())
        elif self._tag in ("td", "th", "span"):
            self.cells.append(data.strip())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    browser = chromium()
    root = tmp_path_factory.mktemp("browser")
    out = build_report(make_run(root / "run", n=12), Settings(n_boot=200, n_perm=200))
    return browser, root, out


def _probe(browser, root, html: str, name: str) -> list[dict]:
    page = root / name
    page.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = dump_dom(browser, page, root / f"profile-{name}")
    match = re.search(r'<pre id="img-probe">(.*?)</pre>', dom, re.S)
    assert match, "the probe script did not run (page did not finish loading?)"
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def test_report_loads_with_tables_and_sections(built):
    browser, root, out = built
    outline = Outline()
    outline.feed(dump_dom(browser, out / "report.html", root / "profile-plain"))
    for title in ("Conventions", "Summary table", "Loss and scale", "Metrics vs alpha", "Relative change per edge",
                  "Diversity across samples", "Output-edge entropy per source node", "Skipped"):  # fmt: skip
        assert title in outline.h2, title
    for text in ("Act. Intens.", "Info. Complex.", "Dist. Kurt.", "Diversity", "unit scale: base → tuned; Δ [95% CI]; p",
                 "1 (by construction)", "planted", "null"):
        assert text in outline.cells, text
    assert sorted(outline.imgs) == sorted(p.name for p in out.glob("*.png"))


def test_every_image_decodes_to_its_png_size(built):
    browser, root, out = built
    html = (out / "report.html").read_text()
    images = _probe(browser, root, html, "probe.html")
    pngs = {p.name: png_size(p.read_bytes()) for p in out.glob("*.png")}
    assert len(images) == len(pngs) >= 8
    for im in images:
        assert im["complete"] and (im["w"], im["h"]) == pngs[im["alt"]], im


def test_probe_detects_a_broken_image(built):
    """Negative control: corrupt one embedded PNG; the browser must report it as not decoded."""
    browser, root, out = built
    html = (out / "report.html").read_text()
    start = html.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = html[:start] + "AAAA" + html[start + 40 :]
    images = _probe(browser, root, broken, "broken.html")
    assert images[0]["w"] == 0 and all(im["w"] > 0 for im in images[1:])
