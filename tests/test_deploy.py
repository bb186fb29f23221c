"""The Kubernetes deployment (deploy/) and the pod tags (assets/k8s.py), checked without a cluster.

No Docker engine, Helm or cluster is needed; nothing is contacted. The files are parsed, and the pod
specs are built by dagster-k8s's own functions, along the path dagster-k8s takes when it launches
pods: the run launcher's config as the Helm chart writes it into dagster.yaml, the code location's
container context as the chart hands it to the code server, run or step tags on top, then
`construct_dagster_k8s_job`. The two small functions that stand in for the chart's templates
(`chart_run_launcher_config`, `chart_container_context`) follow the chart's templates for the keys
deploy/values.yaml uses; the chart itself is not rendered here.

The dagster-k8s half skips when dagster-k8s is not installed (see deploy/README.md, "Versions").
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from assets.k8s import CPU_OP_TAGS, DATA_MOUNT, GPU_RESOURCE, K8S_CONFIG_TAG, PVC_NAME, cpu_op_tags, gpu_op_tags

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NAMESPACE = "chroma"
IMAGE = "registry.example.com/chroma-pipeline:0.1.0"

needs_dagster_k8s = pytest.mark.skipif(
    importlib.util.find_spec("dagster_k8s") is None, reason="dagster-k8s is not installed (deploy/README.md, 'Versions')"
)

# Keys the chart's schema (helm/dagster/schema) knows, as of the 1.13 charts. The chart ignores an
# unknown key in a user deployment without a word, so a typo there would be lost silently.
CHART_USER_DEPLOYMENT_KEYS = {
    "name", "image", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns", "deploymentNamespace",
    "port", "env", "envConfigMaps", "envSecrets", "annotations", "nodeSelector", "affinity", "tolerations",
    "podSecurityContext", "securityContext", "resources", "livenessProbe", "readinessProbe", "startupProbe", "labels",
    "volumeMounts", "volumes", "schedulerName", "initContainers", "sidecarContainers", "deploymentStrategy",
}
CHART_RUN_K8S_CONFIG_KEYS = {  # chart key -> the dagster.yaml key the chart writes it to
    "containerConfig": "container_config",
    "podSpecConfig": "pod_spec_config",
    "podTemplateSpecMetadata": "pod_template_spec_metadata",
    "jobSpecConfig": "job_spec_config",
    "jobMetadata": "job_metadata",
}


# --- the files -----------------------------------------------------------------------------------


def values() -> dict:
    return yaml.safe_load((DEPLOY / "values.yaml").read_text())


def code_location(vals: dict) -> dict:
    deployments = vals["dagster-user-deployments"]["deployments"]
    assert len(deployments) == 1, "one code location"
    return deployments[0]


def env_of(deployment: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in deployment["env"]}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    instructions, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def instruction(name: str) -> list[str]:
    return [args for keyword, args in dockerfile() if keyword == name]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for args in instruction("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def code_server_command() -> list[str]:
    (cmd,) = instruction("CMD")
    return json.loads(cmd)


def under(path: str, directory: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(directory))


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_serves_the_code_location_on_4000_as_a_non_root_user():
    (base,) = instruction("FROM")
    assert base == "python:3.11-slim"
    assert instruction("EXPOSE") == ["4000"]
    command = code_server_command()
    assert command[:3] == ["dagster", "code-server", "start"]
    options = dict(zip(command[3::2], command[4::2], strict=True))
    assert options == {"-h": "0.0.0.0", "-p": "4000", "-m": "assets.definitions"}
    # The module the local workspace loads is the one the image serves.
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text())
    assert workspace["load_from"][0]["python_module"]["module_name"] == options["-m"]
    (user,) = instruction("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root user (runAsNonRoot can check only those)"
    assert under(dockerfile_env()["HF_HOME"], DATA_MOUNT)


def test_dockerfile_installs_the_project_and_the_dagster_libraries_that_match_its_dagster():
    import dagster
    from dagster_shared.libraries import library_version_from_core_version

    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in instruction("ARG") if "=" in a}
    assert set(args) >= {"TORCH_INDEX_URL", "TORCH_SPEC", "DAGSTER_LIBS_VERSION"}
    assert re.search(r"/whl/cu12\d$", args["TORCH_INDEX_URL"]), "the default torch build is a CUDA 12.x one"
    # dagster-k8s / dagster-postgres 0.29.N go with dagster 1.13.N (the rule dagster itself checks).
    assert args["DAGSTER_LIBS_VERSION"] == library_version_from_core_version(dagster.__version__)
    (install,) = [run for run in instruction("RUN") if "dagster-k8s" in run]
    assert "/src[cuda]" in install and "dagster-postgres==${DAGSTER_LIBS_VERSION}" in install, (
        "one pip resolve for the project and the integrations"
    )
    assert instruction("COPY") == [], "the sources are bind-mounted, not copied into a layer"


def test_the_build_context_holds_what_pip_install_needs_and_nothing_else():
    tomllib = pytest.importorskip("tomllib")
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    lines = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert lines[0] == "*"
    kept = {line[1:] for line in lines if line.startswith("!")}
    assert kept == {"pyproject.toml", "README.md", *packages}


# --- values.yaml, pvc.yaml -----------------------------------------------------------------------


def test_values_set_what_the_chart_reads():
    vals = values()
    assert vals["dagster-user-deployments"]["enabled"] is True
    deployment = code_location(vals)
    assert set(deployment) <= CHART_USER_DEPLOYMENT_KEYS, set(deployment) - CHART_USER_DEPLOYMENT_KEYS
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    assert "resources" not in deployment, "the chart would copy them into every run pod"
    assert vals["runLauncher"]["type"] == "K8sRunLauncher"
    run_k8s_config = vals["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    assert set(run_k8s_config) <= set(CHART_RUN_K8S_CONFIG_KEYS)
    coordinator = vals["dagsterDaemon"]["runCoordinator"]
    assert coordinator["enabled"] is True and coordinator["type"] == "QueuedRunCoordinator"
    assert coordinator["config"]["queuedRunCoordinator"]["maxConcurrentRuns"] == 1, "one run per GPU pool"


def test_code_location_port_and_module_match_the_dockerfile():
    deployment = code_location(values())
    command = code_server_command()
    assert str(deployment["port"]) == command[command.index("-p") + 1] == instruction("EXPOSE")[0]
    # The chart runs `dagster code-server start -h 0.0.0.0 -p <port>` + codeServerArgs.
    assert deployment["codeServerArgs"] == command[command.index("-p") + 2:]


def test_config_and_caches_lie_on_the_shared_claim():
    deployment = code_location(values())
    (volume,) = [v for v in deployment["volumes"] if "persistentVolumeClaim" in v]
    assert volume["name"] == volume["persistentVolumeClaim"]["claimName"] == PVC_NAME
    (mount,) = [m for m in deployment["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == DATA_MOUNT
    env = env_of(deployment)
    assert under(env["CHROMA_CONFIG"], mount["mountPath"]) and env["CHROMA_CONFIG"].endswith((".json", ".jsonc"))
    assert under(env["HF_HOME"], mount["mountPath"])
    assert env["HF_HOME"] == dockerfile_env()["HF_HOME"]
    pvc = yaml.safe_load((DEPLOY / "pvc.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == PVC_NAME
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "pods on different nodes mount it at once"


def test_gpu_tags_refuse_zero_gpus():
    with pytest.raises(ValueError):
        gpu_op_tags(0)


# --- pod specs built by dagster-k8s --------------------------------------------------------------


def chart_run_launcher_config(vals: dict, kubeconfig: Path) -> dict:
    """The K8sRunLauncher's dagster.yaml config, as the chart's `dagsterYaml.runLauncher.k8s` writes it.

    Two differences, for a test without a cluster: the kube config comes from a file instead of
    the pod's service account, and the names the chart derives from the release are fixed.
    """
    launcher = vals["runLauncher"]["config"]["k8sRunLauncher"]
    config = {
        "load_incluster_config": False,
        "kubeconfig_file": str(kubeconfig),
        "job_namespace": NAMESPACE,
        "image_pull_policy": "IfNotPresent",
        "service_account_name": "dagster",
        "dagster_home": "/opt/dagster/dagster_home",
        "instance_config_map": "dagster-instance",
        "postgres_password_secret": "dagster-postgresql-secret",
    }
    if launcher.get("runK8sConfig"):
        config["run_k8s_config"] = {
            CHART_RUN_K8S_CONFIG_KEYS[key]: value for key, value in launcher["runK8sConfig"].items() if value
        }
    return config


def chart_container_context(deployment: dict) -> dict:
    """What the chart passes the code server as its container context (`includeConfigInLaunchedRuns`).

    Follows the chart's `dagsterUserDeployments.k8sContainerContext` for the keys values.yaml sets.
    """
    k8s = {
        "image_pull_policy": deployment["image"]["pullPolicy"],
        "env_config_maps": [f"dagster-dagster-user-deployments-{deployment['name']}-user-env"],
        "namespace": NAMESPACE,
        "service_account_name": "dagster-dagster-user-deployments-user-deployments",
        "run_k8s_config": {"pod_spec_config": {"automount_service_account_token": True}},
    }
    for chart_key, key in (("volumeMounts", "volume_mounts"), ("volumes", "volumes"), ("labels", "labels"),
                           ("resources", "resources"), ("env", "env")):
        if deployment.get(chart_key):
            k8s[key] = deployment[chart_key]
    return {"k8s": k8s}


@pytest.fixture
def kubeconfig(tmp_path) -> Path:
    """A kube config that parses and points nowhere: nothing in these tests calls the API."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "none",
        "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "none", "user": {"token": "unused"}}],
        "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
    }))
    return path


