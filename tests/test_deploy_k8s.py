"""deploy/k8s: every overlay rendered by `kubectl kustomize`; what matters checked on the objects (GPU requests,
probes, discovery, the Indexed Job's shards); the probe and metrics paths asked of a real Triton server; and each
rendered client command run (with --dry-run) against that server, so an option the CLI does not know fails here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import rf

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("overlays/gpu", "overlays/cpu", "overlays/gpu-text-only")


def render(path: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (apt-get install kubectl; make installs it)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [o for o in yaml.safe_load_all(out.stdout) if o]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {path: render(path) for path in (*OVERLAYS, "verify")}


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [(o["kind"], o["metadata"]["name"]) for o in objects])
    return found[0]


def container(obj: dict) -> dict:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def option(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, args)
    return values[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_fleet(rendered, overlay):
    objects = rendered[overlay]
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"realfake"}

    server = one(objects, "Deployment", "realfake-server")
    pod = server["spec"]["template"]
    triton = container(server)
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    resources = triton.get("resources", {})
    gpus = {k: v for part in resources.values() for k, v in part.items() if k == "nvidia.com/gpu"}
    runtime = env_of(triton)["RF_RUNTIME"]["value"]
    startup = triton["startupProbe"]
    allowed = startup["periodSeconds"] * startup["failureThreshold"]
    if "gpu" in overlay:
        assert resources["limits"]["nvidia.com/gpu"] == "1" and runtime == "tensorrt"
        assert allowed >= 30 * 60  # the first start builds TensorRT plans
    else:
        assert not gpus and runtime == "openvino" and env_of(triton)["RF_PRECISION"]["value"] == "int8"
        assert allowed >= 2 * 3600  # the first start quantizes the UNet on CPU
    # probes: Triton's own health endpoints on its HTTP port
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready")):
        assert triton[probe]["httpGet"] == {"path": path, "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    # metrics scraped where Triton serves them
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and int(notes["prometheus.io/port"]) == ports["metrics"]
    assert "--allow-metrics=true" in triton["args"] and f"--metrics-port={ports['metrics']}" in triton["args"]
    mounts = {m["name"]: m["mountPath"] for m in triton["volumeMounts"]}
    assert mounts["models"] == "/models"

    # discovery: the headless Service selects the server pods and lists only ready ones
    labels = pod["metadata"]["labels"]
    headless = one(objects, "Service", "realfake-headless")
    assert headless["spec"]["clusterIP"] == "None" and not headless["spec"].get("publishNotReadyAddresses")
    assert headless["spec"]["selector"].items() <= labels.items()
    assert one(objects, "Service", "realfake")["spec"]["selector"].items() <= labels.items()

    # the Indexed Job: pod I makes shard I/N with N = completions, against the headless Service, onto the data claim
    job = one(objects, "Job", "realfake-generate")
    spec, client = job["spec"], container(job)
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] <= spec["completions"]
    env = env_of(client)
    assert int(env["RF_SHARDS"]["value"]) == spec["completions"]
    assert "job-completion-index" in env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    args = client["args"]
    assert args[0] == "generate" and option(args, "shard") == "$(JOB_COMPLETION_INDEX)/$(RF_SHARDS)"
    host, port = option(args, "url").rsplit(":", 1)
    assert host == headless["metadata"]["name"] and int(port) == headless["spec"]["ports"][0]["port"] == 8000
    data = {m["name"]: m["mountPath"] for m in client["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]}
    assert option(args, "out").startswith(data["data"] + "/") and claims["data"] == "realfake-data"
    assert one(objects, "PersistentVolumeClaim", "realfake-data")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert option(args, "concurrency") == ("4" if overlay.endswith("cpu") else "2")
    # Real-Fake mode by default: the real training images and their captions mounted read-only and passed
    if overlay.endswith("text-only"):
        assert "real" not in data and option(args, "per-class") == "1300"
        assert not [a for a in args if a.startswith(("--real=", "--captions=", "--versions="))]
    else:
        real_mount = next(m for m in client["volumeMounts"] if m["name"] == "real")
        assert real_mount["readOnly"] is True and claims["real"] == "realfake-real"
        assert option(args, "real").startswith(data["real"] + "/") and option(args, "versions") == "1"
        assert option(args, "captions").startswith(data["real"] + "/")
        assert not [a for a in args if a.startswith("--per-class=")]
    # a user error (exit 2) fails the Job at once; disruptions are retried without counting
    rules = spec["podFailurePolicy"]["rules"]
    assert {
        "action": "FailJob",
        "onExitCodes": {"containerName": client["name"], "operator": "In", "values": [2]},
    } in rules
    assert any(r["action"] == "Ignore" and r["onPodConditions"] == [{"type": "DisruptionTarget"}] for r in rules)
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # what podFailurePolicy requires


def test_server_pods_can_be_pinned_to_one_gpu_type(tmp_path):
    """components/gpu-type adds a nodeSelector on the GPU product label to the server pods of an overlay."""
    overlay = tmp_path / "pinned"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{os.path.relpath(K8S / 'overlays' / 'gpu', overlay)}]\n"
        f"components: [{os.path.relpath(K8S / 'components' / 'gpu-type', overlay)}]\n"
    )
    objects = render(str(overlay))  # an absolute path: K8S / it is itself
    pod = one(objects, "Deployment", "realfake-server")["spec"]["template"]["spec"]
    assert set(pod["nodeSelector"]) == {"nvidia.com/gpu.product"} and pod["nodeSelector"]["nvidia.com/gpu.product"]


def test_probe_and_metrics_paths_answer_on_a_real_server(rendered, triton):
    triton_container = container(one(rendered["overlays/gpu"], "Deployment", "realfake-server"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        with urllib.request.urlopen(f"http://{triton.url}{triton_container[probe]['httpGet']['path']}") as resp:
            assert resp.status == 200, probe
    notes = one(rendered["overlays/gpu"], "Deployment", "realfake-server")["spec"]["template"]["metadata"]
    path = notes["annotations"]["prometheus.io/path"]
    with urllib.request.urlopen(f"http://{triton.metrics_url}{path}") as resp:
        assert "nv_inference_request_success" in resp.read().decode()


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of container args from the container's environment."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in args]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_client_command_runs_against_a_real_server(rendered, triton, overlay, tmp_path):
    """The Job's command as Kubernetes would run it in its last pod, pointed at a real server, with --dry-run."""
    job = one(rendered[overlay], "Job", "realfake-generate")
    client = container(job)
    shards = job["spec"]["completions"]
    env = {"RF_SHARDS": env_of(client)["RF_SHARDS"]["value"], "JOB_COMPLETION_INDEX": str(shards - 1)}
    args = [
        f"--url={triton.url}"
        if a.startswith("--url=")
        else f"--out={tmp_path / 'out'}"
        if a.startswith("--out=")
        else a
        for a in _expand(client["args"], env)
    ]
    assert client["command"] == ["rf-client"]
    if overlay.endswith("text-only"):
        expected = "images        1,300,000"
    else:  # Real-Fake mode: the claim's train/ and captions.jsonl, here an ImageNet-shaped folder of 3 classes
        real, captions = _imagenet_shaped(tmp_path / "real")
        args = [
            f"--real={real}" if a.startswith("--real=") else f"--captions={captions}" if a.startswith("--captions=")
            else a
            for a in args
        ]  # fmt: skip
        expected = "images        6"
    r = rf("rf-client", *args, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"shard         {shards - 1}/{shards}:" in r.stdout and expected in r.stdout, r.stdout
    assert not (tmp_path / "out").exists()


def _imagenet_shaped(root: Path) -> tuple[Path, Path]:
    import json

    from PIL import Image

    rows = []
    for wnid in ("n01440764", "n01443537", "n01484850"):
        (root / wnid).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (48, 40), (i * 90, 40, 10)).save(root / wnid / f"{wnid}_{i}.JPEG")
            rows.append({"image": f"{wnid}/{wnid}_{i}.JPEG", "caption": f"a fish {i}"})
    captions = root.parent / "captions.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, captions


def test_rendered_verify_command_runs(rendered, triton, tmp_path):
    """The verify Job's command on a small dataset made by the same client against a real server."""
    from realfake.client.generate import GenerateConfig, generate_dataset

    out = tmp_path / "data"
    generate_dataset(
        GenerateConfig(classes="cifar10", out=out, per_class=1, steps=2, urls=[triton.url]), log=lambda _m: None
    )
    verify = container(one(rendered["verify"], "Job", "realfake-verify"))
    job = one(rendered["overlays/gpu"], "Job", "realfake-generate")
    assert verify["args"][1] == option(container(job)["args"], "out")  # it checks what the Job wrote
    r = rf(*verify["command"], verify["args"][0], str(out))
    assert r.returncode == 0, r.stdout + r.stderr
