"""The 2026 families trained through the GUI in a real browser: the family picker, the CPU demo preset and
Start, for Flux.2 dev and Qwen-Image (the families whose pipelines differ most from the others: a
processor-shaped tokenizer folder, true CFG). A screenshot of each finished run is kept in
$LORA_GUI_TEST_ARTIFACTS (default test-artifacts/e2e)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from app_server import CHROMIUM, CHROMIUM_ARGS, running_app
from test_e2e_browser import LONG, artifacts_dir, choose, field, screenshot, set_number

playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: install Debian's chromium"),
]
FAMILIES = {"qwen-image": "builtin:tiny-qwen-image", "flux2-dev": "builtin:tiny-flux2-dev"}


def test_new_families_train_from_the_family_picker_and_preset(tmp_path):
    expect = playwright.expect
    workspace, log = tmp_path / "workspace", tmp_path / "app.log"
    with running_app(workspace, log) as url, playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        try:
            page.goto(url)
            page.get_by_role("button", name="Create sample dataset").click()
            expect(page.get_by_text("Ready to train: 12 of 12 images will be used.")).to_be_visible(timeout=60_000)
            for family, base in FAMILIES.items():
                train_in_the_browser(page, expect, family, base)
                lora = workspace / "outputs" / family / f"{family}.safetensors"
                assert lora.is_file() and (workspace / "outputs" / family / "samples" / "step-000003").is_dir()
        except Exception:
            page.screenshot(path=artifacts_dir() / "families-failure.png", full_page=True)
            print(log.read_text()[-6000:])
            raise
        finally:
            browser.close()


def train_in_the_browser(page, expect, family: str, base: str) -> None:
    page.get_by_role("tab", name="Config").click()
    choose(page, "Family", re.compile(f"^{re.escape(family)}$"))
    page.get_by_label("CPU demo").check()
    page.get_by_role("button", name="Apply preset").click()
    expect(page.get_by_text(re.compile(f"matches preset {re.escape(family)}-cpu-demo"))).to_be_visible(timeout=30_000)
    expect(field(page, "Base model")).to_have_value(base)
    set_number(page, "Max steps", 3)
    set_number(page, "Sample every N steps", 3)
    field(page, "Name").fill(family)
    field(page, "Output folder").fill(f"outputs/{family}")
    field(page, "Name").press("Tab")
    expect(page.get_by_text("Config is valid")).to_be_visible(timeout=30_000)
    page.get_by_role("tab", name="Train").click()
    page.get_by_role("button", name="Start", exact=True).click()
    saved = re.compile(rf"LoRA saved: .*outputs/{re.escape(family)}/{re.escape(family)}\.safetensors")
    expect(page.get_by_text(saved)).to_be_visible(timeout=LONG)  # this run's, not the previous family's
    expect(page.get_by_text(re.compile(r"^Finished · step 3 / 3"))).to_be_visible()
    expect(page.locator("#lg-validation-gallery img").first).to_be_visible(timeout=30_000)
    screenshot(page, artifacts_dir() / f"family-{family}.png")
