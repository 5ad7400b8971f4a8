"""deploy/: every manifest parses, validates against its schema where one exists offline, agrees with
the other manifests it refers to, and names only entrypoints, configs and files that exist.

Kubernetes objects are checked with kubernetes-validate's bundled schemas (strict: unknown fields
fail); KubeRay's RayCluster/RayJob have no offline schema, so their structure is checked here and
each pod template inside them is validated as a core PodTemplate. The AWS cluster-launcher config is
validated against the schema that ships with Ray.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from reid_platform.cli import build_parser
from reid_platform.config import load_config
from tests import REPO

DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = DEPLOY / "docker" / "mlflow.Dockerfile"
AWS_CONFIG = DEPLOY / "aws" / "ray-cluster.yaml"
README = DEPLOY / "README.md"

K8S_VERSION = "1.37.0"
SHARED_MOUNT = "/mnt/shared"
SHARED_CLAIM = "reid-shared"
TEMPLATE_LABEL = "reid-platform/template"
PLACEHOLDER = "REPLACE_ME"
SENSITIVE = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.IGNORECASE)
CLUSTER_SCOPED = {"Namespace", "StorageClass", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}


# ---------------------------------------------------------------- loading


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def kubernetes_files() -> list[Path]:
    return [path for path in yaml_files() if KUBERNETES in path.parents]


@cache
def load_all(path: Path) -> tuple:
    return tuple(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)


def kubernetes_docs() -> list[tuple[Path, int, dict]]:
    return [(path, index, doc) for path in kubernetes_files() for index, doc in enumerate(load_all(path))]


def docs_of_kind(kind: str) -> list[dict]:
    return [doc for _, _, doc in kubernetes_docs() if doc["kind"] == kind]


def one(kind: str, name: str) -> dict:
    found = [doc for doc in docs_of_kind(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} under deploy/kubernetes, found {len(found)}"
    return found[0]


def doc_id(path: Path, index: int, doc: dict) -> str:
    return f"{path.relative_to(REPO)}#{index}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def is_crd(doc: dict) -> bool:
    return doc["apiVersion"].startswith("ray.io/")


def cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_templates() -> list[tuple[str, dict, dict]]:
    """(where, pod template {metadata, spec}, owning document) for every pod any manifest creates."""
    found = []
    for path, index, doc in kubernetes_docs():
        where = doc_id(path, index, doc)
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind == "Pod":
            found.append((where, {"metadata": doc["metadata"], "spec": spec}, doc))
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            found.append((where, spec["template"], doc))
        elif kind in ("RayCluster", "RayJob"):
            cluster = cluster_spec(doc)
            found.append((f"{where} head", cluster["headGroupSpec"]["template"], doc))
            for group in cluster["workerGroupSpecs"]:
                found.append((f"{where} {group['groupName']}", group["template"], doc))
            if kind == "RayJob" and "submitterPodTemplate" in spec:
                found.append((f"{where} submitter", spec["submitterPodTemplate"], doc))
    return found


def ray_templates() -> list[tuple[str, dict, str]]:
    """(where, pod template, 'head' | 'worker') of the Ray nodes of every RayCluster/RayJob."""
    found = []
    for doc in docs_of_kind("RayCluster") + docs_of_kind("RayJob"):
        cluster = cluster_spec(doc)
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        found.append((f"{name} head", cluster["headGroupSpec"]["template"], "head"))
        for group in cluster["workerGroupSpecs"]:
            found.append((f"{name} {group['groupName']}", group["template"], "worker"))
    return found


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def validate_kubernetes(doc: dict, where: str) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        location = "/".join(str(part) for part in error.absolute_path)
        pytest.fail(f"{where}: {error.message} (at {location or 'top level'})", pytrace=False)


OPERATORS = {"&&", "||", "|", ";", "&", ";;"}


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell line, as argument lists (quotes respected, operators split)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in OPERATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [command for command in [*commands, current] if command]


def quantity(value) -> float:
    """A Kubernetes quantity as a number: '500m' -> 0.5, '48Gi' -> 48 * 2**30, 4 -> 4."""
    text = str(value)
    units = {
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text)
    assert match and (match[2] in units or not match[2]), f"not a quantity: {text!r}"
    return float(match[1]) * units.get(match[2], 1)


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_version(package: str) -> str:
    for requirement in pyproject()["project"]["dependencies"]:
        name, sep, version = requirement.partition("==")
        if re.sub(r"\[.*\]", "", name).strip() == package and sep:
            return version.strip()
    raise AssertionError(f"pyproject.toml does not pin {package} with ==")


# ---------------------------------------------------------------- every YAML file


def test_deploy_folder_has_the_expected_files():
    expected = [
        "docker/Dockerfile", "docker/mlflow.Dockerfile", "README.md", "aws/ray-cluster.yaml",
        "kubernetes/namespace.yaml", "kubernetes/storage.yaml", "kubernetes/mlflow-config.yaml",
        "kubernetes/raycluster.yaml", "kubernetes/rayjob.yaml", "kubernetes/ray-auth.yaml",
    ]  # fmt: skip
    missing = [name for name in expected if not (DEPLOY / name).is_file()]
    assert not missing, f"missing under deploy/: {missing}"
    assert any((KUBERNETES / "mlflow").glob("*.yaml"))


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses(path):
    docs = load_all(path)
    assert docs, f"{path}: no YAML document"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document must be a mapping"


@pytest.mark.parametrize("path", kubernetes_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_kubernetes_documents_name_themselves(path):
    for index, doc in enumerate(load_all(path)):
        where = f"{path.relative_to(REPO)}#{index}"
        for key in ("apiVersion", "kind"):
            assert isinstance(doc.get(key), str) and doc[key], f"{where}: no {key}"
        assert doc.get("metadata", {}).get("name"), f"{where}: no metadata.name"
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace"), f"{where}: namespaced object without metadata.namespace"


def test_namespaces_of_objects_are_defined():
    namespaces = {doc["metadata"]["name"] for doc in docs_of_kind("Namespace")}
    used = {
        doc["metadata"]["namespace"] for _, _, doc in kubernetes_docs() if doc["kind"] not in CLUSTER_SCOPED
    }
    assert used <= namespaces, f"namespaces used but not defined in namespace.yaml: {used - namespaces}"


# ---------------------------------------------------------------- schemas


CORE_DOCS = [(path, index, doc) for path, index, doc in kubernetes_docs() if not is_crd(doc)]


@pytest.mark.parametrize("path,index,doc", CORE_DOCS, ids=[doc_id(*entry) for entry in CORE_DOCS])
def test_core_objects_validate_against_the_kubernetes_schema(path, index, doc):
    validate_kubernetes(doc, doc_id(path, index, doc))


def test_the_core_kinds_are_all_there():
    kinds = {doc["kind"] for _, _, doc in CORE_DOCS}
    expected = {"Namespace", "PersistentVolumeClaim", "ConfigMap", "Secret", "Deployment", "StatefulSet"}
    expected |= {"Service", "NetworkPolicy", "Pod"}
    assert expected <= kinds, f"missing kinds: {expected - kinds}"


def test_the_validator_is_strict():
    """The schema check above would catch a misspelt field (guards against a silently lax validator)."""
    deployment = copy.deepcopy(one("Deployment", "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


POD_TEMPLATES = pod_templates()


@pytest.mark.parametrize("where,template,owner", POD_TEMPLATES, ids=[entry[0] for entry in POD_TEMPLATES])
def test_every_pod_template_validates_as_a_core_pod_template(where, template, owner):
    wrapped = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "check", "namespace": owner["metadata"]["namespace"]},
        "template": template,
    }
    validate_kubernetes(wrapped, where)


# ---------------------------------------------------------------- pods: resources, security, secrets


@pytest.mark.parametrize("where,template,owner", POD_TEMPLATES, ids=[entry[0] for entry in POD_TEMPLATES])
def test_every_container_has_cpu_and_memory_requests_and_limits(where, template, owner):
    for container in containers(template):
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in resources.get(part, {}), (
                    f"{where} {container['name']}: no {part}.{resource}"
                )
            assert quantity(resources["requests"][resource]) <= quantity(resources["limits"][resource])


@pytest.mark.parametrize("where,template,owner", POD_TEMPLATES, ids=[entry[0] for entry in POD_TEMPLATES])
def test_every_pod_runs_as_non_root(where, template, owner):
    pod = template["spec"].get("securityContext", {})
    for container in containers(template):
        context = {**pod, **container.get("securityContext", {})}
        assert context.get("runAsNonRoot") is True, f"{where} {container['name']}: runAsNonRoot is not true"
        assert context.get("runAsUser", 1) != 0, f"{where} {container['name']}: runs as UID 0"
        assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, (
            f"{where} {container['name']}: allowPrivilegeEscalation must be false"
        )
        assert "ALL" in container["securityContext"].get("capabilities", {}).get("drop", []), (
            f"{where} {container['name']}: capabilities are not dropped"
        )
        assert not container["securityContext"].get("privileged", False)


@pytest.mark.parametrize("where,template,owner", POD_TEMPLATES, ids=[entry[0] for entry in POD_TEMPLATES])
def test_no_credential_is_a_literal_env_value(where, template, owner):
    for container in containers(template):
        for variable in container.get("env", []):
            if SENSITIVE.search(variable["name"]):
                assert "value" not in variable and "valueFrom" in variable, (
                    f"{where} {container['name']}: {variable['name']} must come from a Secret, not a literal"
                )
                assert "secretKeyRef" in variable["valueFrom"], (
                    f"{where}: {variable['name']} is not from a Secret"
                )


def secret_variables(container: dict) -> set[str]:
    """The names of the container's environment variables whose values come from a Secret."""
    names = {v["name"] for v in container.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})}
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            keys = one("Secret", source["secretRef"]["name"])["stringData"]
            names |= {source.get("prefix", "") + key for key in keys}
    return names