def make_launcher(config: dict):
    """The K8sRunLauncher, loaded the way the instance loads it from dagster.yaml."""
    from dagster._serdes.config_class import ConfigurableClassData
    from dagster_k8s import K8sRunLauncher

    return ConfigurableClassData("dagster_k8s", "K8sRunLauncher", yaml.safe_dump(config)).rehydrate(K8sRunLauncher)


def make_run(tags: dict[str, str] | None = None, deployment: dict | None = None):
    """A run of the code location `deployment` (default: values.yaml's), as the launcher receives it."""
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
    from dagster._core.storage.dagster_run import DagsterRun

    repository = RepositoryPythonOrigin(
        executable_path="/usr/local/bin/python", code_pointer=ModuleCodePointer("assets.definitions", "defs", None),
        container_image=IMAGE, container_context=chart_container_context(deployment or code_location(values())),
    )
    return DagsterRun(job_name="full_chain", run_id="0" * 32, tags=tags or {},
                      job_code_origin=JobPythonOrigin("full_chain", repository))


def without_run_gpu(vals: dict) -> dict:
    """values.yaml as deploy/README.md says to change it for the k8s_job_executor."""
    run_k8s_config = vals["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    del run_k8s_config["containerConfig"]["resources"]
    del run_k8s_config["podSpecConfig"]["nodeSelector"], run_k8s_config["podSpecConfig"]["tolerations"]
    return vals


def step_tags(op_tags: dict) -> dict[str, str]:
    """The tags Dagster puts on the step of an asset with these op tags (what the executor reads)."""
    from dagster import Definitions, asset, define_asset_job
    from dagster._core.execution.api import create_execution_plan

    @asset(op_tags=op_tags)
    def step():
        return None

    job = Definitions(assets=[step], jobs=[define_asset_job("one_step", [step])]).resolve_job_def("one_step")
    (planned,) = create_execution_plan(job).steps
    return planned.tags


def run_job_tags(job_tags: dict) -> dict[str, str]:
    """The tags a run of a job defined with these tags carries (what the run launcher reads)."""
    from dagster import Definitions, asset, define_asset_job

    @asset
    def step():
        return None

    return dict(Definitions(assets=[step], jobs=[define_asset_job("one_job", [step], tags=job_tags)])
                .resolve_job_def("one_job").run_tags)


def run_pod(launcher, run):
    """The Job the K8sRunLauncher creates for `run` (its launch path, short of calling the API)."""
    from dagster_k8s import construct_dagster_k8s_job

    context = launcher.get_container_context_for_run(run)
    job_config = context.get_k8s_job_config(job_image=run.job_code_origin.repository_origin.container_image,
                                            run_launcher=launcher)
    return construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_run", "{}"], "dagster-run-test",
                                     user_defined_k8s_config=context.run_k8s_config, component="run_worker")


