"""Try the QKVA explorer in a real JupyterLab, in headless Chromium (a manual check, not part of CI).

Starts ``jupyter lab`` from this environment on 127.0.0.1 with a random token, opens
``notebooks/02_qkva_explorer.ipynb`` in the system's Chromium through Playwright, runs every cell
from the Run menu ("Run All Cells"), then moves the explorer's widgets with the mouse (drags the
``query x`` slider, picks a decoder cross-attention site in the dropdown, drags ``object q``, picks
a stage-1 encoder site, drags ``head``) and checks after each move that the figure's attention-map
panel (its rightmost fifth) changed in more than 1 % of its pixels. Writes screenshots before and after each move
to ``--shots`` and the final state to ``docs/qkva_explorer_jupyterlab.png``.

Needs ``pip install playwright`` (the Python package only: it drives ``/usr/bin/chromium``; no
browser is downloaded, ``playwright install`` is never run) and ``apt-get install chromium``.
The notebook runs with its default parameters: with no cached model it first trains one (set
``SDETR_CACHE`` to reuse a cache)::

    python docs/jupyterlab_check.py [--port 8899] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "notebooks/02_qkva_explorer.ipynb"


def wait_for_server(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"JupyterLab did not answer at {url} within {timeout:.0f} s")


#: JupyterLab settings for the check: no autosave (the committed notebook stays untouched), no news pop-up.
SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"},
}


def write_settings(folder: Path) -> None:
    for name, values in SETTINGS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(values))


def changed_fraction(before: bytes, after: bytes, left: float = 0.0) -> float:
    """Fraction of pixels that differ between two PNG screenshots, in the part right of ``left``
    (a fraction of the width)."""
    a = np.asarray(Image.open(io.BytesIO(before)).convert("RGB")).astype(int)  # [H, W, 3]
    b = np.asarray(Image.open(io.BytesIO(after)).convert("RGB")).astype(int)
    if a.shape != b.shape:
        return 1.0
    start = int(a.shape[1] * left)
    return float((np.abs(a[:, start:] - b[:, start:]).sum(-1) > 30).mean())


#: True once a cell prompt shows ``[*]`` or ``[n]``: the kernel took the cells.
STARTED = r"() => [...document.querySelectorAll('.jp-InputPrompt')].some(e => /\[(\*|\d+)\]/.test(e.textContent))"


def run_all_cells(page: Any) -> None:
    """Run > Run All Cells, once the notebook is the current document (the item is enabled), and wait
    until the first cell has started."""
    item = page.locator("li.lm-Menu-item[data-command='runmenu:run-all']")
    for _ in range(20):
        page.locator(".lm-TabBar-tab", has_text=Path(NOTEBOOK).name).first.click()  # make it current
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()  # open the Run menu
        item.wait_for(state="visible")
        if "lm-mod-disabled" not in (item.get_attribute("class") or ""):
            item.click()
            page.wait_for_function(STARTED, timeout=120_000)
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(1000)
    raise RuntimeError("'Run All Cells' stayed disabled in the Run menu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8899)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--shots", type=Path, default=Path("/tmp/jupyterlab_check"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "qkva_explorer_jupyterlab.png")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for running all cells")
    parser.add_argument("--doc-step", type=int, default=0, help="the move whose result is saved as --out")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    args.shots.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="jupyterlab_check."))  # settings and workspaces of this run only
    write_settings(state / "settings")
    token = secrets.token_hex(16)
    base = f"http://127.0.0.1:{args.port}"
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={args.port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.token={token}",
        f"--ServerApp.root_dir={ROOT}",
        "--allow-root",
        f"--LabApp.user_settings_dir={state / 'settings'}",
        f"--LabApp.workspaces_dir={state / 'workspaces'}",
    ]
    log = (args.shots / "jupyterlab.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    shown = [part if "token=" not in part else "--ServerApp.token=<random>" for part in command]
    report: dict[str, Any] = {"jupyter_command": " ".join(shown)}
    try:
        wait_for_server(f"{base}/api/status?token={token}", 120)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            try:
                errors: list[str] = []
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.goto(f"{base}/lab/tree/{NOTEBOOK}?reset&token={token}")
                idle = ".jp-Notebook-ExecutionIndicator[data-status='idle']"
                page.wait_for_selector(idle, timeout=180_000)  # kernel started
                report["chromium"] = browser.version
                run_all_cells(page)
                start = time.monotonic()
                picture = page.locator("img.widget-image")
                picture.wait_for(state="attached", timeout=args.timeout * 1000)  # the explorer's last cell ran
                page.wait_for_selector(idle, timeout=args.timeout * 1000)
                report["run_all_seconds"] = round(time.monotonic() - start, 1)
                note = page.locator(".widget-html-content").last

                def slider(label: str) -> Any:
                    return page.locator(".widget-hslider", has=page.locator("label", has_text=label)).locator(
                        ".noUi-handle"
                    )

                def settle(previous_src: str | None) -> None:
                    if previous_src is not None:  # the Image widget gets a new blob URL on every redraw
                        page.wait_for_function(
                            "src => document.querySelector('img.widget-image').src !== src", arg=previous_src
                        )
                    page.wait_for_selector(idle, timeout=120_000)
                    page.wait_for_timeout(500)

                def drag(label: str, dx: float) -> None:
                    handle = slider(label)
                    handle.scroll_into_view_if_needed()
                    box = handle.bounding_box()
                    assert box is not None, f"no {label!r} slider on the page"
                    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
                    page.mouse.move(x, y)
                    page.mouse.down()
                    page.mouse.move(x + dx, y, steps=8)
                    page.mouse.up()

                picture.scroll_into_view_if_needed()
                settle(None)
                moves = [
                    ("drag the 'query x' slider 40 px to the left", lambda: drag("query x", -40)),
                    (
                        "pick stage2.decoder.1.cross_attn in the site dropdown",
                        lambda: page.locator(".widget-dropdown select").select_option("stage2.decoder.1.cross_attn"),
                    ),
                    ("drag the 'object q' slider 40 px to the left", lambda: drag("object q", -40)),
                    (
                        "pick stage1.encoder.1.self_attn in the site dropdown",
                        lambda: page.locator(".widget-dropdown select").select_option("stage1.encoder.1.self_attn"),
                    ),
                    ("drag the 'head' slider 60 px to the right", lambda: drag("head", 60)),
                ]
                report["moves"] = []
                for step, (what, move) in enumerate(moves):
                    before = picture.screenshot()
                    page.screenshot(path=str(args.shots / f"step{step}_before.png"))
                    text_before, src = note.inner_text(), picture.get_attribute("src")
                    move()
                    settle(src)
                    after = picture.screenshot()
                    page.screenshot(path=str(args.shots / f"step{step}_after.png"))
                    in_map = changed_fraction(before, after, left=0.8)  # the A panel is the rightmost fifth
                    entry = {
                        "move": what,
                        "note_before": text_before,
                        "note_after": note.inner_text(),
                        "changed_pixels_whole_figure": round(changed_fraction(before, after), 4),
                        "changed_pixels_attention_panel": round(in_map, 4),
                    }
                    report["moves"].append(entry)
                    if step == args.doc_step:  # JupyterLab as the user sees it: a small palette PNG for the repository
                        page_shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
                        page_shot.quantize(colors=96).save(args.out, optimize=True)
                        report["screenshot"] = str(args.out)
                    if in_map < 0.01:
                        raise AssertionError(f"the attention map did not change after: {what}\n{json.dumps(entry)}")
                report["page_errors"] = errors
                report["widget_errors"] = page.locator("text=Error displaying widget").count()
            except Exception:
                page.screenshot(path=str(args.shots / "failure.png"))  # where it stopped
                raise
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(report, indent=1))
    if report["widget_errors"] or report["page_errors"]:
        raise SystemExit("errors on the page; see the report above")


if __name__ == "__main__":
    main()
