"""The cluster configs in cluster/, checked without starting anything.

- cluster/aws.yaml and cluster/gcp.yaml go through what ``ray up`` does before it calls the cloud: Ray's
  ``prepare_config`` (the provider's defaults.yaml merged in, node types filled out) and ``validate_config``
  (Ray's shipped ray-schema.json). Then what a user relies on, on the config ``ray up`` would run: no GPU
  on the head, a ``kge`` CPU type and an ``lm`` GPU type, token auth on every ``ray start``, the dashboard
  on 127.0.0.1, the Ray token from the cloud's secret store, the CUDA torch on the GPU type and the CPU torch
  elsewhere, then the lock file, then the project.
- cluster/rayjob.yaml goes through the vendored KubeRay RayJob CRD's v1 openAPIV3Schema (unknown fields
  rejected, as ``kubectl apply``'s strict field validation does), then the same user-facing properties.
- cluster/requirements.lock, cluster/Dockerfile and the docs: the lock is what make_lock.sh writes, the
  versions agree, and no file holds a secret.

Each property check returns a list of problems; the tests of broken copies show that each check can fail.
"""

from __future__ import annotations

import copy
import json
import lzma
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHERS = ("aws", "gcp")
CRD = REPO / "tests" / "vendor" / "kuberay" / "ray.io_rayjobs.yaml.xz"
LOCK = CLUSTER / "requirements.lock"
SECRET_STORE = {"aws": "aws secretsmanager get-secret-value", "gcp": "gcloud secrets versions access"}
TORCH_INSTALL = re.compile(r"pip install torch==(\S+) --index-url https://download\.pytorch\.org/whl/(\w+)")
DASHBOARD_ANYWHERE = re.compile(r"--dashboard-host[= ]+['\"]?0\.0\.0\.0")
DASHBOARD_LOCAL = re.compile(r"--dashboard-host[= ]+['\"]?(127\.0\.0\.1|localhost)\b")


def raw_launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())


