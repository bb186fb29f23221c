from dagster import ConfigurableResource

from chroma_pipeline.device import DeviceInfo, detect_device, seed_everything


class GPUResource(ConfigurableResource):
    """The accelerator: CUDA, ROCm, Apple MPS, or the CPU when there is none.

    Assets get device, dtypes, memory figures and quantization support from here and
    never ask torch.cuda themselves. `device` pins one ("cuda:1", "cpu").
    """

    device: str = "auto"

    def info(self) -> DeviceInfo:
        return detect_device(self.device)

    def describe(self) -> dict:
        info = self.info()
        return {
            "device": f"{info.kind} ({info.name})",
            "bf16": info.supports_bf16,
            "quantization backends": ", ".join(info.quantization_backends),
            "free memory GiB": round(info.free_memory_bytes() / 2**30, 2),
        }

    def seed(self, seed: int) -> None:
        seed_everything(seed)