@pytest.mark.parametrize("where,template,owner", POD_TEMPLATES, ids=[entry[0] for entry in POD_TEMPLATES])
def test_no_container_argument_holds_or_expands_a_secret(where, template, owner):
    """A process's arguments are readable by every user of its node (/proc/PID/cmdline), its
    environment is not: a secret must not reach a command line, literally or by Kubernetes'
    $(VAR) expansion of a variable from a Secret (shell expansion of "$VAR" in a script is fine: the
    shell's own arguments keep the name)."""
    for container in containers(template):
        secrets = secret_variables(container)
        for argument in [*container.get("command", []), *container.get("args", [])]:
            expanded = set(re.findall(r"(?<!\$)\$\((\w+)\)", argument)) & secrets
            assert not expanded, f"{where} {container['name']}: expands {sorted(expanded)} in {argument!r}"
            assert not re.search(r"://[^/@\s]*:[^/@\s]*@", argument), (
                f"{where} {container['name']}: a URI with a password in {argument!r}"
            )
            assert PLACEHOLDER not in argument, f"{where} {container['name']}: a Secret value in {argument!r}"


def test_references_to_secrets_and_configmaps_resolve():
    """Every Secret/ConfigMap a pod reads is defined (or templated) in deploy/, with the keys it reads."""
    defined = {
        (doc["kind"], doc["metadata"]["namespace"], doc["metadata"]["name"]): {
            **doc.get("data", {}),
            **doc.get("stringData", {}),
        }
        for doc in docs_of_kind("Secret") + docs_of_kind("ConfigMap")
    }
    for where, template, owner in POD_TEMPLATES:
        namespace = owner["metadata"]["namespace"]
        for container in containers(template):
            for source in container.get("envFrom", []):
                for field, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if field in source:
                        name = source[field]["name"]
                        assert (kind, namespace, name) in defined, (
                            f"{where}: {kind} {namespace}/{name} is not defined"
                        )
            for variable in container.get("env", []):
                for field, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    ref = variable.get("valueFrom", {}).get(field)
                    if ref:
                        keys = defined.get((kind, namespace, ref["name"]))
                        assert keys is not None, f"{where}: {kind} {namespace}/{ref['name']} is not defined"
                        assert ref["key"] in keys, f"{where}: {kind} {ref['name']} has no key {ref['key']}"
            for volume in template["spec"].get("volumes", []):
                claim = volume.get("persistentVolumeClaim", {}).get("claimName")
                if claim:
                    claims = [
                        d for d in docs_of_kind("PersistentVolumeClaim") if d["metadata"]["name"] == claim
                    ]
                    assert any(d["metadata"]["namespace"] == namespace for d in claims), (
                        f"{where}: PersistentVolumeClaim {namespace}/{claim} is not defined"
                    )


