"""Real-world folders: every file is either used (converted to the RGB the user sees) or listed with why not."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from dagster import AssetCheckSeverity, DagsterInstance
from PIL import Image

from assets.definitions import materialize_chain
from chroma_pipeline.dataset import ScanOptions, scan_dataset
from chroma_pipeline.demo_data import demo_config
from chroma_pipeline.fingerprint import fingerprint_dataset
from chroma_pipeline.images import open_rgb
from chroma_pipeline.latents import read_latent_index
from tests.conftest import write_config


def _caption(path: Path, text: str = "a caption") -> None:
    path.with_suffix(".txt").write_text(text)


def make_messy_dataset(root: Path) -> dict[str, str]:
    """Every case users bring, generated; returns file -> expected status ("ok" or the skip reason)."""
    root.mkdir(parents=True)
    expected = {}

    phone = Image.new("RGB", (384, 192), (200, 30, 30))  # stored sideways; EXIF says rotate 90
    exif = phone.getexif()
    exif[0x0112] = 6
    phone.save(root / "phone.jpg", exif=exif)
    expected["phone.jpg"] = "ok"

    Image.new("CMYK", (256, 256), (0, 255, 255, 0)).save(root / "print.jpg")
    expected["print.jpg"] = "ok"

    logo = Image.new("RGBA", (256, 256), (0, 0, 255, 255))
    logo.paste((0, 0, 0, 0), (0, 0, 128, 256))  # left half fully transparent
    logo.save(root / "logo.png")
    expected["logo.png"] = "ok"

    palette = Image.new("P", (256, 256), 1)
    palette.putpalette([0, 0, 0] + [255, 255, 0] + [0, 0, 0] * 254)
    palette.paste(0, (0, 0, 64, 64))  # index 0, the transparent one, in the top-left corner
    palette.save(root / "palette.png", transparency=0)
    expected["palette.png"] = "ok"

    scan = Image.fromarray(np.full((256, 320), 65535 // 2, dtype=np.uint16))  # a 16-bit greyscale scan
    scan.save(root / "scan16.png")
    expected["scan16.png"] = "ok"

    Image.new("L", (256, 256), 90).save(root / "grey.png")
    expected["grey.png"] = "ok"

    frames = [Image.new("RGB", (256, 256), colour) for colour in ("red", "blue")]
    frames[0].save(root / "meme.gif", save_all=True, append_images=frames[1:], duration=100)
    expected["meme.gif"] = "ok"

    Image.new("RGB", (256, 256), "green").save(root / "download.jpg")
    data = (root / "download.jpg").read_bytes()
    (root / "download.jpg").write_bytes(data[: len(data) // 2])  # cut off mid-download
    expected["download.jpg"] = "unreadable"

    # At the tests' resolution 256 these need 8x and 256x upscaling: more than maximum_upscale's default 2.0.
    Image.new("RGB", (32, 32), "white").save(root / "thumbnail.png")
    expected["thumbnail.png"] = ("too small: needs 8.0x upscaling to cover its 256x256 bucket, more than "
                                 "maximum_upscale 2.0 allows; set maximum_upscale to 8.0 or more to keep it")
    Image.new("RGB", (1, 1), "black").save(root / "pixel.png")  # a tracking pixel saved along with a web page
    expected["pixel.png"] = ("too small: needs 256.0x upscaling to cover its 256x256 bucket, more than "
                             "maximum_upscale 2.0 allows; set maximum_upscale to 256.0 or more to keep it")

    Image.new("RGB", (1200, 1100), "purple").save(root / "huge.png")  # over the limit the test sets
    expected["huge.png"] = "too large"

    Image.new("RGB", (256, 256), (1, 2, 3)).save(root / "original.png")
    (root / "copy.png").write_bytes((root / "original.png").read_bytes())
    expected["copy.png"] = "ok"  # sorts first, so it is the one kept
    expected["original.png"] = ("duplicate of copy.png (byte-identical): copy.png is kept, being first by name, with "
                                "its caption 'a photo named copy.png'; original.png's caption 'a photo named "
                                "original.png' is not used")

    Image.new("RGB", (256, 256), (120, 80, 40)).save(root / "essay.png")  # used, but its caption is cut (below)
    expected["essay.png"] = "ok"

    Image.new("RGB", (256, 256), (9, 9, 9)).save(root.parent / "elsewhere.png")
    (root / "link.png").symlink_to(root.parent / "elsewhere.png")
    expected["link.png"] = "outside root"

    Image.new("RGB", (256, 256), (50, 60, 70)).save(root / "no_caption_here.png")
    expected["no_caption_here.png"] = "no caption"

    for name in expected:
        if name != "no_caption_here.png":
            _caption(root / name, f"a photo named {name}")
    (root / "grey.txt").write_bytes("un café crème".encode("latin-1"))
    (root / "essay.txt").write_text(LONG_CAPTION)
    return expected


# Far over any tokenizer_max_length: training sees its first tokens only, and the user is told.
LONG_CAPTION = " ".join(["a long rambling description of a brown square"] * 700)  # 5,600 words


@pytest.fixture
def messy(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600_000)  # Pillow warns past this and refuses past twice it
    return tmp_path / "data", make_messy_dataset(tmp_path / "data")


def test_every_file_is_used_or_listed_with_its_reason(messy):
    root, expected = messy
    rows = {row.path: row for row in scan_dataset(root, ScanOptions(resolution=256))}
    assert {path: row.status if row.status == "ok" else row.skip_reason for path, row in rows.items()} == expected
    assert (rows["phone.jpg"].width, rows["phone.jpg"].height) == (192, 384)  # as the phone showed it
    assert rows["grey.png"].caption == "un café crème"


def test_conversions_give_the_picture_the_user_sees(messy):
    root, _ = messy
    assert open_rgb(root / "print.jpg").getpixel((5, 5))[0] > 200  # CMYK cyan-free magenta+yellow: red
    logo = open_rgb(root / "logo.png", background="black")
    assert logo.getpixel((10, 10)) == (0, 0, 0) and logo.getpixel((200, 10)) == (0, 0, 255)
    palette = open_rgb(root / "palette.png", background="white")
    assert palette.getpixel((3, 3)) == (255, 255, 255) and palette.getpixel((200, 200)) == (255, 255, 0)
    assert abs(open_rgb(root / "scan16.png").getpixel((3, 3))[0] - 128) <= 1  # 16-bit mid grey stays mid grey
    assert open_rgb(root / "meme.gif").getpixel((3, 3)) == (255, 0, 0)  # the first frame


@pytest.mark.parametrize(("fallback", "status", "caption"), [
    ("skip", "no caption", None), ("filename", "ok", "no caption here"), ("empty", "ok", ""),
])
def test_missing_captions_follow_the_fallback_and_say_so(messy, fallback, status, caption):
    root, _ = messy
    row = {r.path: r for r in scan_dataset(root, ScanOptions(caption_fallback=fallback, resolution=256))}[
        "no_caption_here.png"]
    assert (row.status if row.status == "ok" else row.skip_reason) == status
    if caption is not None:
        assert row.caption == caption and row.caption_source == fallback


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_captions_from_a_metadata_file(tmp_path, kind):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    for name, colour in [("train/a.png", "red"), ("b.png", "blue")]:
        Image.new("RGB", (128, 128), colour).save(root / name)
    records = [
        {"file_name": "train/a.png", "text": "  a red square  "},
        {"file_name": "b.png", "text": "a blue square"},
        {"file_name": "gone.png", "text": "deleted since"},
        {"file_name": "../escape.png", "text": "not ours"},
    ]
    if kind == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    else:
        lines = ["file_name,text"] + [f'{r["file_name"]},"{r["text"]}"' for r in records]
        (root / "metadata.csv").write_text("\n".join(lines))
    rows = {row.path: row for row in scan_dataset(root, ScanOptions(resolution=128))}
    assert rows["train/a.png"].caption == "a red square" and rows["train/a.png"].caption_original == "  a red square  "
    assert rows["train/a.png"].caption_source == "metadata"
    assert rows["gone.png"].skip_reason == "listed in metadata, no such image"
    assert rows["../escape.png"].skip_reason == "outside root"


def test_a_metadata_file_without_the_columns_says_which_to_set(tmp_path):
    Image.new("RGB", (128, 128)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x"}))
    with pytest.raises(ValueError, match="metadata_file_column"):
        scan_dataset(tmp_path)


@pytest.mark.slow
def test_a_messy_folder_trains_on_every_usable_file_and_says_why_not_the_rest(messy, tmp_path, monkeypatch):
    """The holdout-style folder through Dagster: everything usable is used once, everything else is
    listed with its reason, the over-long caption is reported, and nothing crashes."""
    from chroma_pipeline import models
    from chroma_pipeline.dataset import reason_group

    root, expected = messy
    config = write_config(tmp_path / "config.json", {**demo_config(root, tmp_path / "out"), "resolution": 256})
    instance = DagsterInstance.ephemeral()
    steps = ["raw_dataset/images", "raw_dataset/captions", "image_latents", "text_embeddings"]
    result = materialize_chain(str(config), instance, device="cpu", selection=steps)
    assert result.success and not any(event.is_step_failure for event in result.all_events)
    metadata = {e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
                for e in result.get_asset_materialization_events()}

    usable = sorted(name for name, status in expected.items() if status == "ok")
    skipped = {name: reason for name, reason in expected.items() if reason != "ok"}
    images = metadata["raw_dataset/images"]
    assert images["samples"].value == len(usable) and images["skipped"].value == len(skipped)
    for name, reason in skipped.items():  # each file with its whole reason, as the UI's table shows it
        assert f"| {name} | {reason} |" in images["skipped files"].value
    assert images["skipped by reason"].value == dict(Counter(reason_group(reason) for reason in skipped.values()))
    assert images["duplicates"].value == 1
    assert "| original.png | copy.png | a photo named copy.png | a photo named original.png |" in (
        images["duplicate files"].value)
    assert metadata["image_latents"]["encoded now"].value == len(usable)
    entries = {e.path: e for e in read_latent_index(tmp_path / "out" / "cache" / "latents_index.parquet")}
    assert sorted(entries) == usable
    assert entries["phone.jpg"].bucket_height > entries["phone.jpg"].bucket_width  # a portrait bucket

    embeddings = metadata["text_embeddings"]
    assert embeddings["texts over tokenizer_max_length"].value == 1
    assert "| essay.png |" in embeddings["over-long texts"].value
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "captions_fit_tokenizer_max_length"]
    assert not check.passed and check.severity == AssetCheckSeverity.WARN
    assert "essay.png" in check.description and "tokenizer_max_length (64 tokens)" in check.description
    logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("essay.png" in message and "were cut" in message for message in logged)
    assert any(message.startswith("skipped original.png: duplicate of copy.png") for message in logged)

    # A run that finds every embedding cached still names the cut caption, without loading T5.
    monkeypatch.setattr(models, "load_text_encoder", lambda *args: pytest.fail("T5 loaded to count tokens"))
    again = materialize_chain(str(config), instance, device="cpu", selection=["text_embeddings"])
    reused = again.get_asset_materialization_events()[0].step_materialization_data.materialization.metadata
    assert reused["encoded now"].value == 0 and reused["texts over tokenizer_max_length"].value == 1
    (check,) = [c for c in again.get_asset_check_evaluations() if c.check_name == "captions_fit_tokenizer_max_length"]
    assert not check.passed and "essay.png" in check.description


def test_images_needing_too_much_upscaling_are_listed_not_silently_blown_up(tmp_path):
    for name, size in [("small.png", (200, 200)), ("half.png", (512, 512)), ("fine.png", (900, 900))]:
        Image.new("RGB", size).save(tmp_path / name)
        _caption(tmp_path / name, name)
    rows = {row.path: row for row in scan_dataset(tmp_path, ScanOptions(resolution=1024))}  # the default limit, 2.0
    assert rows["small.png"].skip_reason == ("too small: needs 5.2x upscaling to cover its 1024x1024 bucket, more "
                                             "than maximum_upscale 2.0 allows; set maximum_upscale to 5.2 or more "
                                             "to keep it")  # 1024 / 200 = 5.12, rounded up
    assert rows["half.png"].status == "ok" and rows["fine.png"].status == "ok"  # 2.0x is allowed
    kept = {row.path: row for row in scan_dataset(tmp_path, ScanOptions(resolution=1024, maximum_upscale=5.2))}
    assert kept["small.png"].status == "ok"  # the value the message proposes keeps the image
    unlimited = {row.path: row for row in scan_dataset(tmp_path, ScanOptions(resolution=1024, maximum_upscale=None))}
    assert unlimited["small.png"].status == "ok"


def test_the_config_skips_small_images_by_default_and_a_dataloader_entry_may_allow_them(tmp_path):
    from chroma_pipeline.config import config_from_dict, load_config
    from chroma_pipeline.layout import Layout
    from chroma_pipeline.raw_dataset import build_manifest

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    Image.new("RGB", (32, 32), "white").save(data / "icon.png")
    Image.new("RGB", (128, 128), "black").save(data / "photo.png")
    for name in ("icon.png", "photo.png"):
        _caption(data / name, name)
    config = config_from_dict({"instance_data_dir": str(data), "output_dir": str(out), "resolution": 128})
    _, rows = build_manifest(config, Layout(out))
    assert {row.path: row.status for row in rows} == {"icon.png": "skipped", "photo.png": "ok"}
    assert "more than maximum_upscale 2.0 allows" in rows[0].skip_reason
    # SimpleTuner's dataset key: a threshold of 3 allows 1 + 3 = 4x, which the 32 px icon needs at 128.
    (tmp_path / "multidatabackend.json").write_text(json.dumps([
        {"id": "icons", "instance_data_dir": "data", "resolution": 128, "caption_strategy": "textfile",
         "max_upscale_threshold": 3}]))
    config = load_config(write_config(tmp_path / "config.json", {"output_dir": "out",
                                                                  "data_backend_config": "multidatabackend.json"}))
    _, rows = build_manifest(config, Layout(out))
    assert {row.path: row.status for row in rows} == {"icons/icon.png": "ok", "icons/photo.png": "ok"}


def test_a_dataset_of_only_small_images_fails_naming_the_key_to_change(tmp_path):
    from chroma_pipeline.config import config_from_dict
    from chroma_pipeline.layout import Layout
    from chroma_pipeline.raw_dataset import build_manifest

    (tmp_path / "data").mkdir()
    Image.new("RGB", (32, 32), "white").save(tmp_path / "data" / "icon.png")
    _caption(tmp_path / "data" / "icon.png")
    config = config_from_dict({"instance_data_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"),
                               "resolution": 128})
    with pytest.raises(ValueError, match=r"1 too small\)\. First skipped file: icon\.png: too small: needs 4\.0x "
                                         r"upscaling .* set maximum_upscale to 4\.0 or more to keep it"):
        build_manifest(config, Layout(tmp_path / "out"))


def test_metadata_files_with_a_bom_or_windows_encoding_are_read(tmp_path):
    Image.new("RGB", (128, 128), "red").save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"file_name": "a.png", "text": "red"}).encode())
    assert scan_dataset(tmp_path, ScanOptions(resolution=128))[0].caption == "red"
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_bytes('file_name,text\na.png,"crème, brûlée"\n'.encode("cp1252"))
    with pytest.warns(UserWarning, match="not UTF-8"):
        assert scan_dataset(tmp_path, ScanOptions(resolution=128))[0].caption == "crème, brûlée"


def test_metadata_names_are_relative_to_the_metadata_file_and_nulls_fall_back(tmp_path):
    (tmp_path / "train").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (128, 128), "red" if name == "a.png" else "blue").save(tmp_path / "train" / name)
    records = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "b.png", "text": None}]
    (tmp_path / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    rows = {r.path: r for r in scan_dataset(tmp_path, ScanOptions(metadata_file="train/metadata.jsonl", resolution=128))}
    assert rows["train/a.png"].caption == "a red square"
    assert rows["train/b.png"].skip_reason == "no caption"  # null is not a caption: the fallback decides


def test_a_transparent_colour_in_an_rgb_png_takes_the_background(tmp_path):
    Image.new("RGB", (64, 64), (0, 255, 0)).save(tmp_path / "keyed.png", transparency=(0, 255, 0))
    assert open_rgb(tmp_path / "keyed.png", background="white").getpixel((5, 5)) == (255, 255, 255)


def test_a_very_thin_image_gets_a_bucket_instead_of_crashing():
    from chroma_pipeline.buckets import bucket_for

    width, height = bucket_for(10, 2100, 1024, "pixel_area")
    assert width % 64 == 0 and height % 64 == 0 and height / width <= 4.5


@pytest.mark.slow
def test_an_image_edited_after_the_scan_is_not_cached_under_the_old_hash(tmp_path):
    dataset = tmp_path / "data"
    dataset.mkdir()
    for name, colour in [("red.png", "red"), ("blue.png", "blue")]:
        Image.new("RGB", (256, 256), colour).save(dataset / name)
        _caption(dataset / name)
    config = write_config(tmp_path / "config.json", demo_config(dataset, tmp_path / "out"))
    scan = ["raw_dataset/images", "raw_dataset/captions"]
    assert materialize_chain(str(config), DagsterInstance.ephemeral(), selection=scan, device="cpu").success
    Image.new("RGB", (256, 256), "green").save(dataset / "red.png")  # edited between scan and encoding
    result = materialize_chain(str(config), DagsterInstance.ephemeral(), selection=["image_latents"], device="cpu",
                               raise_on_error=False)
    error = str(next(e for e in result.all_events if e.is_step_failure).event_specific_data.error)
    assert "red.png changed since the dataset scan" in error


def test_links_out_of_the_root_or_in_a_loop_are_skipped_and_never_read(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (128, 128), "red").save(root / "a.png")
    (outside / "notes.txt").write_text("private text that must not become a caption")
    (root / "a.txt").symlink_to(outside / "notes.txt")
    Image.new("RGB", (128, 128), "blue").save(root / "b.png")
    (root / "b.txt").symlink_to(root / "b.txt")  # a link to itself: resolving it loops
    (outside / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "from outside"}\n')
    (root / "metadata.jsonl").symlink_to(outside / "metadata.jsonl")

    rows = {row.path: row for row in scan_dataset(root, ScanOptions(caption_strategy="auto"))}
    assert (rows["a.png"].status, rows["a.png"].skip_reason) == ("skipped", "caption outside root")
    assert rows["b.png"].status == "skipped"
    assert not any("private" in row.caption or "outside" in row.caption for row in rows.values())

    # The watcher fingerprints the same folder without crashing on the loop, and sees a re-pointed link.
    first = fingerprint_dataset(root)
    assert first.files["a.txt"] == f"link:{outside / 'notes.txt'}"
    (root / "a.txt").unlink()
    (root / "a.txt").symlink_to(outside / "metadata.jsonl")
    assert fingerprint_dataset(root).changes_since(first.files)["modified"] == ["a.txt"]
