"""Open an HTML report in headless Chromium: decode its images through the DOM and take a screenshot.

Skips the calling test (with the reason) when no Chromium is installed; ``.ci/run``
installs Debian's ``chromium`` when it can.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_PROBE = """<script>
window.addEventListener("load", () => {
  // The load event waits for every image, so what it sees is final; the probe is written
  // synchronously, before Chromium dumps the DOM (an asynchronous img.decode() could lose that race).
  const images = [...document.images];
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    natural_widths: images.map((img) => img.naturalWidth),
    decoded: images.map((img) => img.complete && img.naturalWidth > 0),
    alts: images.map((img) => img.alt),
    page_height: document.documentElement.scrollHeight,
  });
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    """Path of a Chromium binary, or skip the test saying how to get one."""
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no headless Chromium (Debian: apt-get install -y chromium; .ci/run tries this)")


def _run(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def open_alone(report: Path, workdir: Path, width: int = 1280, height: int = 2400) -> tuple[dict, np.ndarray]:
    """Copy ``report`` alone into an empty folder, open it there, and return (DOM probe, screenshot RGB array).

    The probe is read from ``--dump-dom`` of a copy with one script appended that,
    at the load event (which waits for every image), writes each ``<img>``'s
    ``naturalWidth``, whether it loaded and decoded (``complete`` with a non-zero
    width) and the page height into the DOM. The screenshot
    (``width`` x ``height``) is of the unmodified copy.
    """
    from matplotlib.image import imread

    alone = workdir / "alone"
    alone.mkdir(parents=True)
    page = alone / report.name
    shutil.copyfile(report, page)
    probed = workdir / "probed" / report.name
    probed.parent.mkdir()
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dom = _run(["--virtual-time-budget=10000", "--dump-dom", probed.as_uri()], workdir / "profile-dom").stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"the probe script did not run; Chromium's DOM starts {dom[:300]!r}"
    probe = json.loads(html.unescape(found.group(1)))
    shot = workdir / "screenshot.png"
    _run([f"--window-size={width},{height}", f"--screenshot={shot}", page.as_uri()], workdir / "profile-shot")
    assert sorted(p.name for p in alone.iterdir()) == [report.name], "the browser wrote next to the report"
    return probe, imread(shot)[..., :3]


class _References(HTMLParser):
    """Every URL-valued attribute (src, href, srcset, poster, action, data) of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in {"src", "href", "srcset", "poster", "action", "data", "xlink:href"}:
                self.urls.append((tag, name, value or ""))


def external_references(html_text: str) -> list[str]:
    """References to anything outside the page: URLs that are neither data: URIs nor in-page anchors, CSS url(), imports."""
    parser = _References()
    parser.feed(html_text)
    bad = [f"<{tag} {name}={value[:60]!r}>" for tag, name, value in parser.urls
           if not (value.startswith("data:") or value.startswith("#"))]
    bad += [f"CSS {m[:60]}" for m in re.findall(r"url\(\s*['\"]?(?!data:)[^)]*\)", html_text)]
    bad += [f"CSS {m}" for m in re.findall(r"@import[^;]*;", html_text)]
    bad += [f"<{tag}>" for tag in parser.tags if tag in {"link", "iframe", "object", "embed", "base"}]
    return bad


def is_not_blank(rgb: np.ndarray) -> bool:
    """A screenshot with both dark ink and light background over a sizeable area, not one flat colour."""
    grey = rgb.mean(axis=2)
    return bool(grey.std() > 0.05 and (grey < 0.3).mean() > 0.01 and (grey > 0.8).mean() > 0.2)