def test_secret_templates_hold_only_placeholders_and_are_marked():
    secrets = docs_of_kind("Secret")
    assert secrets
    for secret in secrets:
        name = secret["metadata"]["name"]
        assert "data" not in secret, f"Secret {name}: use stringData placeholders, never encoded values"
        assert secret["metadata"].get("labels", {}).get(TEMPLATE_LABEL) == "true", (
            f"Secret {name}: a template must carry the label {TEMPLATE_LABEL}: 'true'"
        )
        for key, value in secret["stringData"].items():
            if SENSITIVE.search(key):
                assert value == PLACEHOLDER, f"Secret {name}: {key} must be the placeholder {PLACEHOLDER}"
    for _, _, doc in kubernetes_docs():
        if doc["kind"] != "Secret":
            assert TEMPLATE_LABEL not in doc["metadata"].get("labels", {}), (
                "only Secret templates are skipped"
            )


# ---------------------------------------------------------------- KubeRay


def ray_objects() -> list[dict]:
    return docs_of_kind("RayCluster") + docs_of_kind("RayJob")


def ray_cluster_specs() -> list[tuple[str, dict]]:
    return [(f"{doc['kind']}/{doc['metadata']['name']}", cluster_spec(doc)) for doc in ray_objects()]


def test_there_is_a_raycluster_and_a_rayjob():
    assert [doc["apiVersion"] for doc in docs_of_kind("RayCluster")] == ["ray.io/v1"]
    assert [doc["apiVersion"] for doc in docs_of_kind("RayJob")] == ["ray.io/v1"]


def test_kuberay_cluster_structure():
    ray_version = pinned_version("ray")
    for name, cluster in ray_cluster_specs():
        assert cluster.get("rayVersion") == ray_version, (
            f"{name}: rayVersion must be the pinned ray {ray_version}"
        )
        head = cluster["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict)
        # KubeRay's rayStartParams is map[string]string: a YAML number or boolean is rejected
        assert all(isinstance(value, str) for value in head["rayStartParams"].values()), name
        assert head["rayStartParams"].get("num-gpus") == "0", f"{name}: the head must not offer GPUs"
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", (
            f"{name}: the head Service must stay internal"
        )
        assert head["template"]["spec"]["containers"]
        groups = cluster["workerGroupSpecs"]
        assert groups, f"{name}: no worker group"
        names = [group["groupName"] for group in groups]
        assert len(set(names)) == len(names) and "gpu-workers" in names
        for group in groups:
            where = f"{name} {group['groupName']}"
            for key in ("replicas", "minReplicas", "maxReplicas"):
                assert isinstance(group.get(key), int) and group[key] >= 0, f"{where}: {key}"
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
            assert all(isinstance(value, str) for value in group.get("rayStartParams", {}).values()), where
            assert group["template"]["spec"]["containers"], where


RAY_TOKEN_KEY = "auth_token"  # the key KubeRay reads from authOptions.secretName


