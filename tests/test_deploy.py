"""The Kubernetes deployment (deploy/) and the pod tags (assets/k8s.py), checked without a cluster.

No Docker engine, Helm or cluster is needed; nothing is contacted. The files are parsed, and the pod
specs are built by dagster-k8s's own functions, along the path dagster-k8s takes when it launches
pods: the run launcher's config as the Helm chart writes it into dagster.yaml, the code location's
container context as the chart hands it to the code server, run or step tags on top, then
`construct_dagster_k8s_job`. The two small functions that stand in for the chart's templates
(`chart_run_launcher_config`, `chart_container_context`) follow the chart's templates for the keys
deploy/values.yaml uses; the chart itself is not rendered here.

Only Dagster's public API is used: no private modules, no underscore attributes. dagster-k8s is
in the dev extra, pinned with dagster (deploy/README.md, "Versions"): without it its tests fail.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml
from dagster import DagsterInstance, DagsterInvalidConfigError, Definitions, asset, define_asset_job

from assets.k8s import CPU_OP_TAGS, DATA_MOUNT, GPU_RESOURCE, K8S_CONFIG_TAG, PVC_NAME, cpu_op_tags, gpu_op_tags

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NAMESPACE = "chroma"
IMAGE = "registry.example.com/chroma-pipeline:0.1.0"

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
    import dagster_k8s
    from dagster import __version__ as dagster_version

    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in instruction("ARG") if "=" in a}
    assert set(args) >= {"TORCH_INDEX_URL", "TORCH_SPEC", "DAGSTER_LIBS_VERSION"}
    assert re.search(r"/whl/cu12\d$", args["TORCH_INDEX_URL"]), "the default torch build is a CUDA 12.x one"
    # dagster-k8s / dagster-postgres 0.X.N go with dagster 1.Y.N where X = Y + 16 (0.16 was the
    # libraries' version when dagster went 1.0): 0.29.27 with 1.13.27. The rule dagster itself checks
    # at import, for a release version (no pre/post suffix: the project pins releases).
    major, minor, micro = (int(part) for part in dagster_version.split("."))
    assert major == 1
    assert args["DAGSTER_LIBS_VERSION"] == f"0.{minor + 16}.{micro}"
    # and it is the dagster-k8s these tests build pods with (the dev extra pins the same pair)
    assert args["DAGSTER_LIBS_VERSION"] == dagster_k8s.__version__
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


@pytest.fixture
def k8s_instance(tmp_path):
    """Makes a DagsterInstance whose dagster.yaml sets the K8sRunLauncher with a given config.

    The instance loads the launcher from that file itself (`instance.run_launcher`), as the daemon's
    and the webserver's instances load it from the dagster.yaml the chart mounts; its storage is
    SQLite under tmp_path.
    """
    instances = []

    def make(launcher_config: dict) -> DagsterInstance:
        home = tmp_path / f"dagster_home_{len(instances)}"
        home.mkdir()
        (home / "dagster.yaml").write_text(yaml.safe_dump(
            {"run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": launcher_config}}
        ))
        instance = DagsterInstance.local_temp(str(home))
        instances.append(instance)
        return instance

    yield make
    for instance in instances:
        instance.dispose()


def one_asset_job(*, op_tags: dict | None = None, job_tags: dict | None = None):
    """(the asset, the job of that one asset), the asset with `op_tags`, the job with `job_tags`."""

    @asset(op_tags=op_tags)
    def step():
        return None

    return step, Definitions(assets=[step], jobs=[define_asset_job("one_step", [step], tags=job_tags)]).resolve_job_def(
        "one_step"
    )


def make_run(instance: DagsterInstance, tags: dict[str, str] | None = None):
    """A run with `tags`, created and stored by the instance (what the launcher and the executor receive)."""
    _, job = one_asset_job()
    return instance.create_run_for_job(job, tags=tags)


def without_run_gpu(vals: dict) -> dict:
    """values.yaml as deploy/README.md says to change it for the k8s_job_executor."""
    run_k8s_config = vals["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    del run_k8s_config["containerConfig"]["resources"]
    del run_k8s_config["podSpecConfig"]["nodeSelector"], run_k8s_config["podSpecConfig"]["tolerations"]
    return vals


def step_tags(instance: DagsterInstance, op_tags: dict) -> dict[str, str]:
    """The tags Dagster puts on the step of an asset with these op tags (what the executor reads).

    Read from the execution plan Dagster builds and stores for a run of the asset's job; the
    k8s_job_executor reads the same step tags from the same plan, built in the run pod.
    """
    step, job = one_asset_job(op_tags=op_tags)
    run = instance.create_run_for_job(job)
    (planned,) = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id).steps
    # A step's tags are its op's tags (`AssetsDefinition.op.tags`), with those of the op's invocation
    # on top; an asset's op is invoked without any.
    assert planned.tags == step.op.tags
    # Dagster stores the dict as the JSON string that dagster-k8s parses (`op_tags`: "Values that are
    # not strings will be json encoded").
    assert isinstance(planned.tags[K8S_CONFIG_TAG], str)
    assert json.loads(planned.tags[K8S_CONFIG_TAG]) == op_tags[K8S_CONFIG_TAG]
    return dict(planned.tags)


def run_job_tags(job_tags: dict) -> dict[str, str]:
    """The tags a run of a job defined with these tags carries (what the run launcher reads)."""
    _, job = one_asset_job(job_tags=job_tags)
    return dict(job.run_tags)


def container_context(instance: DagsterInstance, run, location_context: dict | None, *, include_run_tags: bool):
    """`K8sContainerContext.create_for_run(run, launcher, include_run_tags)` for a run of a code location
    with the container context `location_context` (default: the one the chart gives values.yaml's).

    A run carries its code location's container context in its code origin, which only Dagster's
    private origin classes build; the runs here come from `instance.create_run_for_job`, without one.
    So the parts are composed here with dagster-k8s's public K8sContainerContext, in the order
    `create_for_run` composes them (dagster-k8s 0.29.27): the launcher's settings (create_for_run
    itself, for a run without a code origin), then over them the user-defined part, i.e. the code
    location's context (`create_from_config`) with, for a run pod, the run's dagster-k8s/config tag
    on top, checked against the launcher's allowlists. test_composed_container_context_is_the_launchers
    checks the composition against `create_for_run` itself, for a run without a code location context.
    """
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import get_user_defined_k8s_config

    if location_context is None:
        location_context = chart_container_context(code_location(values()))
    launcher = instance.run_launcher
    assert run.job_code_origin is None, "create_for_run would add the code origin's context a second time"
    launcher_part = K8sContainerContext.create_for_run(run, launcher, include_run_tags=False)
    user_part = K8sContainerContext().merge(K8sContainerContext.create_from_config(location_context))
    if include_run_tags:
        user_part = user_part.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(run.tags)))
    user_part = user_part.validate_user_k8s_config_for_run(
        launcher.only_allow_user_defined_k8s_config_fields, launcher.only_allow_user_defined_env_vars
    )
    return launcher_part.merge(user_part)


def run_pod(instance: DagsterInstance, run, location_context: dict | None = None):
    """The Job the K8sRunLauncher creates for `run` (its launch path, short of calling the API)."""
    return run_pod_from(instance, container_context(instance, run, location_context, include_run_tags=True))


def run_pod_from(instance: DagsterInstance, context):
    """The K8sRunLauncher's Job for a run with this container context."""
    from dagster_k8s import construct_dagster_k8s_job

    # The launcher takes the image from the run's code origin, where the code server puts its own: IMAGE.
    job_config = context.get_k8s_job_config(job_image=IMAGE, run_launcher=instance.run_launcher)
    return construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_run", "{}"], "dagster-run-test",
                                     user_defined_k8s_config=context.run_k8s_config, component="run_worker")


