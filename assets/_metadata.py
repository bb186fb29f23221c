"""Turning a step's description of its result (`chroma_pipeline.report`) into Dagster metadata."""

from __future__ import annotations

from typing import Any

from dagster import MetadataValue

from chroma_pipeline import report
from chroma_pipeline.report import JsonValue, Markdown, PathValue


def as_dagster_metadata(report: dict[str, Any]) -> dict[str, Any]:
    converted = {}
    for name, value in report.items():
        if isinstance(value, Markdown):
            converted[name] = MetadataValue.md(value.text)
        elif isinstance(value, PathValue):
            converted[name] = MetadataValue.path(value.path)
        elif isinstance(value, JsonValue):
            converted[name] = MetadataValue.json(value.data)
        else:
            converted[name] = value
    return converted


def image_markdown(image, title: str) -> MetadataValue:
    """A picture (PIL image or PNG path) inlined in markdown, which the Dagster UI renders."""
    return MetadataValue.md(report.image_markdown(image, title).text)


def markdown_table(header: list[str], rows: list[list], total: int | None = None, rest: str = "") -> MetadataValue:
    return MetadataValue.md(report.markdown_table(header, rows, total, rest).text)
