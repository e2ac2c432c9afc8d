"""The web demo in a real browser: `python infer/demo.py --model tiny` on a free local port, driven by headless
Chromium through Playwright.

The browser is Debian's `chromium` package (/usr/bin/chromium; README: `apt-get install -y chromium`), started by
Playwright's Python API with `executable_path`, so nothing is downloaded at test time (never `playwright
install`). The test uploads a photo, presses Generate and waits for the image in the results gallery (then fetches
it over HTTP as the browser does and reads the settings in the PNG); uploads a photo without a face and a 50 MB
file, each giving its message in the page; and makes a second good request, whose image joins the gallery while
the server process is still the same one; and draws a stroke on the box canvas, which fills the box field.
Screenshots of the good and the error states go to a folder under
tmp_path, printed at the end (`pytest -s` shows it).

Cost: one compile of the tiny generator (2 steps, 32x32; the server shares the test session's JAX compilation
cache, so a run after tests/test_demo.py, whose first request has the same settings, reads it from disk).
"""

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the demo server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the demo server did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import skimage.data

    folder = tmp_path_factory.mktemp("browser_photos")
    Image.fromarray(skimage.data.astronaut()[::2, ::2].copy()).save(folder / "astronaut.png")
    Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(folder / "wall.png")
    big = folder / "huge.jpg"  # a 50 MB upload (a real JPEG, then padding)
    Image.fromarray(skimage.data.astronaut()[::4, ::4].copy()).save(big)
    os.truncate(big, 50 * 2**20)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo as a user starts it, in its own process; yields (url, process, output folder)."""
    port = _free_port()
    out = tmp_path_factory.mktemp("browser_out")
    log = out.parent / "demo_server.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    if jax.config.jax_compilation_cache_dir:  # the test session's persistent compilation cache (conftest.py)
        env["FUSION_JAX_COMPILATION_CACHE"] = str(jax.config.jax_compilation_cache_dir)
    command = [sys.executable, str(ROOT / "infer" / "demo.py"), "--model", "tiny", "--face-detector", "opencv",
               "--steps", str(STEPS), "--max-upload-mb", "20", "--port", str(port), "--out", str(out)]
    with open(log, "w") as log_file:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_serving(url, proc, log)
        yield url, proc, out
    finally:
        proc.terminate()  # only the process this fixture started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _png_settings(src: str) -> dict:
    with urllib.request.urlopen(src, timeout=30) as response:
        data = response.read()
    with Image.open(io.BytesIO(data)) as im:
        return json.loads(im.text["fusion_jax"])


def test_upload_generate_and_bad_uploads_in_chromium(server, photos, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's browser with `apt-get install -y chromium` (README)")
    url, proc, out = server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#generate", timeout=60_000)
            expect(page.locator("#header")).to_contain_text("tiny random pipeline")
            status, results, crops = page.locator("#status"), page.locator("#results img"), page.locator("#crops img")
            upload = "#photos1 input[type=file]"

            # 1. a good photo: the aligned crop appears on upload, the image in the gallery after Generate
            page.set_input_files(upload, [str(photos / "astronaut.png")])
            expect(status).to_contain_text("Faces found", timeout=60_000)
            expect(crops).to_have_count(1)
            page.click("#generate")
            expect(results).to_have_count(1, timeout=240_000)
            expect(status).to_contain_text("Generated")
            settings = _png_settings(results.first.get_attribute("src"))  # the file the page serves
            assert settings["prompt"] == "a photo of a person" and settings["steps"] == STEPS
            assert settings["seed"] == 0 and [r["path"] for r in settings["references"]] == ["astronaut.png"]
            page.screenshot(path=str(shots / "1_generated.png"), full_page=True)

            # 2. bad uploads: a photo without a face, then a 50 MB file; each gives its message in the page
            page.locator("#photos1 button[aria-label='Clear']").click()
            page.set_input_files(upload, [str(photos / "wall.png")])
            expect(status).to_contain_text("person 1, photo 'wall.png': no face found", timeout=60_000)
            page.click("#generate")  # Generate with the bad photo: the same message, no new image
            expect(status).to_contain_text("Error: person 1, photo 'wall.png': no face found", timeout=60_000)
            page.locator("#photos1 button[aria-label='Clear']").click()
            page.set_input_files(upload, [str(photos / "huge.jpg")])
            expect(status).to_contain_text("photo 'huge.jpg': 50.0 MB is over the 20 MB limit", timeout=90_000)
            expect(results).to_have_count(1)
            page.screenshot(path=str(shots / "2_bad_upload.png"), full_page=True)

            # 3. a second good request (another seed) still works, in the same server process
            page.locator("#photos1 button[aria-label='Clear']").click()
            page.set_input_files(upload, [str(photos / "astronaut.png")])
            expect(status).to_contain_text("Faces found", timeout=60_000)
            page.locator("#seed input").fill("1")
            page.click("#generate")
            expect(results).to_have_count(2, timeout=120_000)
            assert _png_settings(results.first.get_attribute("src"))["seed"] == 1  # newest first
            page.screenshot(path=str(shots / "3_second_request.png"), full_page=True)

            # 4. a box drawn on person 1's canvas fills the box field: a stroke through the canvas centre
            page.get_by_text("Draw the box instead").first.click()
            canvas = page.locator("#draw1 canvas").first
            canvas.wait_for(timeout=30_000)
            page.wait_for_timeout(500)  # the canvas lays out the background image
            frame = canvas.bounding_box()
            cx, cy = frame["x"] + frame["width"] / 2, frame["y"] + frame["height"] / 2
            page.mouse.move(cx - 30, cy - 30)
            page.mouse.down()
            for f in range(1, 11):
                page.mouse.move(cx - 30 + 5.4 * f, cy - 30 + 4.5 * f)
            page.mouse.up()
            box_field = page.locator("#box1 textarea")
            expect(box_field).not_to_have_value("", timeout=30_000)
            x0, y0, x1, y1 = (float(v) for v in box_field.input_value().split(","))
            assert 0 <= x0 < 0.5 < x1 <= 1 and 0 <= y0 < 0.5 < y1 <= 1 and x1 - x0 < 0.9, (x0, y0, x1, y1)
            page.screenshot(path=str(shots / "4_drawn_box.png"), full_page=True)
        finally:
            browser.close()
    assert proc.poll() is None, "the demo server died"
    assert sorted(p.name for p in out.glob("*.png")) == ["00000_seed0.png", "00001_seed1.png"]
    print(f"\nscreenshots: {shots}")