def step_pod(instance: DagsterInstance, run, tags: dict[str, str], location_context: dict | None = None):
    """The Job the k8s_job_executor creates for a step with `tags` (its K8sStepHandler path)."""
    from dagster_k8s import construct_dagster_k8s_job
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import get_user_defined_k8s_config

    context = container_context(instance, run, location_context, include_run_tags=False).merge(
        K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags))
    )
    job_config = context.get_k8s_job_config(job_image=None, run_launcher=instance.run_launcher).with_image(IMAGE)
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


def test_our_tags_use_the_key_dagster_k8s_reads():
    from dagster_k8s.job import USER_DEFINED_K8S_CONFIG_KEY, get_user_defined_k8s_config

    assert K8S_CONFIG_TAG == USER_DEFINED_K8S_CONFIG_KEY
    assert set(gpu_op_tags()) == set(CPU_OP_TAGS) == {USER_DEFINED_K8S_CONFIG_KEY}
    # A misspelt tag key is not an error in dagster-k8s: the tags are silently not applied.
    misspelt = {"dagster-k8s/confg": json.dumps(gpu_op_tags()[K8S_CONFIG_TAG])}
    assert get_user_defined_k8s_config(misspelt).container_config == {}


def test_dagster_k8s_rejects_a_misspelt_key_inside_the_tag():
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


