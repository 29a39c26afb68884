"""The whole workflow in a real browser: Debian's Chromium driven by Playwright against `python app.py`.

Sample dataset → doctor → template captions → CPU preset with a built-in tiny model → a few training
steps with sampling → reload mid-run → pause, a grid of the weights in memory → stop → a 2x2 checkpoint x
scale grid on the Test tab → a queue of two runs → hostile numbers. A screenshot of each step is kept in
$LORA_GUI_TEST_ARTIFACTS (default test-artifacts/e2e).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from app_server import CHROMIUM, CHROMIUM_ARGS, running_app

playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: install Debian's chromium"),
]

ROOT = Path(__file__).resolve().parent.parent
LONG = 240_000  # ms: training and sampling on two shared CPU cores


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("LORA_GUI_TEST_ARTIFACTS") or ROOT / "test-artifacts" / "e2e")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def field(page, label: str):
    """A form field by its label (Gradio puts the help text into the accessible name after the label)."""
    name = re.compile("^" + re.escape(label) + r"(\s|$)")
    return (page.get_by_role("textbox", name=name).or_(page.get_by_role("spinbutton", name=name))
            .or_(page.get_by_role("combobox", name=name)))


def choose(page, label: str, option: str | re.Pattern) -> None:
    field(page, label).click()
    page.get_by_role("option", name=option).click()


def type_into(page, label: str, text: str) -> None:
    """Replace a text field's content by typing, as a person does (Gradio's input event follows keystrokes)."""
    box = field(page, label).first
    box.fill("")
    box.press_sequentially(text, delay=20)


def set_number(page, label: str, value: int) -> None:
    box = field(page, label).first
    box.fill(str(value))
    box.press("Tab")


def test_sample_dataset_to_comparison_grid_in_a_browser(tmp_path):
    expect = playwright.expect
    shots = artifacts_dir()
    # scripts/update_screenshots.py names a workspace whose path reads well in the page's header
    workspace = Path(os.environ.get("LORA_GUI_E2E_WORKSPACE") or tmp_path / "workspace")
    log = tmp_path / "app.log"
    with running_app(workspace, log) as url, playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        try:
            run_workflow(page, expect, url, workspace, shots)
        except Exception:
            page.screenshot(path=shots / "failure.png", full_page=True)
            print(log.read_text()[-6000:])
            raise
        finally:
            browser.close()


def run_workflow(page, expect, url: str, workspace: Path, shots: Path) -> None:
    page.goto(url)

    # 1. Dataset: the built-in sample, checked by the doctor.
    page.get_by_role("button", name="Create sample dataset").click()
    expect(page.get_by_text("Ready to train: 12 of 12 images will be used.")).to_be_visible(timeout=60_000)
    expect(field(page, "Dataset folder").first).to_have_value("datasets/sample")
    page.get_by_role("button", name="Check dataset").click()  # the doctor again, as a user would
    expect(page.get_by_text("Checked datasets/sample: 12 image(s).", exact=True)).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Ready to train: 12 of 12 images will be used.")).to_be_visible()
    screenshot(page, shots / "01-dataset.png")

    # 2. Captions: the template captioner over every image.
    page.get_by_role("tab", name="Captions").click()
    choose(page, "Captioner", re.compile("^Template"))
    field(page, "Template").fill("{trigger}, {filename}")
    field(page, "Trigger word").fill("sks")
    page.get_by_label("Overwrite every caption").check()
    page.get_by_role("button", name="Caption dataset").click()
    expect(page.get_by_text(re.compile(r"Wrote 12 caption\(s\) for 12 image"))).to_be_visible(timeout=60_000)
    screenshot(page, shots / "02-captions.png")
    caption = (workspace / "datasets" / "sample" / "shape-01.txt").read_text(encoding="utf-8")
    assert caption.startswith("sks, shape") and caption.count("sks") == 1
    page.get_by_role("tab", name="Dataset").click()  # reopening the tab shows the new captions
    expect(page.get_by_text(f"shape-01.png: {caption}").first).to_be_attached(timeout=30_000)

    # 3. Config: the CPU demo preset (built-in tiny SD1.5), a short run with sampling on.
    page.get_by_role("tab", name="Config").click()
    page.get_by_label("CPU demo").check()
    page.get_by_role("button", name="Apply preset").click()
    expect(page.get_by_text(re.compile("matches preset sd15-cpu-demo"))).to_be_visible(timeout=30_000)
    expect(field(page, "Base model")).to_have_value("builtin:tiny-sd15")
    expect(field(page, "Dataset folder")).to_have_value("datasets/sample")
    set_number(page, "Max steps", 400)
    set_number(page, "Save every N steps", 4)
    set_number(page, "Sample every N steps", 4)
    field(page, "Name").fill("")
    field(page, "Name").press_sequentially("portrait-style", delay=70)  # typed at human speed
    expect(field(page, "Output folder")).to_have_value("outputs/portrait-style", timeout=30_000)
    set_number(page, "Learning rate", -0.001)  # refused on the server, naming the field
    expect(page.get_by_text(re.compile(r"train\.learning_rate.*greater than 0"))).to_be_visible(timeout=30_000)
    screenshot(page, shots / "03a-hostile-value.png")
    set_number(page, "Learning rate", 0.0001)
    type_into(page, "Name", "e2e-lora")
    expect(field(page, "Output folder")).to_have_value("outputs/e2e-lora", timeout=30_000)
    type_into(page, "Output folder", "outputs/e2e")
    field(page, "Output folder").press("Tab")
    expect(page.get_by_text("Config is valid")).to_be_visible(timeout=30_000)
    cli = page.locator(".cm-content").last  # the equivalent CLI command, made from what the server got
    expect(cli).to_contain_text(re.compile(r'output\.dir="\S*/outputs/e2e"'), timeout=30_000)
    screenshot(page, shots / "03-config.png")

    # 4. Train: start, watch the loss plot and validation images appear, stop.
    page.get_by_role("tab", name="Train").click()
    page.get_by_role("button", name="Start", exact=True).click()
    gallery_images = page.locator("#lg-validation-gallery img")
    expect(gallery_images.first).to_be_visible(timeout=LONG)
    loss_lines = page.locator("#lg-loss-plot .mark-line path")  # an empty plot has an svg but no lines
    expect(loss_lines).to_have_count(2, timeout=LONG)  # raw and smoothed
    # two or more points (the plots refresh at most every run_view.PLOT_REFRESH_S while training)
    expect(loss_lines.first).to_have_attribute("d", re.compile(r"^M[\d.,-]+L"), timeout=LONG)
    checkpoints = workspace / "outputs" / "e2e" / "checkpoints"
    wait_for_files(page, checkpoints, "step-0000*/COMPLETE", 2)
    page.reload()  # the form and the run come back
    page.get_by_role("tab", name="Config").click()
    expect(field(page, "Max steps")).to_have_value("400", timeout=30_000)
    expect(field(page, "Name")).to_have_value("e2e-lora")
    expect(field(page, "Output folder")).to_have_value("outputs/e2e")
    expect(field(page, "Dataset folder").first).to_have_value("datasets/sample")
    page.get_by_role("tab", name="Train").click()
    expect(page.get_by_text(re.compile(r"Running · step \d+ / 400"))).to_be_visible(timeout=30_000)
    screenshot(page, shots / "04a-reloaded-mid-run.png")
    second = page.context.new_page()  # the run belongs to the app: another browser tab shows it live
    second.goto(url)
    second.get_by_role("tab", name="Train").click()
    expect(second.get_by_text(re.compile(r"Running · step \d+ / 400"))).to_be_visible(timeout=30_000)
    expect(second.get_by_role("button", name="Start", exact=True)).to_be_disabled()
    second.close()
    paused_run_grid(page, expect, shots)
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(page.get_by_text(re.compile(r"\bstopped\b", re.I)).first).to_be_visible(timeout=LONG)
    screenshot(page, shots / "04-train.png")
    page.get_by_text("Resume from a checkpoint").click()  # the stopped run and its checkpoints are offered
    expect(page.locator("#lg-resume-run input")).to_have_value(re.compile(r"^outputs/e2e · stopped at step \d+$"),
                                                               timeout=30_000)
    expect(page.locator("#lg-resume-checkpoint input")).to_have_value(re.compile(r"^step \d+$"))
    screenshot(page, shots / "04b-resume-picker.png")
    metrics = (workspace / "outputs" / "e2e" / "metrics.csv").read_text().splitlines()
    assert metrics[0] == "step,epoch,loss,lr,sec_per_step,samples" and len(metrics) >= 5

    # 5. Test: two checkpoints x two scales, same prompt and seed, saved as one PNG.
    page.get_by_role("tab", name="Test").click()
    page.get_by_role("button", name="Refresh", exact=True).last.click()
    lora_boxes = page.get_by_role("checkbox", name=re.compile(r"^(no LoRA|step \d+|final LoRA)$"))
    checkpoints_boxes = page.get_by_role("checkbox", name=re.compile(r"^step \d+$"))
    expect(checkpoints_boxes.nth(1)).to_be_visible(timeout=30_000)
    for index in range(lora_boxes.count()):
        lora_boxes.nth(index).uncheck()
    checkpoints_boxes.nth(0).check()
    checkpoints_boxes.nth(1).check()
    field(page, "LoRA scales (columns)").fill("0, 1")
    page.get_by_role("button", name="Render").click()
    expect(page.get_by_text(re.compile(r"Rendered 2 × 2"))).to_be_visible(timeout=LONG)
    screenshot(page, shots / "05-test.png")
    grids = sorted((workspace / "outputs" / "e2e" / "comparisons").glob("compare-*.png"))
    assert grids, "the comparison grid was not saved"
    from PIL import Image

    with Image.open(grids[-1]) as grid:
        width, height = grid.size
    assert width == 96 + 2 * 64 and height == 28 + 2 * 64  # label margins + 2 columns x 2 rows of 64 px

    # 6. A queue of two runs (a third is queued, moved and removed), still there after a reload.
    queue_two_runs(page, expect, workspace, shots)

    # 7. Hostile values in every number field of the Config tab: each is named with its range.
    hostile_numbers(page, expect, shots)


def paused_run_grid(page, expect, shots: Path) -> None:
    """Pause; the Test tab renders the paused run's weights in memory at two scales; Continue."""
    page.get_by_role("button", name="Pause", exact=True).click()
    expect(page.get_by_text(re.compile(r"Paused · step \d+ / 400"))).to_be_visible(timeout=LONG)
    page.get_by_role("tab", name="Test").click()
    page.get_by_role("button", name="Refresh", exact=True).last.click()
    current = page.get_by_role("checkbox", name=re.compile(r"^current weights \(step \d+\)$"))
    expect(current).to_be_visible(timeout=30_000)
    rows = page.get_by_role("checkbox", name=re.compile(r"^(no LoRA|step \d+|final LoRA|current weights .*)$"))
    for index in range(rows.count()):
        rows.nth(index).uncheck()
    current.check()
    field(page, "LoRA scales (columns)").fill("0, 1")
    page.get_by_role("button", name="Render").click()
    expect(page.get_by_text(re.compile(r"Rendered 1 × 2"))).to_be_visible(timeout=LONG)
    screenshot(page, shots / "04c-paused-current-weights.png")
    page.get_by_role("tab", name="Train").click()
    page.get_by_role("button", name="Continue", exact=True).click()
    expect(page.get_by_text(re.compile(r"Running · step \d+ / 400"))).to_be_visible(timeout=30_000)


