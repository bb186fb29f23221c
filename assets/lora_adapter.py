import os

from dagster import AssetExecutionContext, DataVersion, MaterializeResult, PipesSubprocessClient, asset

from chroma_pipeline.launch import launch_command
from chroma_pipeline.lora_adapter import adapter_report, build_adapter, plan_adapter
from resources import ArtifactStore, ChromaConfigResource, GPUResource

from ._metadata import as_dagster_metadata
from ._versions import load_config_for
from .image_latents import image_latents
from .k8s import gpu_op_tags
from .quantized_base_model import quantized_base_model
from .text_embeddings import text_embeddings


# The pod this step gets under dagster-k8s's k8s_job_executor: GPUs, memory, the shared volume
# (deploy/README.md). Under the in-process executor of definitions.py the run's pod is sized instead.
@asset(deps=[image_latents, text_embeddings, quantized_base_model], group_name="chroma", kinds={"safetensors", "pytorch"},
       op_tags=gpu_op_tags())
def lora_adapter(
    context: AssetExecutionContext, chroma: ChromaConfigResource, store: ArtifactStore, gpu: GPUResource,
    pipes: PipesSubprocessClient,
) -> MaterializeResult:
    """A LoRA trained on the cached latents and embeddings, in diffusers format (`pytorch_lora_weights.safetensors`).

    With `num_processes` > 1 or `num_machines` > 1 the training runs in `accelerate launch`
    workers (DDP) through Dagster Pipes: rank 0's log streams into this run, rank 0 reports
    the materialization (data version, metadata, loss curve) back, and cancelling the run
    stops the workers after a checkpoint.
    """
    config = load_config_for(context, chroma, "lora_adapter")
    layout, device = store.layout(config), gpu.info()
    context.log.info(f"training on {device.kind} ({device.name}) in {device.compute_dtype(config.mixed_precision)}")
    gpu_metadata = {f"gpu: {name}": value for name, value in gpu.describe().items()}
    workers = config.num_processes * config.num_machines
    if workers > 1 and not plan_adapter(config, layout, device).trained:
        command = launch_command(chroma.config_path, config, gpu.device)
        if config.num_machines > 1:
            context.log.info(
                f"machine 0 of {config.num_machines}; on each other machine run: python -m chroma_pipeline.launch "
                f"--config <the same config> --machine-rank N (they meet at {config.main_process_ip}:{config.main_process_port})"
            )
        context.log.info(f"launching {workers} training processes: {' '.join(command)}")
        reported = pipes.run(
            command=command, context=context, env={"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
        ).get_materialize_result()
        return MaterializeResult(data_version=reported.data_version, metadata={**reported.metadata, **gpu_metadata})
    result = build_adapter(config, layout, device, log=context.log.info)
    return MaterializeResult(data_version=DataVersion(result.data_version),
                             metadata={**as_dagster_metadata(adapter_report(result)), **gpu_metadata})
