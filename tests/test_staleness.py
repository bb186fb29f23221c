"""What Dagster shows and automation does after each kind of change, tick by tick.

Each test materializes the whole chain, changes one thing, and then asserts three things
a user relies on: which assets Dagster calls unsynced (and why), which assets the
automation sensor requests, and how much real work (encodes, quantization, training)
running those requests costs.
"""

import json
import os
from pathlib import Path
from unittest import mock

import pytest
from dagster import AssetKey, DagsterInstance, evaluate_automation_conditions
from dagster_graphql.test.utils import define_out_of_process_workspace, execute_dagster_graphql
from diffusers import AutoencoderKL
from PIL import Image

import chroma_pipeline.quantize as quantize_module
import chroma_pipeline.text as text_module
import chroma_pipeline.training as train_module
from assets.automation import unsynced_or_missing
from assets.definitions import build_definitions, materialize_chain
from tests.conftest import write_config

REPO = Path(__file__).resolve().parents[1]
SCAN = {"raw_dataset/images", "raw_dataset/captions"}
pytestmark = pytest.mark.slow


STALENESS_QUERY = "{ assetNodes { assetKey { path } isMaterializable staleStatus staleCauses { category } } }"


def staleness_in_the_ui(instance: DagsterInstance, config_path: Path) -> dict[str, tuple[str, set[str]]]:
    """Asset -> (status, categories of its stale causes), as the Dagster UI gets them.

    Dagster has no public Python API for staleness (dagster-io/dagster#19368): the UI reads
    `staleStatus` and `staleCauses` from the webserver's GraphQL API. dagster-graphql's test
    utilities run that query in this process against our workspace.yaml's code location,
    loaded by a code server process as `dagster dev` loads it (with this project's config),
    over the project's instance, which must be stored on disk: the code server opens it too.
    The load costs about 2 s, the query milliseconds.
    """
    with mock.patch.dict(os.environ, {"CHROMA_CONFIG": str(config_path), "CHROMA_DEVICE": "cpu"}):
        with define_out_of_process_workspace(str(REPO / "workspace.yaml"), None, instance) as workspace:
            nodes = execute_dagster_graphql(workspace.create_request_context(), STALENESS_QUERY).data["assetNodes"]
    return {
        "/".join(node["assetKey"]["path"]): (node["staleStatus"], {cause["category"] for cause in node["staleCauses"]})
        for node in nodes
        if node["isMaterializable"]
    }


class Project:
    """A tiny-flavour project driven the way the Dagster daemon and UI drive it."""

    def __init__(self, config_path, monkeypatch):
        self.config_path = config_path
        (config_path.parent / "dagster_instance").mkdir()
        # Stored on disk, not in memory: `staleness_in_the_ui` needs that.
        self.instance = DagsterInstance.local_temp(str(config_path.parent / "dagster_instance"))
        self.cursor = None
        self.work = {"images": 0, "texts": 0, "quantize": 0, "train": 0}
        self._count(monkeypatch)

    def _count(self, monkeypatch):
        encode, prompts = AutoencoderKL.encode, text_module.encode_prompts
        quantize, train = quantize_module.quantize_to_folder, train_module.train_lora

        def images(vae, pixels, *args, **kwargs):
            self.work["images"] += pixels.shape[0]
            return encode(vae, pixels, *args, **kwargs)

        def texts(batch, *args, **kwargs):
            self.work["texts"] += len(batch)
            return prompts(batch, *args, **kwargs)

        def counted(name, fn):
            def wrapper(*args, **kwargs):
                self.work[name] += 1
                return fn(*args, **kwargs)
            return wrapper

        monkeypatch.setattr(AutoencoderKL, "encode", images)
        monkeypatch.setattr(text_module, "encode_prompts", texts)
        monkeypatch.setattr(quantize_module, "quantize_to_folder", counted("quantize", quantize))
        monkeypatch.setattr(train_module, "train_lora", counted("train", train))

    def definitions(self):
        # Built afresh each time, as reloading the code location does after a config edit.
        return build_definitions(str(self.config_path), device="cpu")

    def materialize(self, selection=None, must_succeed=True):
        result = materialize_chain(str(self.config_path), self.instance, selection=sorted(selection) if selection else None,
                                   device="cpu", raise_on_error=False)
        assert result.success or not must_succeed
        return result

    def scan(self):
        """The `dataset_scan` job (what the schedule launches): observe the folder, then scan it."""
        assert self.definitions().resolve_job_def("dataset_scan").execute_in_process(instance=self.instance).success

    def unsynced(self) -> dict[str, set[str]]:
        """Asset -> categories of why Dagster calls it stale (what the UI shows as "Unsynced")."""
        shown = staleness_in_the_ui(self.instance, self.config_path)
        # Our automation condition answers the same question from public records; it must agree
        # with Dagster on every asset, in every state these tests reach.
        graph = self.definitions().resolve_asset_graph()
        ours = {key.to_user_string() for key in graph.materializable_asset_keys
                if unsynced_or_missing(self.instance, graph, key)}
        assert ours == {name for name, (status, _) in shown.items() if status in ("STALE", "MISSING")}
        return {name: causes for name, (status, causes) in shown.items() if status == "STALE"}

    def tick(self) -> set[str]:
        """One evaluation of the automation sensor; returns the assets it requests."""
        result = evaluate_automation_conditions(defs=self.definitions(), instance=self.instance, cursor=self.cursor)
        self.cursor = result.cursor
        graph = self.definitions().resolve_asset_graph()
        return {key.to_user_string() for key in graph.materializable_asset_keys if result.get_num_requested(key)}

    def run_automation(self) -> set[str]:
        """Tick, run what was requested (as the sensor's run would), and tick again."""
        requested = self.tick()
        if requested:
            self.materialize(requested)
        assert self.tick() == set(), "a second tick after the run must request nothing"
        return requested

    def set(self, **settings):
        write_config(self.config_path, {**json.loads(self.config_path.read_text()), **settings})


