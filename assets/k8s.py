"""Kubernetes pod settings for the pipeline's steps, as `dagster-k8s/config` tags.

Plain dicts: nothing here imports dagster-k8s, so the code location loads without it. dagster-k8s
reads these tags where it runs (the K8sRunLauncher in the daemon, the `k8s_job_executor` in a run
pod); `tests/test_deploy.py` builds real pod specs from them with dagster-k8s's own functions.

Where the same dict takes effect:
- as op tags, `@asset(op_tags=gpu_op_tags(...))`: only under the `k8s_job_executor`, which starts
  each step in its own pod. Under the `in_process_executor` (what `assets/definitions.py` sets
  today) every step runs inside the run's single pod and op tags change nothing;
- as job tags, `define_asset_job(..., tags=gpu_op_tags(...))`: the K8sRunLauncher applies them to
  the run's pod, whichever executor the job uses.

Everything a step reads or writes lives under `output_dir`, so every pod, and every training
process in it, mounts the same PersistentVolumeClaim at the same path (`deploy/pvc.yaml`,
`deploy/values.yaml`). The names below must match those two files; the test checks that they do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

K8S_CONFIG_TAG = "dagster-k8s/config"  # the tag key dagster-k8s reads (dagster_k8s.job.USER_DEFINED_K8S_CONFIG_KEY)
PVC_NAME = "chroma-data"  # the claim in deploy/pvc.yaml
DATA_MOUNT = "/data"  # where every pod mounts it; CHROMA_CONFIG, output_dir and HF_HOME lie under it
GPU_RESOURCE = "nvidia.com/gpu"  # the extended resource NVIDIA's device plugin advertises

# Which nodes have GPUs is cluster-specific. `nvidia.com/gpu.present` is set by NVIDIA's GPU Feature
# Discovery (part of the GPU Operator); managed clusters have their own labels (GKE:
# cloud.google.com/gke-accelerator). GPU node pools are commonly tainted so that only pods that
# tolerate the taint land there; this toleration matches any `nvidia.com/gpu` taint.
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]


def shared_volume(claim_name: str = PVC_NAME, mount_path: str = DATA_MOUNT) -> tuple[dict, dict]:
    """The PVC as a pod volume and its container mount (snake_case keys, as dagster-k8s writes them).

    deploy/values.yaml gives the code location the same volume, and the chart passes it on to the
    pods it launches (`includeConfigInLaunchedRuns`); dagster-k8s drops a volume listed twice only
    when both entries are equal, so this one must stay identical to the one in values.yaml.
    """
    volume = {"name": claim_name, "persistent_volume_claim": {"claim_name": claim_name}}
    mount = {"name": claim_name, "mount_path": mount_path}
    return volume, mount


def gpu_op_tags(
    gpus: int = 1,
    memory: str = "64Gi",
    *,
    claim_name: str = PVC_NAME,
    mount_path: str = DATA_MOUNT,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, str]] | None = None,
) -> dict:
    """Tags for a pod with `gpus` GPUs, `memory` of host memory and the shared volume.

    For `lora_adapter` with `num_processes: N` in the config, ask for N GPUs: `accelerate launch`
    then starts one process per GPU inside that one pod.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, not {gpus}")
    volume, mount = shared_volume(claim_name, mount_path)
    # Kubernetes does not overcommit GPUs: for an extended resource a request must equal its limit,
    # so both are set. Memory request = limit: the scheduler places the pod only where `memory` is
    # free, and a pod that never uses more than it requested is among the last the kubelet evicts
    # when a node runs short of memory.
    resources = {GPU_RESOURCE: str(gpus), "memory": memory}
    # NCCL (DDP between the processes) and DataLoader workers pass tensors through /dev/shm, which
    # a container gets at 64 MiB by default; a memory-backed emptyDir lifts that. Its pages count
    # against the pod's memory limit.
    shm_volume = {"name": "dshm", "empty_dir": {"medium": "Memory"}}
    shm_mount = {"name": "dshm", "mount_path": "/dev/shm"}
    return {
        K8S_CONFIG_TAG: {
            "container_config": {
                "resources": {"limits": dict(resources), "requests": dict(resources)},
                "volume_mounts": [mount, shm_mount],
            },
            "pod_spec_config": {
                "node_selector": dict(GPU_NODE_SELECTOR if node_selector is None else node_selector),
                "tolerations": [dict(t) for t in (GPU_TOLERATIONS if tolerations is None else tolerations)],
                "volumes": [volume, shm_volume],
                # Cancelling deletes the pod's Job and the pod gets SIGTERM; with num_processes > 1 the
                # training processes then finish their step and write a checkpoint (main README, "More
                # than one GPU"), which can take longer than Kubernetes' default grace period of 30 s.
                "termination_grace_period_seconds": 300,
            },
        }
    }


def cpu_op_tags(cpu: str = "1", memory: str = "4Gi", *, claim_name: str = PVC_NAME, mount_path: str = DATA_MOUNT) -> dict:
    """Tags for a step that needs no GPU (the dataset scan: file hashes, image sizes, captions).

    No node selector and no toleration: the pod does not land on GPU nodes that carry a taint. It
    still mounts the shared volume: the scan writes `dataset/manifest.parquet` under `output_dir`.
    """
    volume, mount = shared_volume(claim_name, mount_path)
    return {
        K8S_CONFIG_TAG: {
            "container_config": {"resources": {"requests": {"cpu": cpu, "memory": memory}}, "volume_mounts": [mount]},
            "pod_spec_config": {"volumes": [volume]},
        }
    }


CPU_OP_TAGS = cpu_op_tags()  # for `raw_dataset` under the k8s_job_executor