def step_pod(launcher, run, tags: dict[str, str]):
    """The Job the k8s_job_executor creates for a step with `tags` (its K8sStepHandler path)."""
    from dagster_k8s import construct_dagster_k8s_job
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import get_user_defined_k8s_config

    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=False).merge(
        K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags))
    )
    job_config = context.get_k8s_job_config(job_image=None, run_launcher=launcher).with_image(IMAGE)
    return construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step", "{}"], "dagster-step-test",
                                     user_defined_k8s_config=context.run_k8s_config, component="step_worker")


def assert_mounts_the_shared_claim(pod_spec):
    claims = [v for v in pod_spec.volumes if v.persistent_volume_claim is not None]
    assert [(v.name, v.persistent_volume_claim.claim_name) for v in claims] == [(PVC_NAME, PVC_NAME)], (
        "exactly one volume for the claim: a name listed twice is rejected by the API server"
    )
    (container,) = pod_spec.containers
    assert [(m.name, m.mount_path) for m in container.volume_mounts if m.name == PVC_NAME] == [(PVC_NAME, DATA_MOUNT)]
    env = {e.name: e.value for e in container.env}
    assert under(env["CHROMA_CONFIG"], DATA_MOUNT) and under(env["HF_HOME"], DATA_MOUNT)


