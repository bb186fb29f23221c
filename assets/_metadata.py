"""Turning step results into Dagster metadata that reads well in the UI."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from dagster import MetadataValue
from PIL import Image


def image_markdown(image: Image.Image | Path, title: str, max_width: int = 1024) -> MetadataValue:
    """Markdown with the image inlined as a data: URI, which the Dagster UI renders."""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=True)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")


def loss_curve(losses: list[float], validation: list | None = None) -> Image.Image:
    """Training loss (raw and smoothed) per step, and the held-out loss at the steps it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(losses) // 20)
    smoothed = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                for i in range(len(losses))]
    figure, axes = plt.subplots(figsize=(6, 3), dpi=100)
    axes.plot(range(1, len(losses) + 1), losses, alpha=0.35, label="loss")
    axes.plot(range(1, len(losses) + 1), smoothed, label=f"mean of {window}")
    if validation:
        axes.plot([s for s, _ in validation], [v for _, v in validation], "o-", label="held-out (fixed sigmas)")
    axes.set_xlabel("step")
    axes.set_ylabel("flow-matching MSE")
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return Image.open(io.BytesIO(buffer.getvalue()))


def bucket_histogram(buckets: dict[str, int]) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(buckets, key=lambda b: int(b.split("x")[0]) / int(b.split("x")[1]))  # portrait to landscape
    figure, axes = plt.subplots(figsize=(6, 3), dpi=100)
    axes.bar(names, [buckets[name] for name in names])
    axes.set_xlabel("bucket (width x height), portrait to landscape")
    axes.set_ylabel("images")
    axes.tick_params(axis="x", labelrotation=45)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return Image.open(io.BytesIO(buffer.getvalue()))


def markdown_table(header: list[str], rows: list[list]) -> MetadataValue:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return MetadataValue.md("\n".join(lines))
