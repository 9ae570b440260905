"""`inspect --report FILE.html`, opened in a real browser: headless Chromium renders the page without a
console message, the inline script draws every heatmap and its hover shows the cell's value; a screenshot
is kept (its path is printed). A page with an injected script error must fail the same checks (negative
control). The page is self-contained and carries the report's numbers."""
from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from test_inspect import inspect_json, run

ROOT = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CONSOLE = re.compile(r':CONSOLE[^\]]*\] "(.*)", source: ')  # every console message, any level


def chromium() -> str:
    exe = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if exe is None:  # not a skip: CI installs it (.ci/run)
        pytest.fail("chromium is not installed: apt-get install chromium (.ci/run installs it when missing)")
    return exe


def open_page(page: Path, shot: Path, profile: Path) -> tuple[str, list[str]]:
    """(the DOM after the scripts ran, the console messages) of `page`; a screenshot written to `shot`."""
    base = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--enable-logging=stderr",
            "--v=0", f"--user-data-dir={profile}"]
    shown = subprocess.run(base + [f"--screenshot={shot}", "--window-size=1400,2200", page.as_uri()],
                           capture_output=True, text=True, timeout=180)
    assert shown.returncode == 0, shown.stderr[-2000:]
    dom = subprocess.run(base + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout, CONSOLE.findall(shown.stderr) + CONSOLE.findall(dom.stderr)


def html_attributes(dom: str) -> dict[str, str]:
    return dict(re.findall(r'(data-[a-z]+)="([^"]*)"', re.search(r"<html[^>]*>", dom).group(0)))


@pytest.fixture(scope="module")
def pages(tmp_path_factory, make_peft_adapter) -> dict[str, tuple[Path, dict]]:
    """The report page of the MHR fixture and of a PEFT-written Poly adapter, with their JSON reports."""
    out = tmp_path_factory.mktemp("inspect-report")
    adapters = {"mhr": ROOT / "fixtures" / "mhr", "poly": make_peft_adapter("llama", n_tasks=5, n_splits=1)[0]}
    made = {}
    for name, adapter in adapters.items():
        page = out / f"{name}.html"
        res = run("inspect", str(adapter), "--report", str(page))
        assert res.exit_code == 0 and f"wrote {page}" in res.stderr, res.output
        made[name] = (page, inspect_json(adapter))
    return made


@pytest.mark.parametrize("name", ["mhr", "poly"])
def test_report_renders_in_chromium(pages, name, tmp_path, record_property):
    page, rep = pages[name]
    shot = page.with_suffix(".png")
    dom, console = open_page(page, shot, tmp_path / "profile")
    print(f"screenshot: {shot}")  # kept in pytest's temporary directory (the last 3 runs)
    record_property("screenshot", str(shot))  # and named in --junitxml reports
    assert console == []
    attrs = html_attributes(dom)
    assert attrs.get("data-rendered") == "ok", attrs
    t, s, q = rep["n_tasks"], rep["n_skills"], rep["n_splits"]
    first_layer = [m for m in rep["routing"]["layers"]["modules"][0] if m is not None]
    assert int(attrs["data-cells"]) == t * t + t * s + len(first_layer) * q * t * s
    top = rep["routing"]["clustering"]["order"][0]
    assert attrs["data-probe"] == f"task {top} vs task {top}: 1.0000"  # the hover shows the cell's value
    assert re.search(r'<pre id="errors"></pre>', dom)
    raw = shot.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", raw[16:24]) == (1400, 2200)


def test_the_browser_check_catches_a_script_error(pages, tmp_path):
    """Negative control: the same page with a bug in its script fails every check above."""
    page, _ = pages["mhr"]
    broken = tmp_path / "broken.html"
    text = page.read_text()
    assert text.count("drawLayer(0);") == 1
    broken.write_text(text.replace("drawLayer(0);", "drawLayer(D.layer_labels.length);"))
    dom, console = open_page(broken, tmp_path / "broken.png", tmp_path / "profile")
    assert any("Uncaught TypeError" in line for line in console), console
    assert "data-rendered" not in html_attributes(dom)
    assert re.search(r'<pre id="errors">script error: [^<]+</pre>', dom)


def test_report_is_self_contained_and_carries_the_numbers(pages):
    page, rep = pages["poly"]
    text = page.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:|#)""", text)  # nothing loaded from elsewhere
    for absent in ("<link", "@import", "@font-face", "url(", "http://", "https://"):
        assert absent not in text, absent
    data = json.loads(re.search(r'<script type="application/json" id="inspect-data">(.*?)</script>', text,
                                re.S).group(1))
    ro = rep["routing"]
    for key, value in (("similarity", ro["similarity"]), ("weights", ro["weights"]), ("usage", ro["usage"]["active"])):
        np.testing.assert_allclose(data[key], value, rtol=0, atol=5e-7)  # rounded to 6 decimals
    assert data["order"] == ro["clustering"]["order"]
    for shown in (f"{rep['parameters']['poly']:,}", f"{rep['parameters']['lora_per_task']:,}",
                  "model.layers.1.mlp.down_proj", "n_splits", "<h2 id=\"modules\">", "data:image/png;base64,"):
        assert shown in text, shown


def test_report_refuses_other_names(pages, tmp_path):
    res = run("inspect", str(ROOT / "fixtures" / "mhr"), "--report", str(tmp_path / "report.txt"))
    assert res.exit_code == 2
    assert "--report writes an HTML page: the file name must end in .html, not '.txt'" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_names_cannot_break_out_of_the_page(pages):
    """A '<' anywhere in the embedded data is written \\u003c: no '</script>' or '<!--' ends the data early."""
    from polytool.inspect.html import build_page

    _, rep = pages["poly"]
    rep = json.loads(json.dumps(rep))
    rep["adapter_dir"] = "/tmp/<b>&x"
    rep["routing"]["layers"]["labels"][0] = "</script><!--"
    page = build_page(rep, b"png")
    data = re.search(r'<script type="application/json" id="inspect-data">(.*?)</script>', page, re.S).group(1)
    assert "<" not in data and json.loads(data)["layer_labels"][0] == "</script><!--"
    assert "<title>polytool inspect: &lt;b&gt;&amp;x</title>" in page
