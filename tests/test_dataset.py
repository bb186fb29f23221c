"""Scanning a dataset folder: every file accounted for, hashed by content."""

import gc
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from chroma_pipeline import storage
from chroma_pipeline.dataset import ManifestRow, ScanOptions, read_manifest, scan_dataset, usable, write_manifest

# The test images are 60-120 px: scan them at a resolution they cover without more upscaling
# than maximum_upscale allows (at the default 1024 they would be skipped as too small).
AT_64 = ScanOptions(resolution=64)


def _image(path: Path, size=(96, 64), colour="red", caption: str | None = "a red thing"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def test_bad_files_are_skipped_with_a_reason_and_the_rest_kept(tmp_path):
    root = tmp_path / "data"
    _image(root / "good.png")
    _image(root / "nested" / "also-good.jpg", colour="blue", caption="  a blue thing \n")
    _image(root / "uncaptioned.png", colour="green", caption=None)
    _image(root / "copy.png")  # same bytes as good.png
    (root / "broken.png").write_bytes(Image.new("RGB", (8, 8)).tobytes()[:20])
    (root / "broken.txt").write_text("broken")
    outside = tmp_path / "elsewhere.png"
    _image(outside, colour="white")
    (root / "link.png").symlink_to(outside)
    (root / "link.txt").write_text("a link")

    rows = {row.path: row for row in scan_dataset(root, AT_64)}
    # copy.png sorts first, so it is the one kept and good.png the duplicate.
    assert {path for path, row in rows.items() if row.status == "ok"} == {"copy.png", "nested/also-good.jpg"}
    assert rows["good.png"].skip_reason == ("duplicate of copy.png (byte-identical): copy.png is kept, being first "
                                            "by name, and both have the caption 'a red thing'")
    assert rows["good.png"].duplicate_of == "copy.png"
    assert rows["uncaptioned.png"].skip_reason == "no caption"
    assert rows["broken.png"].skip_reason == "unreadable"
    assert rows["link.png"].skip_reason == "outside root"
    assert rows["nested/also-good.jpg"].caption == "a blue thing"  # whitespace stripped


def test_a_duplicate_names_both_files_and_which_caption_trains(tmp_path):
    _image(tmp_path / "a.png", caption="a red cat")
    _image(tmp_path / "b.png", caption="a cat, red")  # the same bytes under another name and caption
    rows = {row.path: row for row in scan_dataset(tmp_path, AT_64)}
    assert rows["a.png"].status == "ok" and rows["a.png"].caption == "a red cat"
    assert rows["b.png"].skip_reason == ("duplicate of a.png (byte-identical): a.png is kept, being first by name, "
                                         "with its caption 'a red cat'; b.png's caption 'a cat, red' is not used")


def test_exif_rotation_is_applied_to_the_recorded_size(tmp_path):
    image = Image.new("RGB", (120, 60))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees": a portrait photo stored sideways
    image.save(tmp_path / "phone.jpg", exif=exif)
    (tmp_path / "phone.txt").write_text("a phone photo")
    (row,) = scan_dataset(tmp_path, AT_64)
    assert (row.width, row.height) == (60, 120)


def test_hashes_follow_content_not_names_or_mtimes(tmp_path):
    _image(tmp_path / "a.png")
    before = usable(scan_dataset(tmp_path, AT_64))[0]
    (tmp_path / "a.png").rename(tmp_path / "b.png")
    (tmp_path / "a.txt").rename(tmp_path / "b.txt")
    after = usable(scan_dataset(tmp_path, AT_64))[0]
    assert (before.image_sha256, before.caption_sha256) == (after.image_sha256, after.caption_sha256)
    (tmp_path / "b.txt").write_text("another caption")
    assert usable(scan_dataset(tmp_path, AT_64))[0].caption_sha256 != before.caption_sha256


def test_non_utf8_captions_are_read_not_lost(tmp_path):
    _image(tmp_path / "cafe.png", caption=None)
    (tmp_path / "cafe.txt").write_bytes("un café crème".encode("latin-1"))
    with pytest.warns(UserWarning, match="cafe.txt: caption is not UTF-8"):
        (row,) = scan_dataset(tmp_path, AT_64)
    assert row.caption == "un café crème"


def test_manifest_round_trips(tmp_path):
    _image(tmp_path / "data" / "a.png")
    rows = scan_dataset(tmp_path / "data", AT_64)
    write_manifest(rows, tmp_path / "manifest.parquet")
    assert read_manifest(tmp_path / "manifest.parquet") == rows


def _many_rows(count: int) -> list[ManifestRow]:
    return [ManifestRow(f"{i:06d}.png", "ok", "", f"{i:064x}", 64, 64, f"caption {i}", f"{-i:064x}", f"caption {i} ",
                        "textfile") for i in range(count)]


def test_a_large_manifest_round_trips_in_order_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "ROWS_PER_BATCH", 7)  # 3 batches and a part
    rows = _many_rows(23)
    write_manifest(rows, tmp_path / "manifest.parquet")
    assert read_manifest(tmp_path / "manifest.parquet") == rows
    write_manifest([], tmp_path / "empty.parquet")
    assert read_manifest(tmp_path / "empty.parquet") == []