@pytest.mark.parametrize(("gpus", "memory"), [(1, "64Gi"), (4, "200Gi")])
def test_gpu_op_tags_give_the_step_pod_gpus_gpu_nodes_and_the_shared_claim(k8s_instance, kubeconfig, gpus, memory):
    instance = k8s_instance(chart_run_launcher_config(without_run_gpu(values()), kubeconfig))
    job = step_pod(instance, make_run(instance), step_tags(instance, gpu_op_tags(gpus, memory)))
    pod_spec = job.spec.template.spec
    assert_on_gpu_nodes(pod_spec, gpus, memory)
    # Listed by the tags and by the code location's context: dagster-k8s keeps one of each.
    assert_mounts_the_shared_claim(pod_spec)
    assert pod_spec.termination_grace_period_seconds == 300


def test_gpu_and_cpu_op_tags_mount_the_claim_by_themselves(k8s_instance, kubeconfig):
    """A code location that passes no volumes to its runs: the tags alone mount the claim."""
    instance = k8s_instance(chart_run_launcher_config(without_run_gpu(values()), kubeconfig))
    deployment = code_location(values())
    bare = chart_container_context({**deployment, "volumes": [], "volumeMounts": []})
    for tags in (gpu_op_tags(), CPU_OP_TAGS):
        pod_spec = step_pod(instance, make_run(instance), step_tags(instance, tags), bare).spec.template.spec
        assert_mounts_the_shared_claim(pod_spec)


def test_cpu_op_tags_keep_the_step_off_gpus_with_the_shared_claim(k8s_instance, kubeconfig):
    instance = k8s_instance(chart_run_launcher_config(without_run_gpu(values()), kubeconfig))
    pod_spec = step_pod(instance, make_run(instance), step_tags(instance, cpu_op_tags("2", "8Gi"))).spec.template.spec
    (container,) = pod_spec.containers
    assert container.resources.requests == {"cpu": "2", "memory": "8Gi"}
    assert not container.resources.limits
    assert pod_spec.node_selector is None and pod_spec.tolerations is None
    assert_mounts_the_shared_claim(pod_spec)


def test_values_give_the_run_pod_its_gpu_memory_and_the_shared_claim(k8s_instance, kubeconfig):
    """Today's executor runs every step in the run pod: values.yaml must size it."""
    vals = values()
    instance = k8s_instance(chart_run_launcher_config(vals, kubeconfig))
    job = run_pod(instance, make_run(instance))
    pod_spec = job.spec.template.spec
    assert_on_gpu_nodes(pod_spec, 1, "64Gi")
    assert_mounts_the_shared_claim(pod_spec)
    assert pod_spec.security_context.fs_group == code_location(vals)["podSecurityContext"]["fsGroup"] == 1000
    assert pod_spec.termination_grace_period_seconds == 300
    assert pod_spec.containers[0].image == IMAGE


def test_job_tags_resize_the_run_pod(k8s_instance, kubeconfig):
    instance = k8s_instance(chart_run_launcher_config(values(), kubeconfig))
    pod_spec = run_pod(instance, make_run(instance, run_job_tags(gpu_op_tags(4, "200Gi")))).spec.template.spec
    assert_on_gpu_nodes(pod_spec, 4, "200Gi")
    assert_mounts_the_shared_claim(pod_spec)


def test_composed_container_context_is_the_launchers(k8s_instance, kubeconfig):
    """`container_context` composes what `K8sRunLauncher.get_container_context_for_run` does.

    Checked where both can run: a run with job tags and no code location context. Should dagster-k8s
    change its order or add a part, this fails first.
    """
    instance = k8s_instance(chart_run_launcher_config(values(), kubeconfig))
    run = make_run(instance, run_job_tags(gpu_op_tags(4, "200Gi")))
    launchers = instance.run_launcher.get_container_context_for_run(run)
    composed = container_context(instance, run, {}, include_run_tags=True)
    assert composed == launchers
    # and so the pods built from them
    assert run_pod(instance, run, {}).to_dict() == run_pod_from(instance, launchers).to_dict()


def test_run_pod_gpu_in_values_reaches_every_step_pod(k8s_instance, kubeconfig):
    """Why deploy/README.md says to remove it before switching to the k8s_job_executor."""
    instance = k8s_instance(chart_run_launcher_config(values(), kubeconfig))
    pod_spec = step_pod(instance, make_run(instance), step_tags(instance, CPU_OP_TAGS)).spec.template.spec
    assert pod_spec.containers[0].resources.limits[GPU_RESOURCE] == "1"


def test_run_launcher_rejects_a_misspelt_run_k8s_config(k8s_instance, kubeconfig):
    from dagster_k8s import K8sRunLauncher

    config = chart_run_launcher_config(values(), kubeconfig)
    assert isinstance(k8s_instance(config).run_launcher, K8sRunLauncher)  # as written: accepted
    config["run_k8s_config"]["pod_spec_confg"] = config["run_k8s_config"].pop("pod_spec_config")
    with pytest.raises(DagsterInvalidConfigError):
        k8s_instance(config).run_launcher  # noqa: B018 (the launcher loads from dagster.yaml on first use)