def ray_up(raw: dict) -> dict:
    """What ``ray up`` builds and validates before touching the cloud (ray.autoscaler._private.commands.
    _bootstrap_config): the provider's defaults merged, then ray-schema.json. Raises on an invalid config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def torch_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==", 1)[1] for d in deps if d.startswith("torch=="))


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


# --- the launcher YAMLs ------------------------------------------------------------------------------------


def gpu_hardware(provider: str, node_config: dict) -> bool:
    """Whether the machine itself has a GPU (Ray autodetects AWS GPUs from the instance type)."""
    if provider == "aws":
        return re.match(r"(g|p)\d", node_config.get("InstanceType", "")) is not None
    return bool(node_config.get("guestAccelerators")) or re.match(r"(g2|a2|a3|a4)-", node_config.get("machineType", "")) is not None


def setup_commands(cfg: dict, node_type: str) -> list[str]:
    """The setup commands a node of this type runs (Ray's NodeUpdater: a type's own worker_setup_commands
    replace the merged setup_commands + worker_setup_commands)."""
    if node_type == cfg["head_node_type"]:
        return cfg["head_setup_commands"]
    return cfg["available_node_types"][node_type].get("worker_setup_commands", cfg["worker_setup_commands"])


def start_commands(cfg: dict, node_type: str) -> list[str]:
    return cfg["head_start_ray_commands" if node_type == cfg["head_node_type"] else "worker_start_ray_commands"]


def launcher_problems(provider: str, cfg: dict) -> list[str]:
    """What a user relies on, on a prepared (``ray up``) config; [] when all holds."""
    problems = []
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    res = {name: t.get("resources", {}) for name, t in types.items()}
    if res[head].get("GPU", 0) or gpu_hardware(provider, types[head]["node_config"]):
        problems.append(f"head type {head} has a GPU")
    kge = [n for n in types if res[n].get("kge", 0) >= 1 and n != head]
    lm = [n for n in types if res[n].get("lm", 0) >= 1 and n != head]
    if len(kge) != 1:
        problems.append(f"want one worker type with the kge resource, got {kge}")
    if len(lm) != 1:
        problems.append(f"want one worker type with the lm resource, got {lm}")
    for n in kge:
        if res[n].get("GPU", 0) or gpu_hardware(provider, types[n]["node_config"]) or res[n].get("CPU", 1) < 1:
            problems.append(f"kge type {n} must be CPUs without a GPU")
    for n in lm:
        if res[n].get("GPU", 0) < 1 or not gpu_hardware(provider, types[n]["node_config"]) or res[n].get("CPU", 0) < 1:
            problems.append(f"lm type {n} must have CPUs and GPU >= 1 on a GPU machine")
    mount = next((remote for remote, local in cfg["file_mounts"].items() if local in (".", "./")), None)
    if mount is None:
        problems.append("the checkout (.) is not in file_mounts")
    for pattern in (".venv", ".git", "runs"):
        if not any(e.strip("/") == pattern for e in cfg["rsync_exclude"]):
            problems.append(f"rsync_exclude misses {pattern}")
    for name in types:
        setup, start = setup_commands(cfg, name), start_commands(cfg, name)
        for c in setup + start:
            if DASHBOARD_ANYWHERE.search(c):
                problems.append(f"{name}: dashboard bound to 0.0.0.0: {c!r}")
            if re.search(r"RAY_AUTH_TOKEN=\S", c) or "AWS_SECRET_ACCESS_KEY" in c:
                problems.append(f"{name}: a credential in a command: {c!r}")
        starts = [c for c in start if "ray start" in c]
        if not starts:
            problems.append(f"{name}: no ray start")
        for c in starts:
            if not re.search(r"\bRAY_AUTH_MODE=token\b.*\bray start\b", c, re.DOTALL):
                problems.append(f"{name}: ray start without RAY_AUTH_MODE=token: {c!r}")
            if name == head and not DASHBOARD_LOCAL.search(c):
                problems.append(f"{name}: the head's ray start does not bind the dashboard to 127.0.0.1: {c!r}")
        tokens = [c for c in setup if "~/.ray/auth_token" in c]
        if not any(SECRET_STORE[provider] in c and "> ~/.ray/auth_token" in c for c in tokens):
            problems.append(f"{name}: ~/.ray/auth_token is not written from {SECRET_STORE[provider]!r}")
        if mount and any(mount in c for c in tokens):
            problems.append(f"{name}: the token comes from the synced repo")
        torch = [(i, m) for i, c in enumerate(setup) for m in TORCH_INSTALL.finditer(c)]
        want = "cu128" if res[name].get("GPU", 0) >= 1 else "cpu"
        if [(m[1], m[2]) for _, m in torch] != [(torch_pin(), want)]:
            problems.append(f"{name}: want one torch=={torch_pin()} from the {want} index, got {[m[0] for _, m in torch]}")
        lock = [i for i, c in enumerate(setup) if re.search(rf"pip install -r {re.escape(str(mount))}/cluster/requirements\.lock\b", c)]
        project = [i for i, c in enumerate(setup) if re.search(rf"pip install --no-deps -e {re.escape(str(mount))}/?$", c)]
        if not (torch and lock and project and torch[0][0] < lock[0] < project[0]):
            problems.append(f"{name}: setup must install torch, then {mount}/cluster/requirements.lock, then the project")
    return problems


@pytest.mark.parametrize("provider", LAUNCHERS)
def test_launcher_passes_ray_up_validation(provider):
    cfg = ray_up(raw_launcher(provider))
    assert cfg["provider"]["type"] == provider
    assert set(cfg["available_node_types"]) == {"head", "kge_cpu", "lm_gpu"}


@pytest.mark.parametrize("provider", LAUNCHERS)
def test_launcher_holds_what_users_rely_on(provider):
    assert launcher_problems(provider, ray_up(raw_launcher(provider))) == []


@pytest.mark.parametrize("provider", LAUNCHERS)
def test_launcher_schema_rejects_unknown_keys(provider):
    from ray.autoscaler._private.util import prepare_config, validate_config

    top = raw_launcher(provider)
    top["dashboard_host"] = "127.0.0.1"
    with pytest.raises(jsonschema.ValidationError, match="dashboard_host"):
        ray_up(top)
    typo = raw_launcher(provider)
    typo["available_node_types"]["lm_gpu"]["worker_setup_command"] = typo["available_node_types"]["lm_gpu"].pop("worker_setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="worker_setup_command"):
        ray_up(typo)
    fractional = raw_launcher(provider)
    fractional["available_node_types"]["lm_gpu"]["resources"]["GPU"] = 0.5  # the schema wants integers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(fractional))


def _broken(provider: str, change) -> list[str]:
    raw = raw_launcher(provider)
    change(raw, raw["available_node_types"])
    return launcher_problems(provider, ray_up(raw))


@pytest.mark.parametrize("provider", LAUNCHERS)
def test_launcher_checks_catch_broken_configs(provider):
    gpu_machine = {"aws": ("InstanceType", "g5.2xlarge"), "gcp": ("machineType", "g2-standard-8")}[provider]
    cpu_machine = {"aws": ("InstanceType", "c6i.4xlarge"), "gcp": ("machineType", "c2-standard-16")}[provider]

    def has(problems, text):
        return any(text in p for p in problems)

    assert has(_broken(provider, lambda c, t: t["head"]["resources"].update(GPU=1)), "head type head has a GPU")
    assert has(_broken(provider, lambda c, t: t["head"]["node_config"].__setitem__(*gpu_machine)), "head type head has a GPU")
    assert has(_broken(provider, lambda c, t: t["kge_cpu"]["resources"].pop("kge")), "the kge resource")
    assert has(_broken(provider, lambda c, t: t["kge_cpu"]["resources"].update(GPU=1)), "kge type kge_cpu")
    assert has(_broken(provider, lambda c, t: t["lm_gpu"]["resources"].pop("GPU")), "lm type lm_gpu")
    assert has(_broken(provider, lambda c, t: t["lm_gpu"]["node_config"].__setitem__(*cpu_machine)), "lm type lm_gpu")
    assert has(_broken(provider, lambda c, t: t["lm_gpu"]["resources"].pop("lm")), "the lm resource")
    # without our start commands `ray up` takes Ray's defaults: no token auth, the dashboard on 0.0.0.0
    defaults = _broken(provider, lambda c, t: c.pop("head_start_ray_commands"))
    assert has(defaults, "ray start without RAY_AUTH_MODE=token") and has(defaults, "dashboard bound to 0.0.0.0")
    no_auth = _broken(provider, lambda c, t: c.__setitem__(
        "worker_start_ray_commands", [s.replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled") for s in c["worker_start_ray_commands"]]))
    assert has(no_auth, "kge_cpu: ray start without RAY_AUTH_MODE=token")
    exposed = _broken(provider, lambda c, t: c.__setitem__(
        "head_start_ray_commands", [s.replace("127.0.0.1", "0.0.0.0") for s in c["head_start_ray_commands"]]))
    assert has(exposed, "head: dashboard bound to 0.0.0.0")
    # setup: the wrong torch build, no lock, no token, the token from a file of the repo
    swap = {"cpu": "cu128", "cu128": "cpu"}

    def swap_torch(cmds):
        return [TORCH_INSTALL.sub(lambda m: m[0].replace(m[2], swap[m[2]]), s) for s in cmds]

    assert has(_broken(provider, lambda c, t: t["lm_gpu"].__setitem__("worker_setup_commands", swap_torch(t["lm_gpu"]["worker_setup_commands"]))),
               "from the cu128 index")
    assert has(_broken(provider, lambda c, t: t["kge_cpu"].__setitem__("worker_setup_commands", swap_torch(t["kge_cpu"]["worker_setup_commands"]))),
               "from the cpu index")
    assert has(_broken(provider, lambda c, t: t["kge_cpu"].pop("worker_setup_commands")), "kge_cpu: want one torch")
    assert has(_broken(provider, lambda c, t: c.__setitem__("head_setup_commands", [s for s in c["head_setup_commands"] if "requirements.lock" not in s or "-c " in s])),
               "then ~/bikd/cluster/requirements.lock")
    assert has(_broken(provider, lambda c, t: c.__setitem__("head_setup_commands", [s for s in c["head_setup_commands"] if "auth_token" not in s])),
               "head: ~/.ray/auth_token is not written")
    assert has(_broken(provider, lambda c, t: c["head_setup_commands"].insert(0, "cp ~/bikd/cluster/auth_token ~/.ray/auth_token")),
               "the token comes from the synced repo")
    assert has(_broken(provider, lambda c, t: c["rsync_exclude"].remove(".venv/")), "rsync_exclude misses .venv")


# --- the KubeRay RayJob ------------------------------------------------------------------------------------


def _strict(schema):
    """Unknown fields rejected wherever the CRD lists an object's fields (kubectl's strict field validation;
    the API server would otherwise drop them silently)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@cache