def queue_run(page, expect, name: str) -> None:
    page.get_by_role("tab", name="Config").click()
    type_into(page, "Name", name)
    type_into(page, "Output folder", f"outputs/{name}")
    field(page, "Output folder").press("Tab")
    expect(page.get_by_text("Config is valid")).to_be_visible(timeout=30_000)
    page.get_by_role("tab", name="Train").click()
    page.get_by_role("button", name="Add to queue").click()
    expect(page.locator("#lg-queue-table")).to_contain_text(name, timeout=30_000)


def queue_two_runs(page, expect, workspace: Path, shots: Path) -> None:
    page.get_by_role("tab", name="Config").click()
    set_number(page, "Max steps", 4)
    set_number(page, "Save every N steps", 0)
    set_number(page, "Sample every N steps", 0)
    page.get_by_role("tab", name="Train").click()
    page.get_by_text("Queue: line runs up").click()
    page.get_by_role("button", name="Hold queue").click()  # line them up and order them before they start
    expect(page.locator("#lg-queue-status")).to_contain_text("Held", timeout=30_000)
    for name in ("queued-a", "queued-b", "queued-c"):
        queue_run(page, expect, name)
    table = page.locator("#lg-queue-table")
    choose(page, "Queued run", re.compile(r"^#3 queued-c"))
    page.get_by_role("button", name="Move up").click()
    expect(page.locator("#lg-queue-message")).to_contain_text("Moved up.", timeout=30_000)
    choose(page, "Queued run", re.compile(r"^#3 queued-b"))
    page.get_by_role("button", name="Remove").click()
    expect(page.locator("#lg-queue-message")).to_contain_text("Removed from the queue", timeout=30_000)
    screenshot(page, shots / "07a-queue-lined-up.png")
    page.get_by_role("button", name="Start queue").click()
    both_finished = re.compile(r"queued-a[^\n]*finished at step 4[\s\S]*queued-c[^\n]*finished at step 4")
    expect(table).to_contain_text(both_finished, timeout=LONG)
    shown = table.inner_text()
    assert shown.index("queued-a") < shown.index("queued-c") and "queued-b" not in shown
    for name in ("queued-a", "queued-c"):
        assert (workspace / "outputs" / name / f"{name}.safetensors").is_file()
    assert not (workspace / "outputs" / "queued-b").exists()
    page.reload()  # the queue is the app's: a reload shows it
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#lg-queue-table")).to_contain_text(both_finished, timeout=30_000)
    screenshot(page, shots / "07-queue-finished.png")


