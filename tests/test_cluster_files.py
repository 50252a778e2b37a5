"""The deployment files under cluster/ parse and agree with the code.

Checks, without starting Ray or talking to a cloud or Kubernetes:
  * every YAML file parses (all documents);
  * cluster/aws.yaml passes the cluster launcher's own checks: Ray's ``prepare_config``
    (defaults for the provider) then ``validate_config`` (ray-schema.json and more);
  * every Kubernetes manifest has apiVersion, kind and metadata.name; Ray kinds use ray.io/v1;
    claims and ConfigMaps that pods mount are defined under cluster/kuberay/;
  * every runtime env (cluster/runtime_env.yaml, each RayJob's runtimeEnvYAML) is accepted
    by ``ray.runtime_env.RuntimeEnv`` and its pip list matches pyproject.toml's dependencies;
  * every ``python jobs/<x>.py --config configs/<y>.yaml key=value ...`` found in these files
    (YAML strings, manifests embedded in ConfigMaps, README code blocks) names a job and a
    config that exist, and the config with those overrides passes ``bertray.config_loader.load_config``.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from bertray.config import PredictConfig, RunConfig
from bertray.config_loader import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
K8S_FILES = sorted(p for p in YAML_FILES if p.parent.name == "kuberay")
README = CLUSTER / "README.md"

JOB_CONFIG_CLASS = {"jobs/predict.py": PredictConfig}  # every other job takes a RunConfig
RAY_KINDS = {"RayCluster", "RayJob", "RayService", "RayCronJob"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def docs_or_none(path: Path) -> list:
    """For collecting test cases: a file that does not parse is reported by test_yaml_parses."""
    try:
        return [d for d in load_docs(path) if isinstance(d, dict)]
    except yaml.YAMLError:
        return []


def embedded_manifests(doc: dict) -> list[dict]:
    """Manifests kept as text in a ConfigMap (``data: {x.yaml: "..."}``)."""
    if doc.get("kind") != "ConfigMap":
        return []
    out = []
    for key, text in (doc.get("data") or {}).items():
        if key.endswith((".yaml", ".yml")):
            out.extend(d for d in yaml.safe_load_all(text) if d is not None)
    return out


def k8s_manifests(with_embedded_flag: bool = False) -> list[tuple]:
    """``(where, manifest)`` for each Kubernetes object in cluster/kuberay/, embedded ones included."""
    found = []
    for path in K8S_FILES:
        for doc in docs_or_none(path):
            found.append((rel(path), doc, False))
            name = (doc.get("metadata") or {}).get("name")
            try:
                found.extend((f"{rel(path)} (ConfigMap {name})", m, True) for m in embedded_manifests(doc))
            except yaml.YAMLError:
                pass  # reported by test_yaml_parses
    return found if with_embedded_flag else [(where, m) for where, m, _ in found]


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def ray_jobs() -> list[tuple[str, dict]]:
    return [(where, m) for where, m in k8s_manifests() if m.get("kind") == "RayJob"]


# ----------------------------------------------------------------------------- entrypoints

ENTRY = re.compile(r"\bpython3?\s+(jobs/[\w-]+\.py)(?=\s|$)")
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")
SHELL_OPERATORS = set("();<>|&")


def parse_entrypoints(text: str) -> list[tuple[str, list[str]]]:
    """``(job, argv)`` for each ``python jobs/<x>.py ...``; argv stops at a shell operator or comment."""
    text = text.replace("\\\n", " ")  # shell line continuations
    found = []
    for m in ENTRY.finditer(text):
        line = text[m.end() :].split("\n", 1)[0]
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        argv = []
        for token in lexer:
            if token and set(token) <= SHELL_OPERATORS:
                break
            argv.append(token)
        found.append((m.group(1), argv))
    return found


def readme_code() -> str:
    if not README.exists():
        return ""
    return "\n".join(re.findall(r"^```[^\n]*\n(.*?)^```", README.read_text(), flags=re.M | re.S))


def without_embedded_text(doc: dict) -> dict:
    """``doc`` less the manifest texts of a ConfigMap: those are scanned once parsed, since a
    folded YAML string spans several lines of the raw text."""
    if doc.get("kind") != "ConfigMap":
        return doc
    data = {k: v for k, v in (doc.get("data") or {}).items() if not k.endswith((".yaml", ".yml"))}
    return {**doc, "data": data}


def collect_entrypoints() -> list[tuple[str, str, list[str]]]:
    found = []
    for path in YAML_FILES:
        docs = docs_or_none(path)
        embedded = [m for where, m in k8s_manifests() if where.startswith(f"{rel(path)} (")]
        for doc in [without_embedded_text(d) for d in docs] + embedded:
            for s in strings(doc):
                found.extend((rel(path), job, argv) for job, argv in parse_entrypoints(s))
    found.extend((rel(README), job, argv) for job, argv in parse_entrypoints(readme_code()))
    return found


ENTRYPOINTS = collect_entrypoints()


def test_entrypoints_are_found():
    # The scan must see the runs these files exist for, or the test below checks nothing.
    yaml_jobs = {job for where, job, _ in ENTRYPOINTS if where.endswith(".yaml")}
    assert {"jobs/train.py", "jobs/predict.py"} <= yaml_jobs, ENTRYPOINTS
    readme_jobs = {job for where, job, _ in ENTRYPOINTS if where.endswith(".md")}
    assert {"jobs/train.py", "jobs/tune.py", "jobs/predict.py"} <= readme_jobs, ENTRYPOINTS


@pytest.mark.parametrize(
    ("where", "job", "argv"), ENTRYPOINTS, ids=[f"{w}:{j}:{i}" for i, (w, j, _) in enumerate(ENTRYPOINTS)]
)
def test_entrypoint_names_existing_job_and_valid_config(where, job, argv):
    assert (ROOT / job).is_file(), f"{where}: {job} does not exist"
    args = list(argv)
    config = None
    if args and args[0] == "--config" and len(args) > 1:
        config = args[1]
        args = args[2:]
    elif args and args[0].startswith("--config="):
        config = args[0].partition("=")[2]
        args = args[1:]
    assert config, f"{where}: `python {job}` must be followed by --config configs/<name>.yaml, got {argv}"
    assert (ROOT / config).is_file(), f"{where}: {job} --config {config}: the config file does not exist"
    bad = [a for a in args if not OVERRIDE.match(a)]
    assert not bad, f"{where}: {job}: after --config only key=value overrides are allowed, got {bad}"
    # A value the shell fills in ($PWD, $(date ...)) is not known here; its key is skipped.
    overrides = [a for a in args if "$" not in a and "`" not in a]
    load_config(ROOT / config, overrides, JOB_CONFIG_CLASS.get(job, RunConfig))


def test_parse_entrypoints():
    text = (
        "ray job submit --working-dir . -- python jobs/train.py --config configs/smoke.yaml \\\n"
        "    scaling.num_workers=2 output_dir='/tmp/a b'  # comment\n"
        "echo; python3 jobs/predict.py --config=configs/predict.yaml output=s3://b/dt={date} >> log 2>&1\n"
    )
    assert parse_entrypoints(text) == [
        ("jobs/train.py", ["--config", "configs/smoke.yaml", "scaling.num_workers=2", "output_dir=/tmp/a b"]),
        ("jobs/predict.py", ["--config=configs/predict.yaml", "output=s3://b/dt={date}"]),
    ]


# ----------------------------------------------------------------------------- YAML and schemas


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{rel(path)} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{rel(path)}: every document must be a mapping"
        embedded_manifests(doc)  # embedded manifests parse too


def test_aws_cluster_config_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert raw["provider"]["type"] == "aws"
    # What `ray up` does before launching anything: fill in the provider's defaults, then
    # check the result against ray-schema.json and the cross-field rules.
    validate_config(prepare_config(copy.deepcopy(raw)))
    node_types = raw["available_node_types"]
    assert raw["head_node_type"] in node_types
    workers = [t for name, t in node_types.items() if name != raw["head_node_type"]]
    assert workers and all(t.get("min_workers", 0) == 0 for t in workers), "workers should scale from 0"


def test_kubernetes_manifests_have_identity():
    manifests = k8s_manifests(with_embedded_flag=True)
    assert {m.get("kind") for _, m, _ in manifests} >= {"RayCluster", "RayJob", "CronJob"}
    for where, m, embedded in manifests:
        assert isinstance(m.get("apiVersion"), str) and m["apiVersion"], f"{where}: apiVersion missing"
        assert isinstance(m.get("kind"), str) and m["kind"], f"{where}: kind missing"
        meta = m.get("metadata") or {}
        # A manifest kept for `kubectl create` (a nightly RayJob) may use generateName instead.
        name = meta.get("name") or (meta.get("generateName") if embedded else None)
        assert isinstance(name, str) and name, f"{where}: {m['kind']} needs metadata.name"
        if m["kind"] in RAY_KINDS:
            assert m["apiVersion"] == "ray.io/v1", f"{where}: {m['kind']} must use apiVersion ray.io/v1"


def test_kubernetes_references_resolve():
    manifests = k8s_manifests()
    defined = {(m["kind"], m["metadata"].get("name")) for _, m in manifests}

    def refs(node, key):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == key:
                    yield v
                yield from refs(v, key)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v, key)

    for where, m in manifests:
        for claim in refs(m, "persistentVolumeClaim"):
            assert ("PersistentVolumeClaim", claim["claimName"]) in defined, (
                f"{where}: no PVC {claim['claimName']}"
            )
        for cm in refs(m, "configMap"):
            assert ("ConfigMap", cm["name"]) in defined, f"{where}: no ConfigMap {cm['name']}"
        if m["kind"] == "CronJob":
            assert len(m["spec"]["schedule"].split()) == 5, (
                f"{where}: schedule is not a 5-field cron expression"
            )


def test_ray_image_versions_agree():
    text = "\n".join(p.read_text() for p in YAML_FILES)
    versions = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text))
    versions |= set(re.findall(r"rayVersion:\s*\"?(\d+\.\d+\.\d+)", text))
    assert len(versions) == 1, f"cluster files name several Ray versions: {sorted(versions)}"


# ----------------------------------------------------------------------------- runtime envs


def project_dependencies() -> dict[str, str]:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = (Requirement(d) for d in deps)
    # Ray is the cluster's own; a runtime env must not install another one.
    return {r.name.lower(): str(r.specifier) for r in reqs if r.name.lower() != "ray"}


def runtime_envs() -> list[tuple[str, dict]]:
    envs = [("cluster/runtime_env.yaml", (docs_or_none(CLUSTER / "runtime_env.yaml") or [{}])[0])]
    envs += [
        (where, yaml.safe_load(m["spec"]["runtimeEnvYAML"]))
        for where, m in ray_jobs()
        if "runtimeEnvYAML" in m["spec"]
    ]
    return envs


@pytest.mark.parametrize(("where", "env"), runtime_envs(), ids=[w for w, _ in runtime_envs()])
def test_runtime_env_is_valid_and_matches_pyproject(where, env):
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # raises on unknown fields and bad values
    pip = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    listed = {(r := Requirement(p)).name.lower(): str(r.specifier) for p in pip}
    assert listed == project_dependencies(), f"{where}: pip list differs from pyproject.toml's dependencies"
    assert env.get("env_vars", {}).get("TOKENIZERS_PARALLELISM") == "false", where


def test_rayjobs_ship_their_code():
    jobs = ray_jobs()
    assert jobs
    for where, m in jobs:
        env = yaml.safe_load(m["spec"].get("runtimeEnvYAML") or "{}")
        # The submitter pod has no checkout of the repository: a local working_dir ships
        # nothing useful. Without working_dir the code must be in the image.
        if "working_dir" in env:
            assert "://" in env["working_dir"], f"{where}: working_dir must be a remote .zip URI"