def test_every_ray_container_takes_the_token_from_a_secret():
    """Ray's token authentication in every cluster: the operator is told the Secret
    (authOptions.secretName), and every container of the head, of each worker group and the RayJob's
    submitter sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from that Secret (the variables Ray reads;
    reid submit presents RAY_AUTH_TOKEN too), with the token itself in a Secret template."""
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR

    (job,) = docs_of_kind("RayJob")
    submitter = ("RayJob submitter", job["spec"]["submitterPodTemplate"], "submitter")
    checked = 0
    for name, cluster in ray_cluster_specs():
        assert cluster.get("authOptions", {}).get("mode") == "token", f"{name}: token authentication is off"
        secret_name = cluster["authOptions"].get("secretName")
        assert secret_name, f"{name}: authOptions names no Secret (KubeRay would make one no container names)"
        secret = one("Secret", secret_name)
        assert RAY_TOKEN_KEY in secret["stringData"], f"Secret {secret_name}: no {RAY_TOKEN_KEY}"
        nodes = [entry for entry in ray_templates() if entry[0].startswith(f"{name} ")]
        for where, template, _ in nodes + ([submitter] if name.startswith("RayJob/") else []):
            for container in containers(template):
                env = {variable["name"]: variable for variable in container.get("env", [])}
                assert env.get(AUTH_MODE_ENV_VAR, {}).get("value") == "token", (
                    f"{where} {container['name']}: {AUTH_MODE_ENV_VAR} is not token"
                )
                reference = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
                assert reference == {"name": secret_name, "key": RAY_TOKEN_KEY}, (
                    f"{where} {container['name']}: RAY_AUTH_TOKEN is not {secret_name}'s {RAY_TOKEN_KEY}"
                )
                checked += 1
    groups = sum(len(cluster["workerGroupSpecs"]) for _, cluster in ray_cluster_specs())
    assert checked >= len(ray_cluster_specs()) + groups + 1, "a head, each worker group and the submitter"


def test_rayjob_embeds_the_raycluster_spec():
    """The two files spell the cluster out twice; they must not drift apart."""
    (cluster,) = docs_of_kind("RayCluster")
    (job,) = docs_of_kind("RayJob")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]


def test_rayjob_lifecycle():
    (job,) = docs_of_kind("RayJob")
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    assert "command" not in submitter["containers"][0], (
        "KubeRay fills the submit command in only when it is unset"
    )


def test_gpu_workers_request_and_limit_gpus_and_the_head_does_not():
    for where, template, role in ray_templates():
        for container in template["spec"]["containers"]:
            resources = container["resources"]
            requested = resources.get("requests", {}).get("nvidia.com/gpu")
            limited = resources.get("limits", {}).get("nvidia.com/gpu")
            if role == "worker":
                assert limited is not None and quantity(limited) >= 1, f"{where}: no nvidia.com/gpu limit"
                assert requested is not None and quantity(requested) == quantity(limited), (
                    f"{where}: GPU request must equal the limit"
                )
            else:
                assert requested is None and limited is None, f"{where}: the head must not take a GPU"
        if role == "worker":
            tolerations = template["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), (
                f"{where}: no nvidia.com/gpu toleration"
            )


def test_ray_pods_share_storage_and_memory_backed_shm():
    claims = {d["metadata"]["name"]: d for d in docs_of_kind("PersistentVolumeClaim")}
    assert claims[SHARED_CLAIM]["spec"]["accessModes"] == ["ReadWriteMany"], (
        "every node must mount the shared claim"
    )
    for where, template, _ in ray_templates():
        volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
        for container in template["spec"]["containers"]:
            mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
            assert SHARED_MOUNT in mounts, f"{where}: nothing mounted at {SHARED_MOUNT}"
            claim = volumes[mounts[SHARED_MOUNT]].get("persistentVolumeClaim", {}).get("claimName")
            assert claim == SHARED_CLAIM, f"{where}: {SHARED_MOUNT} is not the claim {SHARED_CLAIM}"
            assert "/dev/shm" in mounts, f"{where}: no /dev/shm volume (DALI, NCCL, the object store)"
            assert volumes[mounts["/dev/shm"]].get("emptyDir", {}).get("medium") == "Memory", where


def test_ray_pods_take_the_tracking_uri_from_a_configmap_or_secret():
    maps = {
        (d["metadata"]["namespace"], d["metadata"]["name"]): d.get("data", {})
        for d in docs_of_kind("ConfigMap")
    }
    for where, template, _ in ray_templates():
        namespace = next(
            d["metadata"]["namespace"]
            for d in ray_objects()
            if where.startswith(f"{d['kind']}/{d['metadata']['name']} ")
        )
        for container in template["spec"]["containers"]:
            literal = [v for v in container.get("env", []) if v["name"] == "MLFLOW_TRACKING_URI"]
            assert all("valueFrom" in v and "value" not in v for v in literal), (
                f"{where}: literal tracking URI"
            )
            from_maps = [
                maps.get((namespace, source["configMapRef"]["name"]), {})
                for source in container.get("envFrom", [])
                if "configMapRef" in source
            ]
            assert literal or any("MLFLOW_TRACKING_URI" in data for data in from_maps), (
                f"{where}: MLFLOW_TRACKING_URI comes from no ConfigMap or Secret"
            )


