"""What a step tells the user about its result: numbers, tables and pictures, without Dagster.

Steps describe their results with plain values and three small wrappers (`Markdown`,
`PathValue`, `JsonValue`). The Dagster assets turn these into `MetadataValue`s; a
training worker under `accelerate launch` sends the same description through Dagster
Pipes (`as_pipes_metadata`). One description, two routes, the same page in the UI.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Markdown:
    text: str


@dataclass(frozen=True)
class PathValue:
    path: str


@dataclass(frozen=True)
class JsonValue:
    data: Any


def as_pipes_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The description in Dagster Pipes' wire format ({"raw_value", "type"} for anything but plain numbers)."""
    wire = {}
    for name, value in metadata.items():
        if isinstance(value, Markdown):
            wire[name] = {"raw_value": value.text, "type": "md"}
        elif isinstance(value, PathValue):
            wire[name] = {"raw_value": value.path, "type": "path"}
        elif isinstance(value, JsonValue):
            wire[name] = {"raw_value": value.data, "type": "json"}
        else:
            wire[name] = value
    return wire


def image_markdown(image: Image.Image | Path, title: str, max_width: int = 1024) -> Markdown:
    """Markdown with the image inlined as a data: URI, which the Dagster UI renders."""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=True)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return Markdown(f"![{title}](data:image/png;base64,{encoded})")


def markdown_table(header: list[str], rows: list[list], total: int | None = None, rest: str = "") -> Markdown:
    """A table of `rows`; when they are the first of `total`, a line under it says how many more and `rest`
    (where to find them), so the metadata stays the same size however large the dataset."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    if total is not None and total > len(rows):
        lines += ["", f"The first {len(rows):,} of {total:,}; {total - len(rows):,} more not shown{rest}."]
    return Markdown("\n".join(lines))


def _figure_to_image(figure) -> Image.Image:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return Image.open(io.BytesIO(buffer.getvalue()))


def _axes():
    import matplotlib

    matplotlib.use("Agg")  # no display: render to PNG only
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 3), dpi=100)


def loss_curve(losses: list[float], validation: list | None = None) -> Image.Image:
    """Training loss (raw and smoothed) per step, and the held-out loss at the steps it was measured."""
    window = max(1, len(losses) // 20)
    smoothed = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                for i in range(len(losses))]
    figure, axes = _axes()
    axes.plot(range(1, len(losses) + 1), losses, alpha=0.35, label="loss")
    axes.plot(range(1, len(losses) + 1), smoothed, label=f"mean of {window}")
    if validation:
        axes.plot([s for s, _ in validation], [v for _, v in validation], "o-", label="held-out (fixed sigmas)")
    axes.set_xlabel("step")
    axes.set_ylabel("flow-matching MSE")
    axes.legend()
    return _figure_to_image(figure)


def bucket_histogram(buckets: dict[str, int]) -> Image.Image:
    names = sorted(buckets, key=lambda b: int(b.split("x")[0]) / int(b.split("x")[1]))  # portrait to landscape
    figure, axes = _axes()
    axes.bar(names, [buckets[name] for name in names])
    axes.set_xlabel("bucket (width x height), portrait to landscape")
    axes.set_ylabel("images")
    axes.tick_params(axis="x", labelrotation=45)
    return _figure_to_image(figure)
