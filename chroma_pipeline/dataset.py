"""Scan a folder of images with same-stem `.txt` captions into a manifest.

Every file is accounted for: a usable sample gets a row with its content hashes, a
file we cannot use gets a row with the reason. Hashes are of content, never names
or mtimes, so renaming or touching a file changes nothing downstream.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageOps

from .storage import read_rows, sha256_file, sha256_text, write_rows_atomic

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class ManifestRow:
    path: str  # relative to the dataset root, with forward slashes
    status: str  # "ok" or "skipped"
    skip_reason: str = ""
    image_sha256: str = ""
    width: int = 0  # after EXIF orientation
    height: int = 0
    caption: str = ""
    caption_sha256: str = ""


def read_caption(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Windows tools still write cp1252/latin-1; latin-1 never fails, so nothing is lost.
        warnings.warn(f"{path}: caption is not UTF-8; read as latin-1", stacklevel=2)
        text = raw.decode("latin-1")
    return text.strip()


def oriented_size(path: Path) -> tuple[int, int]:
    """Width and height as the image is meant to be seen (EXIF rotation applied); raises if unreadable."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()  # decode fully: a truncated file must fail here, not during encoding
            return ImageOps.exif_transpose(image).size


def scan_dataset(root: Path) -> list[ManifestRow]:
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"instance_data_dir {root} is not a folder; set it to the folder of your images")
    rows: list[ManifestRow] = []
    seen_hashes: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        relative = path.relative_to(root).as_posix()
        if not path.resolve().is_relative_to(root):
            rows.append(ManifestRow(relative, "skipped", "outside root"))
            continue
        caption_path = path.with_suffix(".txt")
        if not caption_path.is_file():
            rows.append(ManifestRow(relative, "skipped", "no caption"))
            continue
        try:
            width, height = oriented_size(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            rows.append(ManifestRow(relative, "skipped", "too large"))
            continue
        except (OSError, ValueError, SyntaxError):
            rows.append(ManifestRow(relative, "skipped", "unreadable"))
            continue
        image_hash = sha256_file(path)
        if image_hash in seen_hashes:
            rows.append(ManifestRow(relative, "skipped", f"duplicate of {seen_hashes[image_hash]}"))
            continue
        seen_hashes[image_hash] = relative
        caption = read_caption(caption_path)
        rows.append(ManifestRow(relative, "ok", "", image_hash, width, height, caption, sha256_text(caption)))
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
    ]
)