def test_ray_pods_run_as_the_image_user_from_its_workdir():
    uid, _ = dockerfile_user(dockerfile_instructions(DOCKERFILE))
    workdir = dockerfile_workdir(dockerfile_instructions(DOCKERFILE))
    for where, template, _ in ray_templates():
        assert template["spec"]["securityContext"]["runAsUser"] == uid, (
            f"{where}: runAsUser is not the image's UID"
        )
        for container in template["spec"]["containers"]:
            assert container.get("workingDir") == workdir, f"{where}: workingDir is not the image's WORKDIR"


def test_ray_pods_use_the_training_image_placeholder():
    for where, template, _ in pod_templates_of_reid():
        for container in template["spec"]["containers"]:
            assert container["image"] == "registry.example.com/reid/reid-platform:0.1.0", (
                f"{where}: README's render() replaces exactly this image placeholder"
            )


def pod_templates_of_reid() -> list[tuple[str, dict, dict]]:
    return [entry for entry in POD_TEMPLATES if entry[2]["metadata"]["namespace"] == "reid"]


# ---------------------------------------------------------------- the RayJob entrypoint


def entrypoint() -> list[str]:
    (job,) = docs_of_kind("RayJob")
    return shlex.split(job["spec"]["entrypoint"])


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    positional, overrides = [], []
    items = iter(args)
    for item in items:
        if item == "--set":
            overrides.append(next(items))
        elif item.startswith("--set="):
            overrides.append(item.removeprefix("--set="))
        else:
            positional.append(item)
    return positional, overrides


def test_entrypoint_names_files_of_the_repo_that_the_image_holds():
    argv = entrypoint()
    assert argv[0] == "python", argv
    script, config = argv[1], argv[2]
    for path in (script, config):
        assert not PurePosixPath(path).is_absolute(), f"{path}: relative to the image's /app (the repo root)"
        assert (REPO / path).is_file(), f"entrypoint names {path}, which is not in the repo"
    instructions = dockerfile_instructions(DOCKERFILE)
    copies = [copy_sources(args) for instruction, args in instructions if instruction == "COPY"]
    copied = {source.rstrip("/") for sources in copies for source in sources}
    for path in (script, config):
        assert PurePosixPath(path).parts[0] in copied or path in copied, (
            f"the Dockerfile does not copy {path}"
        )


def test_entrypoint_arguments_parse_and_the_overrides_load(monkeypatch):
    uri = one("ConfigMap", "reid-mlflow")["data"]["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what the Ray pods get from the ConfigMap
    argv = entrypoint()
    build_parser().parse_args(["train", *argv[2:]])  # jobs/train.py is `reid train`
    positional, overrides = split_overrides(argv[2:])
    assert positional == [argv[2]], f"unexpected arguments {positional[1:]}"
    cfg = load_config(REPO / argv[2], overrides)  # typed validation of every override
    for path in (cfg.data.shards, cfg.run.storage_path, cfg.run.output_dir):
        assert path.is_absolute() and Path(SHARED_MOUNT) in path.parents, (
            f"{path}: must be on the shared volume"
        )
    assert cfg.scaling.use_gpu
    assert cfg.tracking.uri == uri, "the run must log to the ConfigMap's MLFLOW_TRACKING_URI"
    assert cfg.tracking.registered_model, "the run registers a model (deploy/README.md, step 9)"


def test_the_cluster_fits_the_job():
    argv = entrypoint()
    _, overrides = split_overrides(argv[2:])
    cfg = load_config(REPO / argv[2], overrides)
    (job,) = docs_of_kind("RayJob")
    (group,) = [
        g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu-workers"
    ]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod = quantity(limits["nvidia.com/gpu"])
    scaling = cfg.scaling
    assert group["maxReplicas"] * gpus_per_pod >= scaling.max_workers, "the group cannot grow to the job's maximum"
    assert group["minReplicas"] * gpus_per_pod >= scaling.min_workers, "the smallest group cannot run the job"
    if scaling.elastic:  # pods beyond the minimum come and go with what the job asks for
        assert job["spec"]["rayClusterSpec"].get("enableInTreeAutoscaling"), "an elastic job needs the autoscaler"
    assert quantity(limits["cpu"]) >= cfg.scaling.cpus_per_worker * gpus_per_pod, (
        "not enough CPUs per worker pod"
    )


# ---------------------------------------------------------------- Services, MLflow, network policies


def test_no_service_is_exposed_outside_the_cluster():
    for service in docs_of_kind("Service"):
        kind = service["spec"].get("type", "ClusterIP")
        assert kind == "ClusterIP", f"Service {service['metadata']['name']} is {kind}"
        assert not service["spec"].get("externalIPs")
    assert not docs_of_kind("Ingress"), "no Ingress by default"


def mlflow_container() -> dict:
    (container,) = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    return container


def mlflow_option(name: str) -> str | None:
    args = [*mlflow_container().get("command", []), *mlflow_container().get("args", [])]
    if name not in args:
        return None
    index = args.index(name)
    return args[index + 1] if index + 1 < len(args) and not args[index + 1].startswith("--") else ""


def test_mlflow_server_uses_postgres_s3_and_secrets():
    """The store URI (it holds the database password) reaches the server through its environment,
    from the Secret PostgreSQL takes its credentials from, and names that database's Service."""
    from mlflow.cli import server

    container = mlflow_container()
    command = [*container.get("command", []), *container.get("args", [])]
    assert command[:2] == ["mlflow", "server"], command
    assert mlflow_option("--backend-store-uri") is None, "the store URI holds the password: not an argument"
    (option,) = [param for param in server.params if "--backend-store-uri" in param.opts]
    env = {variable["name"]: variable for variable in container.get("env", [])}
    assert option.envvar in env, f"mlflow server reads the store URI from ${option.envvar}: not set"
    reference = env[option.envvar].get("valueFrom", {}).get("secretKeyRef")
    assert reference, f"{option.envvar} must come from a Secret"
    secret = one("Secret", reference["name"])
    uri = urlsplit(secret["stringData"][reference["key"]])
    assert uri.scheme == "postgresql", uri.geturl()
    assert (uri.username, uri.password) == (secret["stringData"]["POSTGRES_USER"], PLACEHOLDER)
    assert uri.path == "/" + secret["stringData"]["POSTGRES_DB"]
    database = one("StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": reference["name"]}} in database["envFrom"], "not the database's Secret"
    service = one("Service", uri.hostname.split(".")[0])
    assert uri.hostname.split(".")[1] == service["metadata"]["namespace"]
    assert uri.port in [p["port"] for p in service["spec"]["ports"]]
    assert (mlflow_option("--artifacts-destination") or "").startswith("s3://")
    assert mlflow_option("--serve-artifacts") == ""
    assert mlflow_option("--host") == "0.0.0.0"
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        assert "secretKeyRef" in env[variable]["valueFrom"], f"{variable} must come from a Secret"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe


