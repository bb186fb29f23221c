"""Scan a dataset folder into a manifest: every file accounted for, hashed by content.

Captions come from same-stem `.txt` files, or from a `metadata.jsonl` / `.csv` /
`.parquet` beside the images (the Hugging Face image-folder convention: a `file_name`
and a `text` column). A usable sample gets a row with its content hashes; a file we
cannot use gets a row with the reason. Hashes are of content, never names or mtimes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .buckets import DEFAULT_MAXIMUM_UPSCALE, bucket_for, upscale_needed
from .errors import DatasetError
from .images import open_rgb
from .storage import read_rows, sha256_file, sha256_text, write_json_atomic, write_rows_atomic

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


@dataclass
class ManifestRow:
    path: str  # the sample's name: `<dataset id>/<path in the dataset>` (the shorthand dataset: the path alone)
    status: str  # "ok" or "skipped"
    skip_reason: str = ""
    image_sha256: str = ""
    width: int = 0  # after EXIF orientation
    height: int = 0
    caption: str = ""  # what training uses: decoded and stripped
    caption_sha256: str = ""
    caption_original: str = ""  # as written in the file, for the record
    caption_source: str = ""  # "textfile", "metadata", "filename", "instanceprompt" or "empty"
    dataset: str = ""  # the dataset's id ("" for the one-folder shorthand)
    duplicate_of: str = ""  # a skipped byte-identical copy: the sample that trains in its place


@dataclass(frozen=True)
class ScanOptions:
    caption_strategy: str = "auto"  # "auto", "textfile", "metadata", "filename", "instanceprompt" or "parquet"
    instance_prompt: str | None = None
    # SimpleTuner's `parquet` captions: a table named in the config (it may live outside the dataset)
    caption_table: str | None = None
    caption_table_fallback_column: str | None = None
    caption_table_names_have_extension: bool = False
    metadata_file: str | None = None  # relative to the dataset root; found automatically when None
    metadata_file_column: str = "file_name"
    metadata_caption_column: str = "text"
    caption_fallback: str = "skip"  # for an image without caption: "skip", "filename" or "empty"
    minimum_image_size: float = 0  # shorter edge in pixels; megapixels when resolution_type is "area"
    resolution_type: str = "pixel_area"
    alpha_background: str = "white"
    resolution: float = 1024
    crop_aspect: str = "preserve"
    # Skip images their bucket would blow up more than this (None: no limit); see buckets.DEFAULT_MAXIMUM_UPSCALE.
    maximum_upscale: float | None = DEFAULT_MAXIMUM_UPSCALE
    minimum_aspect_ratio: float | None = None  # width / height
    maximum_aspect_ratio: float | None = None
    prepend_instance_prompt: bool = False  # caption = instance_prompt + " " + caption


def decode_caption(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Windows tools still write cp1252/latin-1; latin-1 never fails, so nothing is lost.
        warnings.warn(f"{where}: caption is not UTF-8; read as latin-1", stacklevel=2)
        return raw.decode("latin-1")


def files_under(root: Path, suffixes) -> tuple[list[str], set[str]]:
    """Names (relative, "/"-separated) of the files under `root` with one of `suffixes` (lower case), in
    the order Paths sort (by parts), and which of them are links. Linked folders are not entered (as
    `Path.rglob` does not), so a file that is not a link is inside `root`; a linked file is for the
    caller to check. A scandir walk, not rglob: a Path per file, and a resolve each, made listing
    2,000 images a third of a no-op re-run."""
    names, links, folders = [], set(), [("", Path(root))]
    while folders:
        prefix, folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:  # unreadable or gone while walking: as rglob, skip it
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append((f"{prefix}{entry.name}/", entry.path))
            elif os.path.splitext(entry.name)[1].lower() in suffixes:
                names.append(prefix + entry.name)
                if entry.is_symlink():
                    links.add(prefix + entry.name)
    return sorted(names, key=lambda name: name.split("/")), links


def is_inside(path: Path, root: Path, resolved_dirs: dict | None = None) -> bool:
    """Whether `path`, links followed, stays under `root`; a link loop or a dangling link does not.

    A walk passes `resolved_dirs` (empty at its start): a file that is not a link is then where its
    folder is, and each folder is resolved once, not once per file (at 2,000 images that was a
    quarter of a no-op re-scan).
    """
    try:
        if resolved_dirs is None or path.name in ("", ".", "..") or stat.S_ISLNK(os.lstat(path).st_mode):
            return path.resolve(strict=True).is_relative_to(root)
        folder = path.parent
        if folder not in resolved_dirs:
            resolved_dirs[folder] = folder.resolve(strict=True).is_relative_to(root)
        return resolved_dirs[folder]
    except (OSError, RuntimeError):
        return False


def find_metadata(root: Path, options: ScanOptions) -> Path | None:
    if options.metadata_file:
        path = (root / options.metadata_file).resolve()
        if not path.is_file() or not path.is_relative_to(root):
            raise FileNotFoundError(f"metadata_file {options.metadata_file!r} is not a file inside {root}")
        return path
    found = [root / name for name in METADATA_FILES if (root / name).is_file() and is_inside(root / name, root)]
    if len(found) > 1:
        raise DatasetError(f"{root} has several metadata files ({', '.join(p.name for p in found)}); set metadata_file")
    return found[0] if found else None


def read_metadata_captions(path: Path, file_column: str, caption_column: str,
                           fallback_column: str | None = None) -> dict[str, str]:
    """file name (relative to the metadata file's folder) -> caption, from a jsonl, csv or parquet table.

    A row whose caption is empty of value (null, NaN) counts as no caption, so the fallback applies.
    """
    if path.suffix == ".jsonl":
        text = decode_caption(path.read_bytes(), str(path))
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif path.suffix == ".csv":
        records = list(csv.DictReader(io.StringIO(decode_caption(path.read_bytes(), str(path)), newline="")))
    else:
        records = pq.read_table(path).to_pylist()
    if records and (file_column not in records[0] or caption_column not in records[0]):
        raise DatasetError(
            f"{path}: needs columns {file_column!r} and {caption_column!r} (found {sorted(records[0])}); "
            "set metadata_file_column / metadata_caption_column"
        )
    def has_value(value) -> bool:
        return value is not None and value == value and str(value).strip() != ""  # not None, not NaN, not blank

    captions = {}
    for record in records:
        caption = record[caption_column]
        if not has_value(caption) and fallback_column:
            caption = record.get(fallback_column)
        if has_value(caption):
            captions[str(record[file_column]).replace("\\", "/").removeprefix("./")] = str(caption)
    return captions


def too_small(width: int, height: int, options: ScanOptions) -> bool:
    """SimpleTuner's reading of `minimum_image_size`: pixel: both sides; area: megapixels;
    pixel_area: the area of a square of that side (a value up to 10 is already megapixels)."""
    minimum = options.minimum_image_size
    if not minimum:
        return False
    if options.resolution_type == "pixel":
        return min(width, height) < minimum
    if options.resolution_type == "area" or minimum <= 10:
        return width * height < minimum * 1_000_000
    return width * height < minimum * minimum


def outside_aspect_limits(width: int, height: int, options: ScanOptions) -> bool:
    aspect = width / height
    return bool((options.minimum_aspect_ratio and aspect < options.minimum_aspect_ratio)
                or (options.maximum_aspect_ratio and aspect > options.maximum_aspect_ratio))


def caption_from_filename(path: Path) -> str:
    """SimpleTuner's `filename` captions: the file's stem, underscores made spaces, nothing else changed."""
    return path.stem.replace("_", " ")


def fallback_caption(path: Path) -> str:
    """`caption_fallback: filename`: the stem with runs of `_` and `-` made one space."""
    return re.sub(r"[_\-]+", " ", path.stem).strip()


def upscale_skip_reason(width: int, height: int, options: ScanOptions) -> str | None:
    """Why an image is too small for `maximum_upscale`, naming the factor and the value that keeps it; None if it fits.

    Covering a bucket from a much smaller image trains on interpolation blur, not on the picture.
    """
    if options.maximum_upscale is None:
        return None
    bucket = bucket_for(width, height, options.resolution, options.resolution_type, options.crop_aspect)
    needed = upscale_needed(width, height, bucket)
    if needed <= options.maximum_upscale:
        return None
    enough = math.ceil(needed * 10) / 10  # rounded up, so the value the message proposes does keep the image
    return (f"too small: needs {_factor(enough)}x upscaling to cover its {bucket[0]}x{bucket[1]} bucket, more than "
            f"maximum_upscale {_factor(options.maximum_upscale)} allows; set maximum_upscale to {_factor(enough)} "
            "or more to keep it")


def _factor(value: float) -> str:
    return f"{value:.1f}" if value == round(value, 1) else f"{value:g}"


def _quoted(caption: str, limit: int = 80) -> str:
    """A caption as a message shows it: quoted, and cut short (with its length) when it is long."""
    return repr(caption) if len(caption) <= limit else f"{caption[:limit]!r}... ({len(caption)} characters)"


def duplicate_reason(kept: ManifestRow, name: str, caption: str) -> str:
    """Which of two byte-identical files trains, and what becomes of the other one's caption.

    The scan walks names in sorted order, so the first name seen is the one kept.
    """
    head = f"duplicate of {kept.path} (byte-identical): {kept.path} is kept, being first by name,"
    if caption == kept.caption:
        return f"{head} and both have the caption {_quoted(caption)}"
    return f"{head} with its caption {_quoted(kept.caption)}; {name}'s caption {_quoted(caption)} is not used"


def reason_group(reason: str) -> str:
    """The kind of a skip reason, for counting: its words before any detail.

    "duplicate of a.png (byte-identical): ..." -> "duplicate"; "too small: needs 4.0x ..." -> "too small".
    """
    return reason.split(":")[0].split(" of ")[0].strip()


def training_caption(original: str, source: str, options: ScanOptions) -> str:
    caption = original.strip()
    if options.prepend_instance_prompt and options.instance_prompt and source != "instanceprompt":
        caption = f"{options.instance_prompt.strip()} {caption}".strip()
    return caption


class ImageFacts:
    """What decoding and hashing each image file found, remembered by its size, mtime and inode.

    A re-scan then decodes and hashes only new or changed files; an unchanged one costs a stat.
    What is remembered depends on the file alone (its size after EXIF rotation, whether it
    decodes, its hash), never on scan settings, so changing a setting re-uses it too.
    """

    def __init__(self, path: Path | None = None):
        self.path = path
        # name in the dataset -> [size, mtime_ns, inode, width, height, failure, sha256]: at 100k images this is
        # held beside the manifest, so names are relative (not absolute paths) to keep it small.
        self.entries: dict[str, list] = {}
        self.fresh: dict[str, list] = {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (ValueError, OSError):
                pass  # a damaged memo only costs decoding again

    def _signature(self, file: Path) -> list[int]:
        info = file.stat()
        return [info.st_size, info.st_mtime_ns, info.st_ino]

    def examine(self, file: Path | bytes, background: str, key: str) -> list:
        """[width, height, failure ("" or "too large"/"unreadable"), sha256 ("" until needed)] of `file`, named `key`."""
        if isinstance(file, bytes):
            return [*_decode(file, background), ""]
        signature = self._signature(file)
        known = self.entries.get(key)
        facts = known[3:] if known and known[:3] == signature else [*_decode(file, background), ""]
        self.fresh[key] = [*signature, *facts]
        return facts

    def sha256(self, file: Path | bytes, key: str) -> str:
        if isinstance(file, bytes):
            return hashlib.sha256(file).hexdigest()
        entry = self.fresh[key]
        if not entry[-1]:
            entry[-1] = sha256_file(file)
        return entry[-1]

    def save(self) -> None:
        """Keep what this scan saw (files gone since are forgotten)."""
        if self.path is not None and self.fresh != self.entries:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.fresh)


def _decode(image: Path | bytes, background: str) -> list:
    try:
        width, height = open_rgb(image, background).size
        return [width, height, ""]
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return [0, 0, "too large"]
    except (OSError, ValueError, SyntaxError, EOFError):
        return [0, 0, "unreadable"]


def image_row(relative: str, image: Path | bytes, original: str, source: str, options: ScanOptions,
              seen_hashes: dict[str, ManifestRow], facts: ImageFacts | None = None) -> ManifestRow:
    """The manifest row of one captioned image (a file or its bytes): usable, or skipped with the reason.

    `seen_hashes` maps each image hash met so far to the row that kept it, so a byte-identical
    copy names the file that trains and the caption that goes with it. `facts` remembers what
    decoding and hashing found, so an unchanged file is not read again.
    """
    facts = facts or ImageFacts()
    width, height, failure, _ = facts.examine(image, options.alpha_background, relative)
    if failure:
        return ManifestRow(relative, "skipped", failure)
    if too_small(width, height, options):
        return ManifestRow(relative, "skipped", "too small")
    if outside_aspect_limits(width, height, options):
        return ManifestRow(relative, "skipped", "aspect ratio outside minimum/maximum_aspect_ratio")
    if reason := upscale_skip_reason(width, height, options):
        return ManifestRow(relative, "skipped", reason)
    caption = training_caption(original, source, options)
    image_hash = facts.sha256(image, relative)
    if image_hash in seen_hashes:
        kept = seen_hashes[image_hash]
        return ManifestRow(relative, "skipped", duplicate_reason(kept, relative, caption), caption=caption,
                           caption_original=original, caption_source=source, duplicate_of=kept.path)
    row = ManifestRow(relative, "ok", "", image_hash, width, height, caption, sha256_text(caption), original, source)
    seen_hashes[image_hash] = row
    return row


def scan_dataset(root: Path, options: ScanOptions = ScanOptions(), facts_path: Path | None = None) -> list[ManifestRow]:
    """Every image under `root` as a manifest row; `facts_path` remembers decodes and hashes between scans."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"instance_data_dir {root} is not a folder; set it to the folder of your images")
    metadata_path = None
    if options.caption_strategy in ("auto", "metadata"):
        metadata_path = find_metadata(root, options)
    if options.caption_strategy == "metadata" and metadata_path is None:
        raise FileNotFoundError(f"caption_strategy is 'metadata' but {root} has none of {', '.join(METADATA_FILES)}")
    listed, by_file_name, keep_suffix = None, False, True
    if options.caption_strategy == "parquet":
        if not options.caption_table or not Path(options.caption_table).is_file():
            raise FileNotFoundError(f"caption_strategy 'parquet' needs a `parquet` block whose `path` is a table "
                                    f"(got {options.caption_table!r})")
        listed = read_metadata_captions(Path(options.caption_table), options.metadata_file_column,
                                        options.metadata_caption_column, options.caption_table_fallback_column)
        by_file_name = not any("/" in name for name in listed)
        keep_suffix = options.caption_table_names_have_extension
    elif metadata_path:
        # Names in a metadata file are relative to its own folder (the Hugging Face image-folder rule).
        prefix = metadata_path.parent.relative_to(root).as_posix()
        captions = read_metadata_captions(metadata_path, options.metadata_file_column, options.metadata_caption_column)
        listed = {(name if prefix == "." else f"{prefix}/{name}"): text for name, text in captions.items()}

    def table_name(relative: str) -> str:
        """How the caption table names an image: SimpleTuner's parquet tables often give the bare
        file name, and by default (identifier_includes_extension false) without its suffix."""
        name = relative.rsplit("/", 1)[-1] if by_file_name else relative
        return name if keep_suffix else name.rsplit(".", 1)[0]

    rows: list[ManifestRow] = []
    seen_hashes: dict[str, ManifestRow] = {}
    multi_line: list[str] = []
    facts = ImageFacts(facts_path)
    names, links = files_under(root, IMAGE_SUFFIXES)  # names, not Paths: 100k Paths took ~100 MB (benchmarks/scale.py)
    resolved_dirs: dict = {}
    for relative in names:
        path = root / relative
        if relative in links and not is_inside(path, root):
            rows.append(ManifestRow(relative, "skipped", "outside root"))
            continue
        if options.caption_strategy == "instanceprompt":
            original, source = options.instance_prompt, "instanceprompt"
        elif options.caption_strategy == "filename":
            original, source = caption_from_filename(path), "filename"
        elif listed is not None:
            name = table_name(relative)
            original, source = (listed[name], "metadata") if name in listed else (None, "")
        else:
            caption_path = path.with_suffix(".txt")
            if caption_path.is_file() and not is_inside(caption_path, root, resolved_dirs):
                rows.append(ManifestRow(relative, "skipped", "caption outside root"))  # never read it
                continue
            original, source = (
                (decode_caption(caption_path.read_bytes(), str(caption_path)), "textfile")
                if caption_path.is_file() else (None, "")
            )
        if original is None:
            if options.caption_fallback == "skip":
                rows.append(ManifestRow(relative, "skipped", "no caption"))
                continue
            original = fallback_caption(path) if options.caption_fallback == "filename" else ""
            source = options.caption_fallback
        if source == "textfile" and len([line for line in original.splitlines() if line.strip()]) > 1:
            multi_line.append(relative)
        rows.append(image_row(relative, path, original, source, options, seen_hashes, facts))
    facts.save()

    if options.caption_strategy == "parquet" and not keep_suffix and not any(r.caption_source == "metadata" for r in rows):
        if any(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in listed):
            warnings.warn(f"no image matched {options.caption_table}: its names carry a suffix (e.g. "
                          f"{next(iter(listed))!r}); set `identifier_includes_extension: true` in the `parquet` block",
                          stacklevel=2)
    if multi_line:
        warnings.warn(f"{len(multi_line)} caption files have several lines ({', '.join(multi_line[:5])}"
                      f"{', ...' if len(multi_line) > 5 else ''}): each file is one caption here "
                      "(SimpleTuner would train each line as a caption of its own)", stacklevel=2)
    if listed is not None:  # files the metadata names that are not there, or that point outside
        seen = {table_name(row.path) for row in rows}
        for name in sorted(set(listed) - seen):
            inside = (root / name).resolve().is_relative_to(root)
            rows.append(ManifestRow(name, "skipped", "listed in metadata, no such image" if inside else "outside root"))
    return rows


def write_manifest(rows: list[ManifestRow], path: Path) -> None:
    write_rows_atomic(rows, _SCHEMA, path)


def read_manifest(path: Path) -> list[ManifestRow]:
    return read_rows(path, ManifestRow, "raw_dataset")


def usable(rows: list[ManifestRow]) -> list[ManifestRow]:
    return [row for row in rows if row.status == "ok"]


_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("status", pa.string()),
        ("skip_reason", pa.string()),
        ("image_sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("caption", pa.string()),
        ("caption_sha256", pa.string()),
        ("caption_original", pa.string()),
        ("caption_source", pa.string()),
        ("dataset", pa.string()),
        ("duplicate_of", pa.string()),
    ]
)