def test_a_fresh_instance_builds_everything_once_the_dataset_is_scanned(small_project, monkeypatch):
    project = Project(small_project, monkeypatch)
    assert project.tick() == {"quantized_base_model"}  # nothing waits on a dataset; the rest does
    project.materialize({"quantized_base_model"})
    project.scan()
    assert project.run_automation() == {"image_latents", "text_embeddings", "lora_adapter", "validation_grid"}
    assert project.unsynced() == {}


def test_changes_made_before_the_sensor_first_runs_are_not_forgotten(small_project, monkeypatch):
    project = Project(small_project, monkeypatch)
    project.materialize()
    project.set(learning_rate=3e-4)
    sorted((small_project.parent / "dataset").glob("*.txt"))[0].write_text("edited while dagster dev was down")
    project.scan()
    project.work.update(images=0, texts=0, quantize=0, train=0)
    # The sensor's very first tick (no cursor yet) sees what the UI sees.
    assert project.run_automation() == {"text_embeddings", "lora_adapter", "validation_grid"}
    assert project.work == {"images": 0, "texts": 1, "quantize": 0, "train": 1}


def test_a_failed_run_is_retried_after_the_next_change_not_in_a_loop(project, monkeypatch):
    def broken_training(*args, **kwargs):
        raise FloatingPointError("loss became nan at step 3: lower learning_rate")

    monkeypatch.setattr(train_module, "train_lora", broken_training)
    project.set(learning_rate=0.5)
    assert project.tick() == {"lora_adapter", "validation_grid"}
    assert not project.materialize({"lora_adapter", "validation_grid"}, must_succeed=False).success
    assert project.unsynced() == {"lora_adapter": {"CODE"}}  # the UI still says so
    assert project.tick() == set()  # but the sensor does not relaunch a run that will fail again

    monkeypatch.undo()
    project._count(monkeypatch)
    project.set(learning_rate=2e-4)  # the fix
    assert project.run_automation() == {"lora_adapter", "validation_grid"}
    assert project.unsynced() == {}


@pytest.fixture
def project(small_project, monkeypatch):
    project = Project(small_project, monkeypatch)
    project.materialize()
    assert project.tick() == set()  # a fully materialized chain gives the sensor nothing to do
    project.work.update(images=0, texts=0, quantize=0, train=0)
    return project


def test_editing_one_caption_reruns_the_caption_branch_and_encodes_one_caption(project):
    caption = sorted((project.config_path.parent / "dataset").glob("*.txt"))[2]
    caption.write_text("a green square on a purple background, edited caption")
    project.scan()  # the dataset scan (the schedule or a person starts it)

    assert project.unsynced() == {"text_embeddings": {"DATA"}}
    assert project.run_automation() == {"text_embeddings", "lora_adapter", "validation_grid"}
    assert project.work == {"images": 0, "texts": 1, "quantize": 0, "train": 1}
    assert project.unsynced() == {}