def test_mlflow_image_matches_the_client_version():
    version = pinned_version("mlflow")
    assert mlflow_container()["image"].endswith(f":{version}")
    pins = pip_requirements(dockerfile_instructions(MLFLOW_DOCKERFILE))
    assert f"mlflow=={version}" in pins, "the server runs the MLflow version the training image logs with"
    assert any(pin.startswith("psycopg2") for pin in pins) and any(pin.startswith("boto3") for pin in pins)


def test_tracking_uri_points_at_the_mlflow_service_and_is_allowed_by_it():
    uri = one("ConfigMap", "reid-mlflow")["data"]["MLFLOW_TRACKING_URI"]
    match = re.fullmatch(r"http://(?P<host>[a-z0-9.-]+):(?P<port>\d+)/?", uri)
    assert match, f"{uri}: expected http://SERVICE.NAMESPACE.svc.cluster.local:PORT with no credentials"
    service_name, namespace = match["host"].split(".")[:2]
    service = one("Service", service_name)
    assert service["metadata"]["namespace"] == namespace
    assert int(match["port"]) in [port["port"] for port in service["spec"]["ports"]]
    pod_labels = one("Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items(), "the Service selects no MLflow pod"
    allowed = (mlflow_option("--allowed-hosts") or "").split(",")
    assert f"{match['host']}:{match['port']}" in allowed, (
        "MLflow would refuse the Host header of the in-cluster URI"
    )
    assert any(host.startswith("127.0.0.1") for host in allowed), "kubectl port-forward must be allowed"


def test_mlflow_admits_only_the_reid_namespace():
    policies = [p for p in docs_of_kind("NetworkPolicy") if p["metadata"]["namespace"] == "mlflow"]
    pod_labels = one("Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    (policy,) = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    sources = [source for rule in policy["spec"]["ingress"] for source in rule["from"]]
    assert sources == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "reid"}}}]
    postgres_labels = one("StatefulSet", "postgres")["spec"]["template"]["metadata"]["labels"]
    (database,) = [
        p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= postgres_labels.items()
    ]
    (rule,) = database["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]


def test_ray_network_policy_covers_the_ray_pods():
    (policy,) = [p for p in docs_of_kind("NetworkPolicy") if p["metadata"]["namespace"] == "reid"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for where, template, _ in ray_templates():
        assert selector.items() <= template["metadata"]["labels"].items(), (
            f"{where}: not covered by {policy['metadata']['name']}"
        )


# ---------------------------------------------------------------- AWS cluster launcher


def aws_config() -> dict:
    (config,) = load_all(AWS_CONFIG)
    return config


def test_aws_config_validates_against_rays_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(aws_config(), schema)
    validate_config(prepare_config(copy.deepcopy(aws_config())))  # with Ray's AWS defaults filled in, offline
    broken = {**aws_config(), "head_node_typo": "head"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_aws_cluster_shape():
    config = aws_config()
    assert config["provider"]["type"] == "aws" and config["auth"]["ssh_user"] == "ubuntu"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [node for name, node in types.items() if name != config["head_node_type"]]
    assert any(node["resources"].get("GPU", 0) >= 1 for node in workers), "no GPU worker type"
    cfg = load_config(REPO / "configs/market1501_r50.yaml")
    for node in workers:
        gpus = node["resources"].get("GPU", 0)
        assert node["resources"]["CPU"] >= cfg.scaling.cpus_per_worker * gpus, (
            "too few CPUs for one worker per GPU"
        )
        assert node["min_workers"] <= node["max_workers"] <= config["max_workers"]
        assert node["node_config"]["InstanceType"] and node["node_config"]["ImageId"].startswith("ami-")
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start, (
        "the dashboard must stay on localhost"
    )
    assert "--dashboard-host=0.0.0.0" not in head_start
    setup = " ".join(config["setup_commands"])
    assert SHARED_MOUNT in setup, f"the setup must mount the shared file system at {SHARED_MOUNT}"


def test_the_aws_submit_command_fits_the_aws_cluster():
    (args,) = [
        args for line in readme_commands() for args in reid_invocations(line)
        if args[:1] == ["submit"] and "http://10.0.1.23:5000" in " ".join(args)
    ]  # fmt: skip
    _, overrides = split_overrides(args[2:])
    scaling = load_config(REPO / args[1], overrides).scaling
    config = aws_config()
    (gpu_node,) = [node for node in config["available_node_types"].values() if node["resources"].get("GPU")]
    gpus = gpu_node["resources"]["GPU"]
    assert scaling.elastic and scaling.use_gpu
    assert gpu_node["min_workers"] * gpus >= scaling.min_workers, "the smallest cluster cannot start the job"
    assert min(gpu_node["max_workers"], config["max_workers"]) * gpus >= scaling.max_workers, "the cluster cannot grow to the job"


def test_aws_config_names_existing_repo_paths():
    config = aws_config()
    remote_to_local = {}
    for remote, local in config["file_mounts"].items():
        assert (REPO / local).exists(), f"file_mounts source {local} is not in the repo"
        remote_to_local[remote] = REPO / local
    lists = ("setup_commands", "head_setup_commands", "worker_setup_commands")
    lists += ("head_start_ray_commands", "worker_start_ray_commands")
    commands = [command for key in lists for command in config.get(key, [])]
    named = 0
    for command in commands:
        for token in shlex.split(command.replace("~", "/home/" + config["auth"]["ssh_user"])):
            for remote, local in remote_to_local.items():
                if token == remote or token.startswith(remote + "/"):
                    target = local / token[len(remote) :].lstrip("/")
                    assert target.exists(), f"{command!r} names {token}, i.e. {target}, which does not exist"
                    named += 1
            if re.fullmatch(r"(configs/\S+\.ya?ml|jobs/\S+\.py)", token):
                assert (REPO / token).is_file(), f"{command!r} names {token}, which is not in the repo"
    assert named, "the setup commands should install the mounted checkout"
    assert (remote_to_local["/home/ubuntu/reid-platform"] / "pyproject.toml").is_file()


# ---------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_args(instructions) -> dict[str, str]:
    return dict(arg.split("=", 1) for keyword, arg in instructions if keyword == "ARG" and "=" in arg)


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), text)


def dockerfile_user(instructions) -> tuple[int, str]:
    users = [expand(arg, dockerfile_args(instructions)) for keyword, arg in instructions if keyword == "USER"]
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user.isdigit(), f"USER {users[-1]}: use a numeric UID so that runAsNonRoot can check it"
    return int(user), users[-1]


def dockerfile_workdir(instructions) -> str:
    return [arg for keyword, arg in instructions if keyword == "WORKDIR"][-1]


def copy_sources(args: str) -> list[str]:
    tokens = [token for token in shlex.split(args) if not token.startswith("--")]
    return tokens[:-1]


def pip_requirements(instructions) -> list[str]:
    """The package arguments of every `pip install` in RUN instructions ('-r' for a requirements file)."""
    packages = []
    variables = dockerfile_args(instructions)
    for keyword, arg in instructions:
        if keyword != "RUN":
            continue
        for tokens in shell_commands(expand(arg, variables)):
            if "pip" in [PurePosixPath(t).name for t in tokens[:3]] and "install" in tokens:
                rest = iter(tokens[tokens.index("install") + 1 :])
                for token in rest:
                    if token in ("-r", "--requirement", "-c", "--constraint"):
                        next(rest)
                        packages.append("-r")
                    elif token in ("--index-url", "--extra-index-url", "-i"):
                        next(rest)
                    elif not token.startswith("-"):
                        packages.append(token)
    return packages


def test_training_dockerfile_base_is_a_pinned_cuda_runtime():
    instructions = dockerfile_instructions(DOCKERFILE)
    bases = [
        expand(arg, dockerfile_args(instructions)).split()[0]
        for keyword, arg in instructions
        if keyword == "FROM"
    ]
    assert len(bases) == 1
    image, _, tag = bases[0].partition(":")
    assert image == "nvidia/cuda", bases[0]
    assert tag and tag != "latest" and "runtime" in tag, f"{bases[0]}: pin a CUDA *runtime* tag"
    assert re.match(r"12\.\d+\.\d+-", tag), f"{bases[0]}: pin CUDA 12.x.y (DALI is built for CUDA 12)"
    assert pinned_version("nvidia-dali-cuda120")


def test_dockerfiles_run_as_non_root():
    for path in (DOCKERFILE, MLFLOW_DOCKERFILE):
        uid, user = dockerfile_user(dockerfile_instructions(path))
        assert uid != 0 and user.split(":")[0] != "root", f"{path.name}: USER {user}"


def test_dockerfiles_pin_every_python_package():
    for path in (DOCKERFILE, MLFLOW_DOCKERFILE):
        packages = pip_requirements(dockerfile_instructions(path))
        assert packages, f"{path.name}: no pip install"
        for package in packages:
            assert package in (".", "-r") or re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[\w.]+", package), (
                f"{path.name}: {package} is not pinned with =="
            )
    for requirement in pyproject()["project"]["dependencies"]:
        name = re.split(r"[<>=\[ ]", requirement)[0]
        if name in ("torch", "torchvision", "ray", "nvidia-dali-cuda120", "webdataset", "mlflow"):
            assert "==" in requirement, f"pyproject.toml must pin {name} exactly (the image installs from it)"


