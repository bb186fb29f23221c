"""Single assets through Dagster: what the UI shows for a messy dataset or a bad one."""

import json

from dagster import DagsterInstance

from assets.definitions import materialize_chain


def _materialize_raw(config_path, instance=None):
    scan = ["raw_dataset/images", "raw_dataset/captions"]
    return materialize_chain(str(config_path), instance or DagsterInstance.ephemeral(), selection=scan, device="cpu",
                             raise_on_error=False)


def test_corrupt_and_uncaptioned_files_are_reported_not_dropped(small_project):
    dataset = small_project.parent / "dataset"
    (dataset / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")  # a download cut short
    (dataset / "truncated.txt").write_text("a broken download")
    sorted(dataset.glob("0*.txt"))[0].unlink()  # one demo image loses its caption
    for copy in ("zz-copy-1", "zz-copy-2"):  # two copies of one image (sorted after the original)
        (dataset / f"{copy}.png").write_bytes(sorted(dataset.glob("0*.png"))[1].read_bytes())
        (dataset / f"{copy}.txt").write_text("a copy")

    instance = DagsterInstance.ephemeral()
    result = _materialize_raw(small_project, instance)
    assert result.success
    metadata = next(e for e in result.get_asset_materialization_events()
                    if e.asset_key.to_user_string() == "raw_dataset/images").step_materialization_data.materialization.metadata
    assert metadata["samples"].value == 8 and metadata["skipped"].value == 4
    assert metadata["skipped by reason"].value == {"unreadable": 1, "no caption": 1, "duplicate": 2}
    assert "truncated.png" in metadata["skipped files"].value
    # Each copy names the file that trains in its place, and the caption that is not used.
    original = sorted(dataset.glob("0*.png"))[1]
    assert metadata["duplicates"].value == 2
    kept_caption = original.with_suffix(".txt").read_text().strip()
    for copy in ("zz-copy-1.png", "zz-copy-2.png"):
        assert f"| {copy} | {original.name} | {kept_caption} | a copy | this file's caption is not used |" in (
            metadata["duplicate files"].value)
    logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert (f"skipped zz-copy-1.png: duplicate of {original.name} (byte-identical): {original.name} is kept, being "
            f"first by name, with its caption {kept_caption!r}; zz-copy-1.png's caption 'a copy' is not used") in logged


def test_thousands_of_skipped_files_show_the_first_200_and_count_the_rest(small_project):
    # A 100k-image folder can skip thousands: the run log and the table name the first 200 and say how
    # many more, so neither grows with the dataset (benchmarks/scale.py); the manifest lists them all.
    dataset = small_project.parent / "dataset"
    picture = sorted(dataset.glob("0*.png"))[0].read_bytes()
    for i in range(203):
        (dataset / f"zz-no-caption-{i:03d}.png").write_bytes(picture)
    instance = DagsterInstance.ephemeral()
    result = _materialize_raw(small_project, instance)
    assert result.success
    metadata = next(e for e in result.get_asset_materialization_events()
                    if e.asset_key.to_user_string() == "raw_dataset/images").step_materialization_data.materialization.metadata
    assert metadata["skipped"].value == 203 and metadata["skipped by reason"].value == {"no caption": 203}
    table = metadata["skipped files"].value
    manifest = metadata["manifest"].value
    assert table.count("| zz-no-caption-") == 200 and "zz-no-caption-199.png" in table
    assert f"The first 200 of 203; 3 more not shown: {manifest} lists every one with its reason." in table
    logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert sum(message.startswith("skipped zz-no-caption-") for message in logged) == 200
    assert (f"... and 3 more skipped files, not logged one by one: {manifest} lists every file with its reason "
            "('skipped by reason' counts them)") in logged


def test_caption_sources_and_encoding_warnings_reach_the_dagster_log(small_project):
    dataset = small_project.parent / "dataset"
    sorted(dataset.glob("0*.txt"))[0].write_bytes("une légende".encode("latin-1"))
    instance = DagsterInstance.ephemeral()
    result = _materialize_raw(small_project, instance)
    captions = next(e for e in result.get_asset_materialization_events()
                    if e.asset_key.to_user_string() == "raw_dataset/captions").step_materialization_data.materialization
    assert captions.metadata["caption warnings"].value == 1
    assert captions.metadata["captions by source"].value == {"textfile": 9}
    logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("not UTF-8; read as latin-1" in message for message in logged)


def test_a_dataset_with_nothing_usable_fails_with_the_reasons(small_project):
    for caption in (small_project.parent / "dataset").glob("*.txt"):
        caption.unlink()
    result = _materialize_raw(small_project)
    assert not result.success
    error = str(next(e for e in result.all_events if e.is_step_failure).event_specific_data.error)
    assert "no usable sample" in error and "9 no caption" in error and ".txt" in error


def test_a_missing_dataset_folder_names_the_key_to_fix(small_project, tmp_path):
    values = json.loads(small_project.read_text())
    small_project.write_text(json.dumps({**values, "instance_data_dir": str(tmp_path / "nowhere")}))
    result = _materialize_raw(small_project)
    error = str(next(e for e in result.all_events if e.is_step_failure).event_specific_data.error)
    assert "instance_data_dir" in error and "nowhere" in error
