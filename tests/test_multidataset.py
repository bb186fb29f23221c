"""Several datasets in one run (SimpleTuner's dataloader file): each with its own folder or
Hugging Face dataset, captions, buckets, repeats and probability."""

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from chroma_pipeline.batches import TrainingSample, bucket_batches, samples_per_epoch
from chroma_pipeline.config import ConfigError, load_config
from chroma_pipeline.dataset import ScanOptions, scan_dataset
from chroma_pipeline.latents import LatentEntry
from chroma_pipeline.layout import Layout
from chroma_pipeline.raw_dataset import build_manifest


def write_backend(root: Path, entries: list[dict], **config) -> Path:
    (root / "multidatabackend.json").write_text(json.dumps(entries))
    (root / "config.json").write_text(json.dumps({"output_dir": "out", "data_backend_config": "multidatabackend.json",
                                                  **config}))
    return root / "config.json"


# Half of the default resolution 1024: the smallest picture the default maximum_upscale (2.0) keeps there.
def picture(path: Path, size=(512, 512), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def scan(config_path: Path):
    config = load_config(config_path)
    _result, rows = build_manifest(config, Layout(Path(config.output_dir)))
    return {row.path: row for row in rows}


def test_samples_are_named_by_dataset_and_each_dataset_reads_captions_its_own_way(tmp_path):
    picture(tmp_path / "a" / "red_fox.png")
    picture(tmp_path / "b" / "one.png", colour=(0, 0, 200))
    (tmp_path / "b" / "one.txt").write_text("a blue square\n")
    picture(tmp_path / "c" / "two.png", colour=(0, 200, 0))
    rows = scan(write_backend(tmp_path, [
        {"id": "by-name", "instance_data_dir": "a", "caption_strategy": "filename"},
        {"id": "by-file", "instance_data_dir": "b", "caption_strategy": "textfile",
         "prepend_instance_prompt": True, "instance_prompt": "sks"},
        {"id": "by-prompt", "instance_data_dir": "c", "caption_strategy": "instanceprompt", "instance_prompt": "a toy"},
        {"id": "off", "instance_data_dir": "missing", "disabled": True},
    ]))
    assert rows["by-name/red_fox.png"].caption == "red fox"  # SimpleTuner: the stem, underscores as spaces
    assert rows["by-file/one.png"].caption == "sks a blue square"
    assert rows["by-prompt/two.png"].caption == "a toy"
    assert {row.dataset for row in rows.values()} == {"by-name", "by-file", "by-prompt"}


def test_the_same_folder_at_two_resolutions_is_two_datasets_not_duplicates(tmp_path):
    picture(tmp_path / "photos" / "cat.png")
    (tmp_path / "photos" / "cat.txt").write_text("a cat")
    rows = scan(write_backend(tmp_path, [
        {"id": "low", "instance_data_dir": "photos", "resolution": 64},
        {"id": "high", "instance_data_dir": "photos", "resolution": 128},
    ]))
    assert {path: row.status for path, row in rows.items()} == {"low/cat.png": "ok", "high/cat.png": "ok"}


def test_parquet_captions_match_names_without_their_suffix_as_simpletuner_does(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    picture(tmp_path / "imgs" / "sub" / "x1.png")
    picture(tmp_path / "imgs" / "x2.png", colour=(1, 2, 3))
    pq.write_table(pa.table({"filename": ["x1", "x2"], "caption": ["", "second"], "alt": ["first", "unused"]}),
                   tmp_path / "captions.parquet")
    rows = scan(write_backend(tmp_path, [{"id": "pq", "instance_data_dir": "imgs", "caption_strategy": "parquet",
                                          "parquet": {"path": "captions.parquet", "filename_column": "filename",
                                                      "caption_column": "caption", "fallback_caption_column": "alt"}}]))
    assert rows["pq/sub/x1.png"].caption == "first"  # empty caption: the fallback column
    assert rows["pq/x2.png"].caption == "second"


def test_minimum_image_size_and_aspect_limits_read_as_simpletuner_does(tmp_path):
    for name, size in {"wide.png": (300, 60), "small.png": (60, 60), "fine.png": (100, 100)}.items():
        picture(tmp_path / name, size)
        (tmp_path / name).with_suffix(".txt").write_text(name)
    # pixel_area: width x height at least 80 x 80 (SimpleTuner reads the side of a square).
    at_128 = dict(resolution=128)  # fine.png fits that without more upscaling than maximum_upscale allows
    rows = {r.path: r for r in scan_dataset(tmp_path, ScanOptions(minimum_image_size=80, maximum_aspect_ratio=3.0,
                                                                  **at_128))}
    assert rows["small.png"].skip_reason == "too small"
    assert rows["wide.png"].skip_reason == "aspect ratio outside minimum/maximum_aspect_ratio"
    assert rows["fine.png"].status == "ok"
    pixel = {r.path: r for r in scan_dataset(tmp_path, ScanOptions(minimum_image_size=61, resolution_type="pixel",
                                                                   **at_128))}
    assert pixel["wide.png"].skip_reason == "too small"  # pixel: both sides


def sample(dataset: str, index: int, bucket=(64, 64)) -> TrainingSample:
    return TrainingSample(LatentEntry(f"{dataset}/{index}", str(index), *bucket, f"{dataset}{index}"), "e", dataset)


def test_repeats_count_per_dataset_and_batches_never_mix_datasets():
    samples = [sample("a", i) for i in range(4)] + [sample("b", i, (128, 128)) for i in range(2)]
    assert samples_per_epoch(samples, {"a": 2, "b": 0}) == {"a": 12, "b": 2}
    batches = bucket_batches(samples, batch_size=2, seed=1, repeats={"a": 2, "b": 0})
    epoch = [next(batches) for _ in range(6 + 1)]  # 12 / 2 + 2 / 2 batches
    for batch in epoch:
        assert len({samples[i].dataset for i in batch}) == 1
    seen = Counter(samples[i].dataset for batch in epoch for i in batch)
    assert seen == {"a": 12, "b": 2}


def test_probability_shapes_the_mix_but_every_sample_is_seen_once_an_epoch():
    samples = [sample("a", i) for i in range(50)] + [sample("b", i) for i in range(50)]

    def first_half(probability):
        batches = bucket_batches(samples, 1, seed=3, probability=probability)
        return Counter(samples[next(batches)[0]].dataset for _ in range(50))

    assert first_half({"a": 9.0, "b": 1.0})["a"] > first_half({"a": 1.0, "b": 1.0})["a"]
    batches = bucket_batches(samples, 1, seed=3, probability={"a": 9.0, "b": 1.0})
    assert sorted(next(batches)[0] for _ in range(100)) == list(range(100))


def test_an_unsupported_entry_names_the_dataset_and_the_key(tmp_path):
    with pytest.raises(ConfigError, match="dataset 'x'.*`crop_style` = 'face'.*center, random or corner"):
        load_config(write_backend(tmp_path, [{"id": "x", "instance_data_dir": ".", "crop_style": "face"}]))
    with pytest.raises(ConfigError, match="dataset ids must be unique"):
        load_config(write_backend(tmp_path, [{"id": "x", "instance_data_dir": "."}, {"id": "x", "instance_data_dir": "."}]))


def test_a_hugging_face_dataset_saved_to_disk_is_read_through_datasets(tmp_path):
    import io

    import datasets

    def png(colour) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (80, 64), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    table = datasets.Dataset.from_dict({
        "Image": [{"bytes": png((255, 0, 0)), "path": None}, {"bytes": png((0, 0, 255)), "path": None},
                  {"bytes": b"not an image", "path": None}],
        "Caption": ["a red card", "", "broken"],
    }).cast_column("Image", datasets.Image())
    table.save_to_disk(str(tmp_path / "saved"))
    rows = scan(write_backend(tmp_path, [{
        "id": "hf", "type": "huggingface", "dataset_name": "saved", "caption_strategy": "huggingface", "resolution": 64,
        "huggingface": {"image_column": "Image", "caption_column": "Caption"},  # SimpleTuner's nested block
    }]))
    red = rows["hf/row-000000"]
    assert (red.caption, red.width, red.height) == ("a red card", 80, 64)
    assert rows["hf/row-000001"].skip_reason == "no caption"
    assert rows["hf/row-000002"].skip_reason == "unreadable"

    from chroma_pipeline.sources import read_image

    config = load_config(tmp_path / "config.json")
    assert Image.open(io.BytesIO(read_image(config.image_datasets[0], "row-000000"))).getpixel((0, 0)) == (255, 0, 0)


def test_an_edit_in_one_dataset_re_encodes_only_there(tmp_path, tiny_model_dir):
    from chroma_pipeline.device import detect_device
    from chroma_pipeline.image_latents import build_latents
    from chroma_pipeline.text_embeddings import build_embeddings

    for folder, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
        for index in range(3):
            picture(tmp_path / folder / f"{index}.png", (64, 64), (colour[0], index * 40, colour[2]))
            (tmp_path / folder / f"{index}.txt").write_text(f"{folder} picture {index}")
    textfile = {"caption_strategy": "textfile"}
    config_path = write_backend(tmp_path, [{"id": "a", "instance_data_dir": "a", "resolution": 64, **textfile},
                                           {"id": "b", "instance_data_dir": "b", "resolution": 128, **textfile}],
                                pretrained_model_name_or_path=str(tiny_model_dir), tokenizer_max_length=16)
    device = detect_device("cpu")

    def rebuild():
        config = load_config(config_path)
        layout = Layout(Path(config.output_dir))
        build_manifest(config, layout)
        return build_latents(config, layout, device, log=lambda _: None), build_embeddings(config, layout, device,
                                                                                           log=lambda _: None)

    latents, _texts = rebuild()
    assert {d: c["encoded"] for d, c in latents.stats["datasets"].items()} == {"a": 3, "b": 3}
    assert latents.stats["datasets"]["b"]["buckets"] == {"128x128": 3}
    picture(tmp_path / "b" / "1.png", (64, 64), (9, 9, 9))  # new pixels in dataset b
    (tmp_path / "a" / "2.txt").write_text("a new caption")  # a new caption in dataset a
    latents, texts = rebuild()
    assert {d: c["encoded"] for d, c in latents.stats["datasets"].items()} == {"a": 0, "b": 1}
    assert {d: c["encoded"] for d, c in texts.stats["datasets"].items()} == {"a": 1, "b": 0}


def test_the_grid_renders_at_the_largest_datasets_resolution_unless_told(tmp_path):
    (tmp_path / "data").mkdir()
    config = load_config(write_backend(tmp_path, [{"id": "a", "instance_data_dir": "data", "resolution": 512},
                                                  {"id": "b", "instance_data_dir": "data", "resolution": 768}]))
    assert config.validation_size == 768
    assert config.model_copy(update={"validation_resolution": 256}).validation_size == 256


def test_a_hugging_face_dataset_that_stores_paths_is_read_only_from_its_caches(tmp_path, monkeypatch):
    """Image-folder datasets on the Hub keep file paths, not bytes; those files live in the HF cache."""
    import datasets

    import chroma_pipeline.sources as sources

    cache, elsewhere = tmp_path / "hf-cache", tmp_path / "elsewhere"
    inside, outside = picture(cache / "a.png", (64, 64)), picture(elsewhere / "b.png", (64, 64), (1, 1, 1))
    table = datasets.Dataset.from_dict({"image": [{"bytes": None, "path": str(inside)},
                                                  {"bytes": None, "path": str(outside)}], "text": ["kept", "refused"]})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(sources, "_hf_split", lambda *args: table)
    rows = scan(write_backend(tmp_path, [{"id": "hub", "type": "huggingface", "dataset_name": "someone/images",
                                          "resolution": 64}]))
    assert rows["hub/row-000000"].status == "ok"
    assert rows["hub/row-000001"].skip_reason == "image path outside the dataset and the Hugging Face caches"


def test_a_dataloader_entry_with_a_typo_or_without_its_folder_is_reported(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.warns(UserWarning, match="dataset 'a': unknown keys ignored: resolutoin"):
        load_config(write_backend(tmp_path, [{"id": "a", "instance_data_dir": "data", "resolutoin": 512}]))
    with pytest.raises(ConfigError, match="dataset 'a' .*needs `instance_data_dir`"):
        load_config(write_backend(tmp_path, [{"id": "a", "instance_dir": "data"}]))
    with pytest.raises(ConfigError, match="entry 0 needs an `id`"):
        load_config(write_backend(tmp_path, [{"id": "", "instance_data_dir": "data"}]))
    with pytest.raises(ConfigError, match="dataset 'a': `resolution` = 1024 with resolution_type 'area'"):
        load_config(write_backend(tmp_path, [{"id": "a", "instance_data_dir": "data", "resolution_type": "area"}]))


def test_an_image_in_two_datasets_is_held_out_of_both():
    from chroma_pipeline.held_out import split_held_out

    samples = [sample(dataset, i) for dataset in ("low", "high") for i in range(10)]  # same images, two datasets
    train, held = split_held_out(samples, 0.2, seed=4)
    assert {s.latent.image_sha256 for s in held}.isdisjoint({s.latent.image_sha256 for s in train})
    assert len(held) == 4 and {s.dataset for s in held} == {"low", "high"}


def test_auto_weighting_also_weighs_datasets_by_size(tmp_path):
    from chroma_pipeline.batches import dataset_probability

    (tmp_path / "data").mkdir()
    config = load_config(write_backend(tmp_path, [{"id": "a", "instance_data_dir": "data", "probability": 1},
                                                  {"id": "b", "instance_data_dir": "data", "probability": 0.5}],
                                       data_backend_sampling="auto-weighting"))
    samples = [sample("a", i) for i in range(30)] + [sample("b", i) for i in range(10)]
    assert dataset_probability(config, samples) == {"a": 0.75, "b": 0.125}
    uniform = config.model_copy(update={"data_backend_sampling": "uniform"})
    assert dataset_probability(uniform, samples) == {"a": 1.0, "b": 0.5}


def test_a_dataset_setting_re_runs_only_the_steps_that_read_it(tmp_path):
    from assets._versions import STEP_SETTINGS, step_code_version

    (tmp_path / "data").mkdir()

    def versions(**entry):
        config = load_config(write_backend(tmp_path, [{"id": "a", "instance_data_dir": "data", **entry}]))
        return {step: step_code_version(config, step) for step in STEP_SETTINGS}

    base = versions(crop=True)
    changed = lambda other: {step for step in base if other[step] != base[step]}  # noqa: E731
    assert changed(versions(crop=True, repeats=3)) == {"lora_adapter"}
    assert changed(versions(crop=True, probability=0.5)) == {"lora_adapter"}
    assert changed(versions(crop=True, crop_style="corner")) == {"image_latents"}  # new latents retrain anyway
    assert changed(versions(crop=True, caption_strategy="textfile")) == {"raw_dataset"}
    # Written out or left to SimpleTuner's default, the same; a cache folder changes nothing.
    assert changed(versions(crop=True, crop_style="random", cache_dir_vae="elsewhere/{model_family}")) == set()


def test_single_folder_configs_keep_their_versions_from_before_several_datasets():
    """A user who upgrades must not see every step as changed: these are the demo's versions from before."""
    from assets._versions import STEP_SETTINGS, step_code_version
    from chroma_pipeline.config import config_from_dict
    from chroma_pipeline.demo_data import demo_config

    config = config_from_dict(demo_config(Path("/data/dataset"), Path("/data/output")))
    # Only the scan's changed since, on purpose: maximum_upscale's default went from no limit to 2.0, which
    # changes what a scan may keep (the scan is cheap; the steps after it re-run only if its data changed).
    assert {step: step_code_version(config, step) for step in STEP_SETTINGS} == {
        "raw_dataset": "1+1d3f5f744f57095b", "image_latents": "1+ac121bbc068652cf",
        "text_embeddings": "1+2f486d3d3acaf167", "quantized_base_model": "1+8d9a9f2a199eabcc",
        "lora_adapter": "1+bc44a0db96bcd44a", "validation_grid": "1+2cb28f0e0500eb7d"}


def test_a_caption_file_of_several_lines_is_one_caption_and_the_scan_says_so(tmp_path):
    picture(tmp_path / "cat.png")
    (tmp_path / "cat.txt").write_text("a cat\na cat on a mat\n")
    with pytest.warns(UserWarning, match=r"1 caption files have several lines \(cat.png\)"):
        rows = scan_dataset(tmp_path, ScanOptions())
    assert rows[0].caption == "a cat\na cat on a mat"


def test_the_dataloader_list_can_be_written_inside_the_config_too(tmp_path):
    picture(tmp_path / "data" / "a_b.png")
    (tmp_path / "config.json").write_text(json.dumps({
        "output_dir": "out", "datasets": [{"id": "inline", "instance_data_dir": "data", "cache_dir_vae": "x"}]}))
    with pytest.warns(UserWarning, match="no effect here"):
        config = load_config(tmp_path / "config.json")
    assert config.image_datasets[0].root == tmp_path / "data"  # made absolute like the file's paths
    assert scan(tmp_path / "config.json")["inline/a_b.png"].caption == "a b"


def test_a_misspelt_key_gets_the_nearest_known_one(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.warns(UserWarning, match=r"repeat \(did you mean repeats\?\)"):
        load_config(write_backend(tmp_path, [{"id": "a", "instance_data_dir": "data", "repeat": 2}]))
    with pytest.warns(UserWarning, match=r"lerning_rate \(did you mean learning_rate\?\)"):
        from chroma_pipeline.config import config_from_dict

        config_from_dict({"lerning_rate": 1e-4})


def test_a_missing_dataset_folder_is_named_with_its_dataset_and_file(tmp_path):
    (tmp_path / "data").mkdir()
    config_path = write_backend(tmp_path, [{"id": "gone", "instance_data_dir": "nowhere"}])
    with pytest.raises(FileNotFoundError, match=r"dataset 'gone': .*nowhere is not a folder; set `instance_data_dir` in "
                                                r".*multidatabackend.json"):
        scan(config_path)


def test_a_parquet_table_whose_names_carry_a_suffix_gets_the_key_to_set(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    picture(tmp_path / "imgs" / "x1.png")
    pq.write_table(pa.table({"filename": ["x1.png"], "caption": ["one"]}), tmp_path / "captions.parquet")
    entry = {"id": "pq", "instance_data_dir": "imgs", "caption_strategy": "parquet",
             "parquet": {"path": "captions.parquet", "filename_column": "filename", "caption_column": "caption"}}
    with pytest.warns(UserWarning, match="set `identifier_includes_extension: true`"):
        with pytest.raises(ValueError, match="no usable sample"):
            scan(write_backend(tmp_path, [entry]))
    entry["parquet"]["identifier_includes_extension"] = True
    assert scan(write_backend(tmp_path, [entry]))["pq/x1.png"].caption == "one"