def test_training_dockerfile_installs_the_project_from_its_copied_sources():
    instructions = dockerfile_instructions(DOCKERFILE)
    sources = [source for keyword, args in instructions if keyword == "COPY" for source in copy_sources(args)]
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repo"
    copied = {source.rstrip("/") for source in sources}
    assert {"pyproject.toml", "reid_platform", "jobs", "configs"} <= copied
    assert "." in pip_requirements(instructions), "the image must `pip install .`"
    assert dockerfile_workdir(instructions) == "/app"


def test_dockerfiles_bake_in_no_secrets():
    for path in (DOCKERFILE, MLFLOW_DOCKERFILE):
        for keyword, arg in dockerfile_instructions(path):
            if keyword in ("ENV", "ARG"):
                for name in re.findall(r"(\w+)=", arg) or [arg.split()[0]]:
                    assert not SENSITIVE.search(name), (
                        f"{path.name}: {keyword} {name} looks like a credential"
                    )
            if keyword == "COPY":
                assert not any(re.search(r"\.env|credentials|\.pem|id_rsa", s) for s in copy_sources(arg))


# ---------------------------------------------------------------- README


def readme_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def reid_invocations(line: str) -> Iterator[list[str]]:
    """The argument lists of every `reid ...` a shell line runs: as a command (after VAR=value
    assignments), after `--` (kubectl exec), or inside a quoted command string (ray exec '...')."""
    try:
        commands = shell_commands(line)
    except ValueError:
        return
    for tokens in commands:
        position = 0
        while position < len(tokens) and re.fullmatch(r"\w+=\S*", tokens[position]):
            position += 1
        if "--" in tokens and tokens.index("--") >= position:
            starts = [position, tokens.index("--") + 1]
        else:
            starts = [position]
        for start in starts:
            if start < len(tokens) and tokens[start] == "reid":
                yield tokens[start + 1 :]
        for token in tokens:
            if " " in token and re.search(r"(^|\s|&&\s*)reid\s", token):
                yield from reid_invocations(token)


