"""The folder watcher, the nightly retrain schedule and the blocking checks, tick by tick.

These drive the sensor and schedule definitions the code location declares, with the
daemon's part (storing a sensor's events, launching a schedule's run) done by the test.
"""

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from dagster import AssetKey, DefaultScheduleStatus, build_schedule_context, build_sensor_context
from diffusers import AutoencoderKL

from tests.conftest import write_config
from tests.test_staleness import SCAN, Project

pytestmark = pytest.mark.slow


class WatchedProject(Project):
    def watch(self):
        """One tick of `dataset_watch`; stores what it reports, as the daemon would."""
        definitions = self.definitions()
        sensor = definitions.get_sensor_def("dataset_watch")
        with build_sensor_context(instance=self.instance, resources=definitions.resources) as context:
            data = sensor.evaluate_tick(context)
        for event in data.asset_events:
            self.instance.report_runless_asset_event(event)
        assert not data.run_requests, "the watcher records; it never starts a run"
        self.said = data.skip_message  # what the sensor's tick history shows
        return data.asset_events

    def night(self, when: datetime):
        """The schedule's tick at `when`; runs its request, then lets the automation sensor carry it."""
        definitions = self.definitions()
        schedule = definitions.get_schedule_def("nightly_retrain")
        with build_schedule_context(
            instance=self.instance, resources=definitions.resources, scheduled_execution_time=when
        ) as context:
            data = schedule.evaluate_tick(context)
        if not data.run_requests:
            return data.skip_message, set()
        assert len(data.run_requests) == 1 and schedule.job_name == "dataset_scan"
        self.scan()  # the schedule's run: observe the folder, scan it
        return None, self.run_automation()


@pytest.fixture
def project(small_project, monkeypatch):
    project = WatchedProject(small_project, monkeypatch)  # on a stored instance, as schedules need
    project.materialize()
    project.run_automation()
    project.work.update(images=0, texts=0, quantize=0, train=0)
    return project


def first_caption(config_path: Path) -> Path:
    return sorted((config_path.parent / "dataset").glob("*.txt"))[0]


def test_the_watcher_records_a_content_change_and_starts_nothing(project):
    assert project.watch() == []  # the run observed the folder before it scanned it
    caption = first_caption(project.config_path)
    caption.touch()  # a new mtime, the same bytes: not a change
    assert project.watch() == []

    assert project.said == "dataset folder unchanged"
    caption.write_text("a caption edited in the morning")
    (event,) = project.watch()
    assert event.asset_key == AssetKey("dataset_folder")
    assert event.metadata["changes since last observation"].value == f"1 modified ({caption.name})"
    assert project.said.startswith(f"dataset folder changed: 1 modified ({caption.name}); recorded on dataset_folder")
    # The UI now shows the scan as unsynced, and nothing else: the rest waits for a scan.
    assert set(project.unsynced()) == SCAN
    assert project.tick() == set()
    assert project.watch() == [], "a change is recorded once"
    assert project.work == {"images": 0, "texts": 0, "quantize": 0, "train": 0}


def test_a_scan_on_its_own_says_the_folder_changed_and_the_watcher_records_it(project):
    first_caption(project.config_path).write_text("a caption edited, then only the scan materialized")
    result = project.materialize(SCAN)  # "Materialize" on raw_dataset: no observation in that run
    logged = [entry.user_message for entry in project.instance.all_logs(result.run_id)]
    assert any("changed since its latest observation" in message and "dataset_scan" in message for message in logged)
    assert project.unsynced() == {"text_embeddings": {"DATA"}}  # the scan read the edit

    (event,) = project.watch()  # the watcher's next tick records the folder as it is
    assert event.metadata["changes since last observation"].value.startswith("1 modified")
    # The scan's lineage names the older observation, so the UI shows it unsynced until the
    # scan runs with the observation (the dataset_scan job), which changes nothing downstream.
    assert project.unsynced() == {"text_embeddings": {"DATA"}, **{name: {"DATA"} for name in SCAN}}
    project.scan()
    assert project.unsynced() == {"text_embeddings": {"DATA"}}
    assert project.watch() == []


def test_the_schedule_is_off_until_turned_on(project):
    assert project.definitions().get_schedule_def("nightly_retrain").default_status == DefaultScheduleStatus.STOPPED
    project.set(retrain_schedule_enabled=True, retrain_cron="30 2 * * 1-5", retrain_timezone="Europe/Madrid")
    schedule = project.definitions().get_schedule_def("nightly_retrain")
    assert schedule.default_status == DefaultScheduleStatus.RUNNING
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("30 2 * * 1-5", "Europe/Madrid")


def test_two_nights_a_quiet_one_costs_nothing_and_a_caption_edit_costs_one_caption(project):
    schedule = project.definitions().get_schedule_def("nightly_retrain")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 3 * * *", "UTC")  # 03:00 every night
    first_night = datetime(2026, 12, 1, 3, tzinfo=timezone.utc)  # two of its ticks
    second_night = first_night + timedelta(days=1)

    skip, ran = project.night(first_night)
    assert "has not changed since the last scan" in skip
    assert ran == set() and project.work == {"images": 0, "texts": 0, "quantize": 0, "train": 0}

    first_caption(project.config_path).write_text("a caption edited during the day")
    skip, ran = project.night(second_night)
    assert skip is None
    assert ran == {"text_embeddings", "lora_adapter", "validation_grid"}
    assert project.work == {"images": 0, "texts": 1, "quantize": 0, "train": 1}
    assert project.unsynced() == {}


def test_a_failing_blocking_check_stops_training_and_says_which_and_why(project, monkeypatch):
    encode = AutoencoderKL.encode

    def nan_latents(vae, pixels, *args, **kwargs):  # what an fp16 VAE overflow looks like
        output = encode(vae, pixels, *args, **kwargs)
        output.latent_dist.mean = torch.full_like(output.latent_dist.mean, float("nan"))
        return output

    monkeypatch.setattr(AutoencoderKL, "encode", nan_latents)
    project.set(crop_style="corner")  # every latent must be encoded again, now as NaN
    result = project.materialize(must_succeed=False)

    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "latents_complete_and_finite"]
    assert not evaluation.passed
    assert "9 usable images have no usable latent" in evaluation.description
    assert "not finite" in evaluation.description
    assert "Re-materialize image_latents" in evaluation.description
    materialized = {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()}
    assert "image_latents" in materialized and "lora_adapter" not in materialized
    assert project.work["train"] == 0
    # The automation sensor does not train on top of it either, until the check passes.
    assert "lora_adapter" not in project.tick()

    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    project.materialize({"image_latents"})
    assert project.run_automation() == {"lora_adapter", "validation_grid"}
    assert project.work["train"] == 1


def test_the_first_night_without_any_scan_scans(small_project, monkeypatch):
    project = WatchedProject(small_project, monkeypatch)
    skip, ran = project.night(datetime(2026, 12, 1, 3, tzinfo=timezone.utc))
    assert skip is None and {"text_embeddings", "image_latents"} <= ran


def test_a_bad_schedule_setting_fails_the_code_location_with_the_key(small_project):
    from assets.definitions import build_definitions
    from chroma_pipeline.config import ConfigError

    good = json.loads(small_project.read_text())
    for key, value in (("retrain_cron", "every night"), ("retrain_timezone", "Mars/Olympus")):
        write_config(small_project, {**good, key: value})
        with pytest.raises(ConfigError, match=key):
            build_definitions(str(small_project))