def assert_on_gpu_nodes(pod_spec, gpus: int, memory: str):
    (container,) = pod_spec.containers
    assert container.resources.limits == {GPU_RESOURCE: str(gpus), "memory": memory}
    assert container.resources.requests == container.resources.limits
    assert pod_spec.node_selector == {"nvidia.com/gpu.present": "true"}
    assert [(t.key, t.operator, t.effect) for t in pod_spec.tolerations] == [(GPU_RESOURCE, "Exists", "NoSchedule")]
    (shm,) = [v for v in pod_spec.volumes if v.name == "dshm"]
    assert shm.empty_dir.medium == "Memory"
    assert [m.mount_path for m in container.volume_mounts if m.name == "dshm"] == ["/dev/shm"]


@needs_dagster_k8s
def test_our_tags_use_the_key_dagster_k8s_reads():
    from dagster_k8s.job import USER_DEFINED_K8S_CONFIG_KEY, get_user_defined_k8s_config

    assert K8S_CONFIG_TAG == USER_DEFINED_K8S_CONFIG_KEY
    assert set(gpu_op_tags()) == set(CPU_OP_TAGS) == {USER_DEFINED_K8S_CONFIG_KEY}
    # A misspelt tag key is not an error in dagster-k8s: the tags are silently not applied.
    misspelt = {"dagster-k8s/confg": json.dumps(gpu_op_tags()[K8S_CONFIG_TAG])}
    assert get_user_defined_k8s_config(misspelt).container_config == {}


@needs_dagster_k8s
def test_dagster_k8s_rejects_a_misspelt_key_inside_the_tag():
    from dagster._core.errors import DagsterInvalidConfigError
    from dagster_k8s.job import get_user_defined_k8s_config

    def tags_with(change) -> dict[str, str]:
        config = gpu_op_tags()[K8S_CONFIG_TAG]
        change(config)
        return {K8S_CONFIG_TAG: json.dumps(config)}

    get_user_defined_k8s_config(tags_with(lambda c: None))  # the tags as they are: accepted
    with pytest.raises(DagsterInvalidConfigError):
        get_user_defined_k8s_config(tags_with(lambda c: c.update(container_confg=c.pop("container_config"))))
    with pytest.raises(Exception, match="Unexpected keys in model class V1Container"):
        get_user_defined_k8s_config(tags_with(lambda c: c["container_config"].update(resourses={})))
    with pytest.raises(Exception, match="Unexpected keys in model class V1PodSpec"):
        get_user_defined_k8s_config(tags_with(lambda c: c["pod_spec_config"].update(node_selecter={})))