def hostile_numbers(page, expect, shots: Path) -> None:
    from lora_gui.ui.forms import field_specs

    page.get_by_role("tab", name="Config").click()
    for accordion in page.get_by_text(re.compile(r"^Advanced .+ settings$")).all():
        accordion.click()
    numbers = [spec for spec in field_specs() if spec.kind == "number"]
    for label in dict.fromkeys(spec.label for spec in numbers):  # "Seed" names two fields
        for box in field(page, label).all():
            box.fill("-999999")
            box.press("Tab")
    problems = page.get_by_text("fix these before training").locator("..")
    for spec in numbers:
        if spec.minimum is not None and spec.minimum > -999999:
            expect(problems).to_contain_text(f"{spec.key}:", timeout=30_000)
    screenshot(page, shots / "06-hostile-numbers.png")


def screenshot(page, path: Path) -> None:
    """A full-page screenshot once Gradio shows no pending outputs (faded while an event runs)."""
    try:
        page.wait_for_function("() => ![...document.querySelectorAll('[data-testid=status-tracker]')]"
                               ".some(e => !e.classList.contains('hide'))", timeout=10_000)
    except playwright.TimeoutError:  # still busy after 10 s: take it anyway, the assertions decide
        pass
    page.screenshot(path=path, full_page=True)


def wait_for_files(page, folder: Path, pattern: str, count: int, timeout_s: float = LONG / 1000) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if folder.is_dir() and len(list(folder.glob(pattern))) >= count:
            return
        page.wait_for_timeout(500)
    raise AssertionError(f"fewer than {count} {pattern} in {folder} after {timeout_s:.0f} s")