def rayjob_validator() -> jsonschema.Draft4Validator:
    with lzma.open(CRD) as f:
        crd = yaml.load(f.read(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # safe; C for speed
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayJob"
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft4Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def raw_rayjob() -> dict:
    return yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())


def crd_errors(job: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in rayjob_validator().iter_errors(job)]


def _ray_resources(params: dict) -> dict:
    return json.loads(params["resources"].strip("'\"` ")) if "resources" in params else {}


def _gpus(container: dict) -> int:
    limits = container.get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def rayjob_problems(job: dict) -> list[str]:
    problems = []
    spec, rc = job["spec"], job["spec"]["rayClusterSpec"]
    argv = shlex.split(spec["entrypoint"])
    if not any(a.endswith("jobs/bikd_full.py") for a in argv):
        problems.append(f"the entrypoint does not run jobs/bikd_full.py: {spec['entrypoint']!r}")
    run_dir = [a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")]
    if len(run_dir) != 1 or not run_dir[0].startswith(("s3://", "gs://")):
        problems.append(f"the run_dir must be one s3:// or gs:// URL, got {run_dir}")
    if spec.get("shutdownAfterJobFinishes") is not True or not isinstance(spec.get("ttlSecondsAfterFinished"), int):
        problems.append("the cluster must be shut down after the job (shutdownAfterJobFinishes, ttlSecondsAfterFinished)")
    if rc.get("rayVersion") != lock_pins()["ray"]:
        problems.append(f"rayVersion {rc.get('rayVersion')} is not the lock's ray {lock_pins()['ray']}")
    if rc.get("authOptions", {}).get("mode") != "token" or not rc["authOptions"].get("secretName"):
        problems.append("authOptions must be mode token with the token's Secret")
    head = rc["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append(f"the head's dashboard is exposed: serviceType {head.get('serviceType')}")
    head_containers = head["template"]["spec"]["containers"]
    if any(_gpus(c) for c in head_containers) or head["rayStartParams"].get("num-gpus", "0") != "0":
        problems.append("the head has a GPU")
    groups = {g["groupName"]: g for g in rc.get("workerGroupSpecs", [])}
    kge, lm = groups.get("kge"), groups.get("lm")
    if not kge or _ray_resources(kge["rayStartParams"]).get("kge", 0) < 1 or any(_gpus(c) for c in kge["template"]["spec"]["containers"]):
        problems.append("want a worker group kge with the kge resource and no GPU")
    if not lm or _ray_resources(lm["rayStartParams"]).get("lm", 0) < 1 or not any(_gpus(c) >= 1 for c in lm["template"]["spec"]["containers"]):
        problems.append("want a worker group lm with the lm resource and nvidia.com/gpu >= 1")
    for group, pod in [("head", head), *groups.items()]:
        for c in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
                problems.append(f"{group}/{c['name']}: RAY_AUTH_MODE is not token")
            for name in ("RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                if "value" in env.get(name, {}) or "secretKeyRef" not in env.get(name, {}).get("valueFrom", {}):
                    problems.append(f"{group}/{c['name']}: {name} must come from a Secret (secretKeyRef)")
    return problems


def test_rayjob_matches_the_kuberay_crd():
    job = raw_rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert crd_errors(job) == []


def test_rayjob_holds_what_users_rely_on():
    assert rayjob_problems(raw_rayjob()) == []


def test_rayjob_crd_validation_rejects_broken_jobs():
    typo = raw_rayjob()
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in crd_errors(typo))
    nested = raw_rayjob()
    nested["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 3
    assert any("replica" in e for e in crd_errors(nested))
    wrong_type = raw_rayjob()
    wrong_type["spec"]["ttlSecondsAfterFinished"] = "600"
    assert any("ttlSecondsAfterFinished" in e for e in crd_errors(wrong_type))
    bad_enum = raw_rayjob()
    bad_enum["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    assert any("authOptions.mode" in e for e in crd_errors(bad_enum))
    no_group_name = raw_rayjob()
    del no_group_name["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["groupName"]
    assert any("groupName" in e for e in crd_errors(no_group_name))


def test_rayjob_checks_catch_broken_jobs():
    def broken(change):
        job = raw_rayjob()
        change(job["spec"], job["spec"]["rayClusterSpec"])
        return " | ".join(rayjob_problems(job))

    head = lambda rc: rc["headGroupSpec"]
    group = lambda rc, name: next(g for g in rc["workerGroupSpecs"] if g["groupName"] == name)
    assert "jobs/bikd_full.py" in broken(lambda s, rc: s.update(entrypoint="python jobs/kge_train.py --set run_dir=s3://b/r"))
    assert "s3:// or gs://" in broken(lambda s, rc: s.update(entrypoint=s["entrypoint"].replace("s3://BUCKET", "/tmp")))
    assert "shut down" in broken(lambda s, rc: s.update(shutdownAfterJobFinishes=False))
    assert "authOptions" in broken(lambda s, rc: rc.pop("authOptions"))
    assert "exposed" in broken(lambda s, rc: head(rc).update(serviceType="LoadBalancer"))
    assert "the head has a GPU" in broken(lambda s, rc: head(rc)["template"]["spec"]["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": 1}))
    assert "group kge" in broken(lambda s, rc: group(rc, "kge")["rayStartParams"].pop("resources"))
    assert "group lm" in broken(lambda s, rc: group(rc, "lm")["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"))
    assert "RAY_AUTH_MODE is not token" in broken(lambda s, rc: head(rc)["template"]["spec"]["containers"][0].update(env=[]))
    literal = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"} if e["name"] == "AWS_SECRET_ACCESS_KEY" else e
               for e in group(raw_rayjob()["spec"]["rayClusterSpec"], "kge")["template"]["spec"]["containers"][0]["env"]]
    assert "kge/ray-worker: AWS_SECRET_ACCESS_KEY must come from a Secret" in broken(
        lambda s, rc: group(rc, "kge")["template"]["spec"]["containers"][0].update(env=literal))
    assert "rayVersion" in broken(lambda s, rc: rc.update(rayVersion="2.52.0"))


# --- the lock file, the image, the docs --------------------------------------------------------------------


def test_lock_is_pip_freeze_without_torch():
    text = LOCK.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("make_lock.sh" in line for line in header) and any("pip freeze --exclude-editable" in line for line in header)
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    bad = [line for line in lines if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+", line)]
    assert bad == [], "every line of the lock pins one package"
    pins = lock_pins()
    assert "torch" not in pins and "bikd" not in pins
    import ray

    assert pins["ray"] == ray.__version__  # the launcher's Ray (`ray up`, `ray job submit`) is the cluster's
    script = (CLUSTER / "make_lock.sh").read_text()  # regenerates the lock the same way
    assert "freeze --exclude-editable" in script and "grep -v -E '^torch(==| @ )'" in script


def test_dockerfile_installs_torch_then_lock_then_project():
    text = (CLUSTER / "Dockerfile").read_text()
    torch = re.search(rf"pip install[^\n]* torch=={re.escape(torch_pin())} --index-url https://download\.pytorch\.org/whl/\$\{{TORCH_INDEX\}}", text)
    lock = re.search(r"pip install[^\n]* -r cluster/requirements\.lock", text)
    project = re.search(r"pip install[^\n]* --no-deps -e \.", text)
    assert torch and lock and project and torch.start() < lock.start() < project.start()
    base = re.search(r"ARG RAY_IMAGE=rayproject/ray:(\S+)-py(\d)(\d+)", text)
    assert base and base[1] == lock_pins()["ray"]
    assert f"Python {base[2]}.{base[3]}." in LOCK.read_text()  # the image's Python is the lock's
    assert "cluster/Dockerfile" in (CLUSTER / "rayjob.yaml").read_text()
    assert {"--build-arg TORCH_INDEX=cpu", "--build-arg TORCH_INDEX=cu128"} <= set(re.findall(r"--build-arg TORCH_INDEX=\w+", text))


SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"(?i)aws_secret_access_key\W{1,4}[A-Za-z0-9/+]{40}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GCP service account key": re.compile(r"\"private_key_id\"\s*:"),
    "Ray auth token": re.compile(r"\b[0-9a-f]{64}\b"),  # secrets.token_hex(32)
}


def secrets_in(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def test_no_secret_in_any_config_or_doc():
    files = [p for p in CLUSTER.iterdir() if p.is_file()] + [REPO / "docs" / "CLUSTER.md", REPO / "tests" / "vendor" / "kuberay" / "README.md"]
    assert {p.name for p in files} >= {"aws.yaml", "gcp.yaml", "rayjob.yaml", "requirements.lock", "Dockerfile", "make_lock.sh", "CLUSTER.md"}
    found = {str(p.relative_to(REPO)): secrets_in(p.read_text()) for p in files}
    assert {k: v for k, v in found.items() if v} == {}
    assert not any(p.name in ("auth_token", ".env") or p.suffix in (".pem", ".key") for p in CLUSTER.rglob("*"))


def test_secret_scan_finds_planted_secrets():
    fake_id = "AKIA" + "Q" * 16  # built here so that no scanner flags this file
    fake_secret = "aws_secret_access_key = " + "a1/B" * 10
    assert secrets_in((CLUSTER / "rayjob.yaml").read_text().replace("value: us-west-2", f"value: {fake_id}")) == ["AWS access key id"]
    assert secrets_in(fake_secret) == ["AWS secret access key"]
    assert secrets_in("-----BEGIN " + "RSA PRIVATE KEY-----") == ["private key"]
    assert secrets_in("echo " + "0123456789abcdef" * 4 + " > ~/.ray/auth_token") == ["Ray auth token"]


@pytest.mark.parametrize("provider", ["aws", "gcp"])
def test_the_cluster_config_fits_the_launchers_nodes(provider):
    """configs/bikd_cluster.yaml (what the docs submit) asks only for resources the node types offer, in
    amounts that fit: every KGE trainer a `kge` node of its own, the LM worker and the mining pool one `lm` node."""
    from bikd.config import load_config
    from bikd.driver import BikdConfig

    cfg = load_config(BikdConfig, str(REPO / "configs" / "bikd_cluster.yaml"))
    types = ray_up(raw_launcher(provider))["available_node_types"]
    def fits(resources: dict, cpus: float, gpus: float) -> list[str]:
        return [name for name, t in types.items() if t["resources"].get("CPU", 0) >= cpus and t["resources"].get("GPU", 0) >= gpus
                and all(t["resources"].get(k, 0) >= v for k, v in resources.items())]
    kge = fits(cfg.kge_dist.resources_per_trainer, cfg.kge_dist.cpus_per_trainer, 0)
    assert kge and sum(types[n].get("max_workers", 0) for n in kge) >= cfg.kge_dist.num_parts
    lm_need = {k: cfg.lm.resources_per_worker.get(k, 0) + cfg.mine.scoring.resources.get(k, 0)
               for k in {*cfg.lm.resources_per_worker, *cfg.mine.scoring.resources}}
    lm = fits(lm_need, cfg.lm.cpus_per_worker + cfg.mine.scoring.num_cpus, 1 if cfg.lm.use_gpu else 0)
    assert lm and not set(lm) & set(kge) and cfg.lm.use_gpu and cfg.lm.num_workers == 1
