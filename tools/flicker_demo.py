"""The page's flicker readout with the feature bank on and off, on the built-in model.

Runs the app in this process (built-in model, latency mode) and headless
Debian chromium, draws the same strokes once per bank setting, rounds taking
turns, and prints the flicker figure the page computes (ui/static/render.js:
mean absolute change of the render, 0-255, where the drawing did not change)
over each setting's render pairs:

    python -m tools.flicker_demo                 # 128², DyMe against no bank, 3 rounds
    python -m tools.flicker_demo --size 256 --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import time

from playwright.sync_api import sync_playwright

from sv2v_core import StreamV2V, load_components
from ui.presets import load_presets
from ui.server import create_service, free_port, serve

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
BANKS = {"dyme": "dyme", "none": "none"}



def draw(page, row: int, moves: int) -> None:
    """One stroke across the canvas at height `row` (of 512), with the button held for `moves` moves."""
    canvas = page.locator("canvas.sv2v-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    scale = box["width"] / 512
    page.mouse.move(box["x"] + 40 * scale, box["y"] + row * scale)
    page.mouse.down()
    for step in range(1, moves + 1):
        page.mouse.move(box["x"] + (40 + 430 * step / moves) * scale, box["y"] + (row + 6 * (step % 3)) * scale)
        time.sleep(0.15)
    page.mouse.up()


def settle(page, timeout: float = 60) -> None:
    """Wait until the stroke's last snapshot has been rendered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = int(page.locator("canvas.sv2v-canvas").get_attribute("data-seq") or 0)
        if page.evaluate("() => window.sv2vStats.shownSeq") >= last:
            return
        time.sleep(0.2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--moves", type=int, default=10)
    args = parser.parse_args(argv)

    engine = StreamV2V(load_components("tiny"))
    service = create_service(engine, size=args.size)
    running = serve(service, load_presets(), port=free_port(), block=False)
    values: dict[str, list[float]] = {name: [] for name in BANKS}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(running.url)
            page.wait_for_selector("#sv2v-canvas [data-ready='1']", timeout=60_000)
            page.get_by_role("button", name="Demo picture").click()  # a detailed picture the strokes cross
            time.sleep(3)
            settle(page)
            page.get_by_text("Advanced", exact=False).first.click()  # the bank's controls are under Advanced
            for round_ in range(args.rounds):
                for name, mode in BANKS.items():
                    page.get_by_label(mode, exact=True).check()
                    time.sleep(1.5)  # the settings re-render (left out of the flicker)
                    settle(page)
                    before = page.evaluate("() => window.sv2vStats.flicker.length")
                    draw(page, 120 + 90 * round_, args.moves)
                    settle(page)
                    pairs = page.evaluate(f"() => window.sv2vStats.flicker.slice({before})")
                    values[name] += pairs
                    print(f"round {round_ + 1} bank {name}: {len(pairs)} pairs, mean flicker "
                          f"{statistics.fmean(pairs) if pairs else float('nan'):.2f}", flush=True)
            browser.close()
    finally:
        running.close()
        service.close()
        engine.close()
    for name, pairs in values.items():
        if pairs:
            print(f"bank {name}: {len(pairs)} render pairs, flicker mean {statistics.fmean(pairs):.2f}, "
                  f"median {statistics.median(pairs):.2f}")


if __name__ == "__main__":
    main()