def test_editing_one_image_reruns_the_image_branch_and_encodes_one_image(project):
    image = sorted((project.config_path.parent / "dataset").glob("*.png"))[4]
    Image.new("RGB", Image.open(image).size, "orange").save(image)
    project.scan()

    assert project.unsynced() == {"image_latents": {"DATA"}}
    assert project.run_automation() == {"image_latents", "lora_adapter", "validation_grid"}
    assert project.work == {"images": 1, "texts": 0, "quantize": 0, "train": 1}


def test_encoder_settings_reencode_every_caption_and_learning_rate_only_retrains(project):
    project.set(tokenizer_max_length=32)
    assert project.unsynced() == {"text_embeddings": {"CODE"}}
    assert project.run_automation() == {"text_embeddings", "lora_adapter", "validation_grid"}
    assert project.work == {"images": 0, "texts": 12, "quantize": 0, "train": 1}

    project.set(learning_rate=2e-4)
    assert project.unsynced() == {"lora_adapter": {"CODE"}}
    assert project.run_automation() == {"lora_adapter", "validation_grid"}
    assert project.work == {"images": 0, "texts": 12, "quantize": 0, "train": 2}


def test_a_new_crop_style_reencodes_every_image_and_no_caption(project):
    project.set(crop_style="corner")
    assert project.unsynced() == {"image_latents": {"CODE"}}
    assert project.run_automation() == {"image_latents", "lora_adapter", "validation_grid"}
    assert project.work == {"images": 9, "texts": 0, "quantize": 0, "train": 1}


def test_a_new_base_model_precision_requantizes_and_retrains_only(project):
    project.set(base_model_precision="int4-quanto")
    assert project.unsynced() == {"quantized_base_model": {"CODE"}}
    assert project.run_automation() == {"quantized_base_model", "lora_adapter", "validation_grid"}
    assert project.work == {"images": 0, "texts": 0, "quantize": 1, "train": 1}


def test_a_new_validation_prompt_rerenders_the_grid_without_retraining(project):
    project.set(validation_prompt=["a purple triangle on a white background"])
    assert project.unsynced() == {"text_embeddings": {"CODE"}, "validation_grid": {"CODE"}}
    assert project.run_automation() == {"text_embeddings", "lora_adapter", "validation_grid"}
    assert project.work == {"images": 0, "texts": 1, "quantize": 0, "train": 0}  # the adapter is reused


def test_renaming_files_costs_no_encoding_and_no_training(project):
    for path in sorted((project.config_path.parent / "dataset").iterdir()):
        path.rename(path.with_name("renamed-" + path.name))
    project.scan()
    # Which file holds which pixels and caption moved: both indexes are rewritten, nothing is encoded.
    assert project.unsynced() == {"image_latents": {"DATA"}, "text_embeddings": {"DATA"}}
    project.run_automation()
    assert project.work == {"images": 0, "texts": 0, "quantize": 0, "train": 0}


def test_swapping_two_images_between_captions_retrains(project):
    dataset = project.config_path.parent / "dataset"
    first, second = sorted(dataset.glob("*.png"))[:2]
    first.rename(dataset / "swap.tmp")
    second.rename(first)
    (dataset / "swap.tmp").rename(second)
    project.scan()
    assert project.unsynced() == {"image_latents": {"DATA"}}
    assert project.run_automation() == {"image_latents", "lora_adapter", "validation_grid"}
    assert project.work == {"images": 0, "texts": 0, "quantize": 0, "train": 1}  # new pairs, same pixels


def test_nothing_changed_means_nothing_unsynced_requested_or_recomputed(project):
    project.scan()  # a forced rescan: same content, same data versions
    assert project.unsynced() == {}
    assert project.tick() == set()
    project.materialize()  # even forcing the whole chain recomputes nothing
    assert project.work == {"images": 0, "texts": 0, "quantize": 0, "train": 0}
    assert project.unsynced() == {}
    assert project.tick() == set()


def test_the_automation_sensor_is_declared_and_running_by_default(small_project):
    defs = build_definitions(str(small_project))
    sensor = defs.get_sensor_def("chroma_automation")
    assert sensor.default_status.value == "RUNNING"
    assert AssetKey("lora_adapter") in sensor.asset_selection.resolve(defs.resolve_asset_graph())
