"""The Dagster UI as a user meets it: `dagster dev`, headless Chromium, the whole chain from one click.

Needs Debian's `chromium` (apt-get install chromium) and the `playwright` package; Playwright
drives the system browser, so nothing is downloaded. Without a browser the test is skipped
with that reason, except in CI, where it must run. Screenshots land in
`test-artifacts/ui/` (or $CHROMA_TEST_ARTIFACTS); the README shows two of them.
"""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.dagster_dev import serve as dagster_dev_server

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("CHROMA_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ui"
# Eight nodes: the observed folder, the scan's two assets and the five steps after it.
NODES = ["dataset_folder", "images", "captions", "image_latents", "text_embeddings", "quantized_base_model",
         "lora_adapter", "validation_grid"]
EDGE_COUNT = 10  # folder->images, folder->captions, images->latents, captions->embeddings, 3 into the adapter, 3 into the grid

pytestmark = pytest.mark.slow


def _browser_available() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not Path(CHROMIUM).exists():
        return "no chromium (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_available()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # The flags keep Chromium from phoning home, which a closed network answers with errors.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run",
        ])
        yield browser
        browser.close()


def _dagster_home(tmp_path: Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    # One run at a time, as on a one-GPU machine: the automation sensor may start a run too.
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nrun_queue:\n  max_concurrent_runs: 1\n")
    return home


def serve(home: Path, config: Path, log_path: Path):
    """`dagster dev` (tests/dagster_dev.py), its log kept beside the screenshots."""
    return dagster_dev_server(home, config, log_path, keep_log_in=ARTIFACTS)


@pytest.fixture
def dagster_dev(small_project, tmp_path):
    with serve(_dagster_home(tmp_path), small_project, tmp_path / "dagster-dev.log") as server:
        yield server.url


def _dismiss_welcome(page):
    page.wait_for_timeout(1500)  # the community dialog opens a moment after the first page
    skip = page.get_by_role("button", name="Skip")
    if skip.count():
        skip.click()


def _shown_as(name: str, label: str) -> bool:
    """The graph middle-truncates long names: quantized_base_model is drawn as quantized_b…_model."""
    if "…" not in label:
        return label == name
    head, tail = label.split("…")
    return name.startswith(head) and name.endswith(tail)


def test_materialize_the_chain_from_the_ui_and_see_the_grid(browser, dagster_dev):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})

    # The asset graph: every asset, every edge.
    page.goto(f"{dagster_dev}/asset-groups", timeout=120_000)
    page.wait_for_selector("[class*=AssetNode_assetName]", timeout=180_000)
    _dismiss_welcome(page)
    labels = page.locator("[class*=AssetNode_assetName]").all_inner_texts()
    for name in NODES:
        assert any(_shown_as(name, label.strip()) for label in labels), f"{name} not in the graph: {labels}"
    assert len(labels) == len(NODES)
    assert page.locator("svg path[stroke='var(--color-lineage-edge)']").count() == EDGE_COUNT
    page.screenshot(path=ARTIFACTS / "asset-graph.png")

    # One click materializes the whole chain; the run page says when it is done.
    page.locator("button", has_text="Materialize all").click()
    toast = page.get_by_text(re.compile(r"Launched run"))
    toast.wait_for(timeout=60_000)
    page.get_by_text("View", exact=True).first.click()
    page.wait_for_url(re.compile(r"/runs/"), timeout=60_000)
    outcome = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
    outcome.wait_for(timeout=900_000)
    page.screenshot(path=ARTIFACTS / "run.png")
    assert outcome.inner_text() == "Success", f"the run ended with {outcome.inner_text()}; see {ARTIFACTS}/run.png"

    # The grid asset: its checks passed and the grid image is shown.
    page.goto(f"{dagster_dev}/assets/validation_grid", timeout=60_000)
    page.locator("td", has_text="grid path").first.wait_for(timeout=60_000)
    page.screenshot(path=ARTIFACTS / "validation-grid-asset.png")
    page.locator("tr").filter(has=page.get_by_text("grid", exact=True)).get_by_text("[Show Markdown]").click()
    grid = page.locator("img[alt='validation grid']").first
    grid.wait_for(timeout=30_000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=grid.element_handle(), timeout=30_000)
    width, height = grid.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert width >= 256 and height >= 256
    page.screenshot(path=ARTIFACTS / "validation-grid.png")


def test_a_failed_blocking_check_is_shown_with_its_reason_and_training_did_not_run(browser, small_project, tmp_path,
                                                                                   monkeypatch):
    from dagster import DagsterInstance
    from diffusers import AutoencoderKL

    from assets.definitions import materialize_chain

    # A run whose VAE returns NaN (as an fp16 overflow does), recorded in the instance the UI will show.
    encode = AutoencoderKL.encode

    def nan_latents(vae, pixels, *args, **kwargs):
        output = encode(vae, pixels, *args, **kwargs)
        output.latent_dist.mean = torch.full_like(output.latent_dist.mean, float("nan"))
        return output

    monkeypatch.setattr(AutoencoderKL, "encode", nan_latents)
    home = _dagster_home(tmp_path)
    with DagsterInstance.from_config(str(home)) as instance:
        result = materialize_chain(str(small_project), instance, device="cpu", raise_on_error=False)
    assert not result.success

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with serve(home, small_project, tmp_path / "dagster-dev-failed-check.log") as server:
        url = server.url
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{url}/assets/image_latents?view=checks", timeout=120_000)
        _dismiss_welcome(page)
        page.get_by_text("latents_complete_and_finite").first.wait_for(timeout=120_000)
        page.get_by_text(re.compile("9 usable images have no usable latent")).first.wait_for(timeout=60_000)
        page.screenshot(path=ARTIFACTS / "failed-check.png")

        # The run: the check failed, and training never started.
        page.goto(f"{url}/runs/{result.run_id}", timeout=60_000)
        page.get_by_text(
            "Dependencies for step lora_adapter failed: ['image_latents_latents_complete_and_finite']. Not executing."
        ).wait_for(timeout=60_000)
        page.screenshot(path=ARTIFACTS / "failed-check-run.png")