@needs_dagster_k8s
@pytest.mark.parametrize(("gpus", "memory"), [(1, "64Gi"), (4, "200Gi")])
def test_gpu_op_tags_give_the_step_pod_gpus_gpu_nodes_and_the_shared_claim(kubeconfig, gpus, memory):
    launcher = make_launcher(chart_run_launcher_config(without_run_gpu(values()), kubeconfig))
    job = step_pod(launcher, make_run(), step_tags(gpu_op_tags(gpus, memory)))
    pod_spec = job.spec.template.spec
    assert_on_gpu_nodes(pod_spec, gpus, memory)
    # Listed by the tags and by the code location's context: dagster-k8s keeps one of each.
    assert_mounts_the_shared_claim(pod_spec)
    assert pod_spec.termination_grace_period_seconds == 300


@needs_dagster_k8s
def test_gpu_and_cpu_op_tags_mount_the_claim_by_themselves(kubeconfig):
    """A code location that passes no volumes to its runs: the tags alone mount the claim."""
    launcher = make_launcher(chart_run_launcher_config(without_run_gpu(values()), kubeconfig))
    deployment = code_location(values())
    bare = {**deployment, "volumes": [], "volumeMounts": []}
    for tags in (gpu_op_tags(), CPU_OP_TAGS):
        assert_mounts_the_shared_claim(step_pod(launcher, make_run(deployment=bare), step_tags(tags)).spec.template.spec)


@needs_dagster_k8s
def test_cpu_op_tags_keep_the_step_off_gpus_with_the_shared_claim(kubeconfig):
    launcher = make_launcher(chart_run_launcher_config(without_run_gpu(values()), kubeconfig))
    pod_spec = step_pod(launcher, make_run(), step_tags(cpu_op_tags("2", "8Gi"))).spec.template.spec
    (container,) = pod_spec.containers
    assert container.resources.requests == {"cpu": "2", "memory": "8Gi"}
    assert not container.resources.limits
    assert pod_spec.node_selector is None and pod_spec.tolerations is None
    assert_mounts_the_shared_claim(pod_spec)


@needs_dagster_k8s
def test_values_give_the_run_pod_its_gpu_memory_and_the_shared_claim(kubeconfig):
    """Today's executor runs every step in the run pod: values.yaml must size it."""
    vals = values()
    launcher = make_launcher(chart_run_launcher_config(vals, kubeconfig))
    job = run_pod(launcher, make_run())
    pod_spec = job.spec.template.spec
    assert_on_gpu_nodes(pod_spec, 1, "64Gi")
    assert_mounts_the_shared_claim(pod_spec)
    assert pod_spec.security_context.fs_group == code_location(vals)["podSecurityContext"]["fsGroup"] == 1000
    assert pod_spec.termination_grace_period_seconds == 300
    assert pod_spec.containers[0].image == IMAGE


@needs_dagster_k8s
def test_job_tags_resize_the_run_pod(kubeconfig):
    launcher = make_launcher(chart_run_launcher_config(values(), kubeconfig))
    pod_spec = run_pod(launcher, make_run(run_job_tags(gpu_op_tags(4, "200Gi")))).spec.template.spec
    assert_on_gpu_nodes(pod_spec, 4, "200Gi")
    assert_mounts_the_shared_claim(pod_spec)


@needs_dagster_k8s
def test_run_pod_gpu_in_values_reaches_every_step_pod(kubeconfig):
    """Why deploy/README.md says to remove it before switching to the k8s_job_executor."""
    launcher = make_launcher(chart_run_launcher_config(values(), kubeconfig))
    pod_spec = step_pod(launcher, make_run(), step_tags(CPU_OP_TAGS)).spec.template.spec
    assert pod_spec.containers[0].resources.limits[GPU_RESOURCE] == "1"


@needs_dagster_k8s
def test_run_launcher_rejects_a_misspelt_run_k8s_config(kubeconfig):
    from dagster._core.errors import DagsterInvalidConfigError

    config = chart_run_launcher_config(values(), kubeconfig)
    make_launcher(config)  # as written: accepted
    config["run_k8s_config"]["pod_spec_confg"] = config["run_k8s_config"].pop("pod_spec_config")
    with pytest.raises(DagsterInvalidConfigError):
        make_launcher(config)