def _python_peak(call):
    """(result, bytes of Python objects it holds, peak bytes allocated during `call()`)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = call()
        held, peak = tracemalloc.get_traced_memory()
        return result, held, peak
    finally:
        tracemalloc.stop()


def test_writing_and_reading_an_index_holds_one_batch_of_rows_at_a_time_not_a_second_copy(tmp_path):
    # At 100k images, converting every row at once held the manifest again (a dict per row on write,
    # every row's dict on read): benchmarks/scale.py measured +300 MiB of RSS to read one.
    write_manifest(_many_rows(10), tmp_path / "warm.parquet")  # Arrow's first-use allocations, out of the way
    read_manifest(tmp_path / "warm.parquet")
    rows, path = _many_rows(30_000), tmp_path / "manifest.parquet"  # 4 batches
    _, _, writing = _python_peak(lambda: write_manifest(rows, path))
    back, rows_size, reading = _python_peak(lambda: read_manifest(path))
    assert back == rows
    assert writing < 0.6 * rows_size  # was 0.83: every row's dict at once
    assert reading < 1.35 * rows_size  # was 1.67: the rows, and every row's dict


def test_the_scan_walks_names_in_the_order_paths_sort(tmp_path):
    # By parts, so "a/x" comes before "a-b/x"; the first name is the duplicate kept.
    root = tmp_path / "data"
    for name in ("a-b/x.png", "a/x.png", "a.png"):
        _image(root / name)
    rows = scan_dataset(root, AT_64)
    assert [row.path for row in rows] == ["a/x.png", "a-b/x.png", "a.png"]
    assert rows[0].status == "ok" and all("duplicate of a/x.png" in row.skip_reason for row in rows[1:])


def test_the_scan_holds_no_path_object_per_image_while_it_walks(tmp_path):
    # 100k Path objects took ~100 MiB of RSS during a scan (benchmarks/scale.py); names are enough.
    root = tmp_path / "data"
    root.mkdir()
    picture = root / "00000.png"
    Image.new("RGB", (64, 64), "red").save(picture)
    for i in range(2000):
        name = f"{i:05d}"
        (root / f"{name}.png").write_bytes(picture.read_bytes() + name.encode())  # distinct bytes, no duplicates
        (root / f"{name}.txt").write_text(f"caption {i}")
    scan_dataset(root, AT_64)  # first-use allocations (image plugins, caches) out of the way
    rows, held, peak = _python_peak(lambda: scan_dataset(root, AT_64))
    assert len(usable(rows)) == 2000
    # Bytes per image beyond the rows it returns: ~1,100 with a Path per image, 810 with names: the folder
    # listing rglob holds, and the memo of what each file decoded to (~180; its name and hash are the row's).
    assert (peak - held) / 2000 < 950


def test_a_rescan_decodes_and_hashes_only_new_or_changed_images(tmp_path, monkeypatch):
    import chroma_pipeline.dataset as dataset_module

    root, facts = tmp_path / "data", tmp_path / "image_facts.json"
    _image(root / "a.png", colour="red", caption="caption a")
    _image(root / "b.png", colour="blue", caption="caption b")
    _image(root / "c.png", size=(80, 64), colour="green", caption="caption c")
    (root / "broken.png").write_bytes(b"not an image")
    (root / "broken.txt").write_text("broken")
    first = scan_dataset(root, AT_64, facts)

    read = []
    decode, digest = dataset_module.open_rgb, dataset_module.sha256_file
    monkeypatch.setattr(dataset_module, "open_rgb", lambda image, *a: read.append(Path(image).name) or decode(image, *a))
    monkeypatch.setattr(dataset_module, "sha256_file", lambda path: read.append(Path(path).name) or digest(path))
    assert scan_dataset(root, AT_64, facts) == first and read == []  # a stat per file, nothing read

    _image(root / "b.png", size=(64, 96), colour="white", caption="caption b, edited")  # new pixels and caption
    (root / "c.txt").write_text("only the caption changed")
    again = {row.path: row for row in scan_dataset(root, AT_64, facts)}
    assert read == ["b.png", "b.png"]  # decoded once and hashed once; c.png's pixels were not read again
    assert (again["b.png"].width, again["b.png"].height) == (64, 96) and again["c.png"].caption == "only the caption changed"
    assert again["broken.png"].skip_reason == "unreadable"  # a remembered failure is still reported


def test_the_walk_lists_linked_files_for_checking_but_never_enters_a_linked_folder(tmp_path):
    from chroma_pipeline.dataset import files_under

    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    _image(root / "sub" / "kept.png")
    _image(elsewhere / "secret.png")
    (root / "link.png").symlink_to(elsewhere / "secret.png")
    (root / "linked-folder").symlink_to(elsewhere, target_is_directory=True)
    assert files_under(root, {".png"}) == (["link.png", "sub/kept.png"], {"link.png"})
    rows = scan_dataset(root, AT_64)
    assert {row.path: row.status for row in rows} == {"link.png": "skipped", "sub/kept.png": "ok"}
