"""The six Dagster assets of the chain; each is a thin call into the `chroma_pipeline` module of the same name."""

from .image_latents import image_latents
from .lora_adapter import lora_adapter
from .quantized_base_model import quantized_base_model
from .raw_dataset import raw_dataset
from .text_embeddings import text_embeddings
from .validation_grid import validation_grid

ALL_ASSETS = [raw_dataset, image_latents, text_embeddings, quantized_base_model, lora_adapter, validation_grid]

__all__ = [
    "ALL_ASSETS", "raw_dataset", "image_latents", "text_embeddings", "quantized_base_model", "lora_adapter",
    "validation_grid",
]