def test_readme_names_only_existing_deploy_files_and_all_of_them():
    text = README.read_text()
    named = set(re.findall(r"deploy/[\w./-]*\w", text))
    missing = sorted(path for path in named if not (REPO / path).exists())
    assert not missing, f"deploy/README.md names missing paths: {missing}"
    files = {str(p.relative_to(REPO)) for p in DEPLOY.rglob("*") if p.is_file() and p != README}
    assert files <= named, f"deploy/README.md does not mention {sorted(files - named)}"
    for token in re.findall(r"\b(?:configs|jobs)/[\w./-]*\w", text):
        assert (REPO / token).exists(), f"deploy/README.md names {token}, which is not in the repo"


def test_readme_reid_commands_parse():
    parser = build_parser()
    count = 0
    for line in readme_commands():
        for args in reid_invocations(line):
            args = [re.sub(r"\$\(?\w+\)?|\$\{\w+\}", "x", arg) for arg in args]
            try:
                parser.parse_args(args)
            except SystemExit:
                pytest.fail(f"deploy/README.md: `reid {' '.join(args)}` does not parse", pytrace=False)
            count += 1
    assert count >= 10, f"expected the walkthrough's reid commands, found {count}"


def test_readme_render_placeholders_are_the_manifests():
    text = README.read_text()
    manifests = "\n".join(path.read_text() for path in kubernetes_files())
    for placeholder in re.findall(r'-e "s#([^#]+)#', text):
        assert placeholder in manifests, f"render() replaces {placeholder!r}, which no manifest contains"
    assert "storageClassName: shared-rwx" in (KUBERNETES / "storage.yaml").read_text()
    assert re.search(
        r"helm install kuberay-operator kuberay/kuberay-operator --version \d+\.\d+\.\d+", text
    ), "pin the KubeRay chart version"


def test_readme_submit_command_matches_the_rayjob():
    """`reid submit` in the walkthrough runs what the RayJob runs (plus the in-cluster tracking URI)."""
    _, job_overrides = split_overrides(entrypoint()[2:])
    submits = [
        args for line in readme_commands() for args in reid_invocations(line)
        if args[:1] == ["submit"] and "svc.cluster.local" in " ".join(args)  # to the Kubernetes cluster
    ]  # fmt: skip
    assert submits
    for args in submits:
        assert args[1] == entrypoint()[2], "same config as the RayJob"
        _, overrides = split_overrides(args[2:])
        assert set(job_overrides) <= set(overrides), (
            f"reid submit lacks {set(job_overrides) - set(overrides)}"
        )
        assert any(o.startswith("tracking.uri=") for o in overrides) and "--no-tracking-check" in args
