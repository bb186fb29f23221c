"""Where a dataset's image bytes come from: a local folder, or a Hugging Face dataset.

A Hugging Face dataset (`type: huggingface`) is read through the `datasets` library: a
folder written by `save_to_disk`, or a Hub id (downloaded into the Hugging Face cache
the first time). Its samples are named `row-<index>` in its split, and their image bytes
are read straight from the Arrow table, never re-encoded, so their hashes are stable.
"""

from __future__ import annotations

import functools
from pathlib import Path

from .databackend import ImageDataset
from .dataset import ManifestRow, ScanOptions, image_row, is_inside


def read_image(dataset: ImageDataset, relative: str) -> bytes:
    """The stored bytes of one image of `dataset` (`relative`: its path in the dataset)."""
    if dataset.type == "huggingface":
        table = _hf_split(dataset.dataset_name, dataset.split, dataset.image_column, dataset.revision)
        return _image_bytes(table[int(relative.removeprefix("row-"))][dataset.image_column], dataset)
    return (dataset.root / relative).read_bytes()


def scan_huggingface(dataset: ImageDataset, options: ScanOptions) -> list[ManifestRow]:
    table = _hf_split(dataset.dataset_name, dataset.split, dataset.image_column, dataset.revision)
    columns = [dataset.caption_column] if isinstance(dataset.caption_column, str) else list(dataset.caption_column)
    missing = [c for c in columns if c not in table.column_names]
    if options.caption_strategy != "instanceprompt" and missing:
        raise ValueError(f"dataset {dataset.id!r}: {dataset.dataset_name} has no column {missing[0]!r} "
                         f"(columns: {table.column_names}); set `caption_column`")
    rows, seen_hashes = [], {}
    for index, record in enumerate(table):
        relative = f"row-{index:06d}"
        if options.caption_strategy == "instanceprompt":
            original, source = options.instance_prompt, "instanceprompt"
        else:
            # A list of caption columns: the first that has text, as SimpleTuner reads them.
            texts = [record.get(c) for c in columns]
            texts = [t[0] if isinstance(t, list) and t else t for t in texts]
            original = next((str(t) for t in texts if isinstance(t, str) and t.strip()), None)
            source = "metadata"
        if original is None:
            if options.caption_fallback != "empty":
                rows.append(ManifestRow(relative, "skipped", "no caption"))
                continue
            original, source = "", "empty"
        try:
            data = _image_bytes(record[dataset.image_column], dataset)
        except ValueError as exc:
            rows.append(ManifestRow(relative, "skipped", str(exc)))
            continue
        rows.append(image_row(relative, data, original, source, options, seen_hashes))
    return rows


def _image_bytes(value, dataset: ImageDataset) -> bytes:
    """The image's bytes, embedded in the table or in the file a row names (an image-folder dataset
    stores paths). A path is read only inside the dataset's folder or the Hugging Face caches."""
    if isinstance(value, dict) and value.get("bytes"):
        return value["bytes"]
    path = Path(value["path"]) if isinstance(value, dict) and value.get("path") else None
    if path is None:
        raise ValueError("no image in this row")
    if not any(is_inside(path, root) for root in _readable_roots(dataset)):
        raise ValueError("image path outside the dataset and the Hugging Face caches")
    return path.read_bytes()


def _readable_roots(dataset: ImageDataset) -> list[Path]:
    import datasets
    from huggingface_hub import constants

    roots = [Path(datasets.config.HF_DATASETS_CACHE), Path(constants.HF_HUB_CACHE)]
    if Path(dataset.dataset_name).is_dir():
        roots.append(Path(dataset.dataset_name))
    return [root.resolve() for root in roots]


@functools.lru_cache(maxsize=8)  # per process: scan, and each VAE worker, opens the table once
def _hf_split(name: str, split: str, image_column: str, revision: str | None):
    try:
        import datasets
    except ImportError:
        raise RuntimeError("a `type: huggingface` dataset needs the `datasets` library: pip install datasets") from None
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"dataset_name {name!r} is not a folder (a Hub id looks like 'owner/name')")
    if Path(name).is_dir():
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{name} has splits {list(loaded)}, not {split!r}; set `split`")
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(name, split=split, revision=revision)
    if image_column not in loaded.column_names:
        raise ValueError(f"{name} has no image column {image_column!r} (columns: {loaded.column_names}); set `image_column`")
    # The stored bytes, not decoded pixels: hashes and latents read exactly what the dataset holds.
    return loaded.cast_column(image_column, datasets.Image(decode=False))
