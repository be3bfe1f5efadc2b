"""Dockerfiles and Kubernetes manifests, checked offline: hadolint, `kubectl kustomize`
for every overlay, the real API schemas (kubernetes-validate --strict), yamllint, and what
a platform team checks by hand: probes, security context, grace periods consistent with
the binaries' shutdown flags, and that every INFERMESH_ variable is a real flag."""
import re
import shutil
import sys
import subprocess
import time

import pytest
import yaml

from conftest import ROOT, Gateway, Worker, binary

OVERLAYS = ["cpu", "gpu", "production", "production-keda", "explicit", "production-tls", "placement"]


def run(*cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
    return out.stdout


def venv(tool):
    return str(ROOT / ".venv" / "bin" / tool)


def test_dockerfiles_lint_clean():
    run(venv("hadolint"), "Dockerfile.gateway", "Dockerfile.worker")


def test_yaml_lints_clean():
    cfg = "{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: disable}}"
    run(venv("yamllint"), "-d", cfg, "deploy")


def render(overlay):
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the Kustomize overlays"
    return run(kubectl, "kustomize", f"deploy/overlays/{overlay}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay, tmp_path):
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(render(overlay))
    out = run(venv("kubernetes-validate"), "--strict", str(path))
    assert "passed" in out


def quantity(q):
    """A Kubernetes memory quantity in bytes (Ki, Mi, Gi or plain)."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    return int(q[:-2]) * units[q[-2:]] if q[-2:] in units else int(q)


def env_flags(binary_name):
    help_text = run(binary(binary_name), "--help")
    return set(re.findall(r"env: (INFERMESH_[A-Z_]+)", help_text))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_hardened_and_consistent(overlay):
    docs = [d for d in yaml.safe_load_all(render(overlay)) if d]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "infermesh-config")["data"]
    secs = lambda v: float(v.rstrip("s"))  # noqa: E731
    flags = {"infermesh-worker": env_flags("infermesh-worker"), "infermesh-gateway": env_flags("infermesh-gateway")}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        name = dep["metadata"]["name"]
        assert pod["enableServiceLinks"] is False, name
        # A container's own env overrides the shared ConfigMap.
        own = {**config, **{e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}}
        needed = secs(own["INFERMESH_SHUTDOWN_GRACE"]) + secs(own["INFERMESH_DRAIN_TIMEOUT"])
        assert pod["terminationGracePeriodSeconds"] >= needed, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["topologySpreadConstraints"], name
        (c,) = pod["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == 8003, (name, probe)
        assert "service" not in c["readinessProbe"]["grpc"], "readiness is the server's own health"
        assert c["livenessProbe"]["grpc"]["service"] == "liveness"
        assert c["resources"]["requests"] and c["resources"]["limits"], name
        # Every INFERMESH_ variable the pod gets is a flag the binary really has.
        env = {e["name"] for e in c.get("env", [])} | set(config)
        known = flags["infermesh-worker" if "worker" in name else "infermesh-gateway"]
        assert env - known == set(), (name, env - known)
        if "gateway" in name:
            target = next(e["value"] for e in c["env"] if e["name"] == "INFERMESH_WORKERS_DNS")
            host, port = target.rsplit(":", 1)
            svc = services[host.split(".")[0]]
            assert svc["spec"]["clusterIP"] == "None", "the gateway follows a headless Service"
            assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
        # A worker that starts with nothing loaded must still be SERVING, or it never joins
        # the headless Service and nothing could ask it to load a model.
        values = {**config, **{e["name"]: e.get("value") for e in c.get("env", [])}}
        if "worker" in name and values.get("INFERMESH_MODEL_CONTROL_MODE") == "explicit" \
                and not values.get("INFERMESH_LOAD_MODEL"):
            assert values.get("INFERMESH_ALLOW_EMPTY_REPOSITORY") == "true", name
        # The byte budget answers RESOURCE_EXHAUSTED before the pod's memory limit kills it.
        budget = int(next(e["value"] for e in c["env"] if e["name"] == "INFERMESH_MAX_INFLIGHT_BYTES"))
        limit = quantity(c["resources"]["limits"]["memory"])
        assert 0 < budget <= limit * 3 // 4, (name, budget, limit)
    if overlay not in ("cpu", "explicit", "placement"):
        worker = next(d for d in docs if d["kind"] == "Deployment" and "worker" in d["metadata"]["name"])
        limits = worker["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1


def exposed_names(metrics_url):
    import urllib.request

    port = metrics_url.rsplit(":", 1)[1]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_dashboard_and_alerts_use_metrics_that_exist(mesh, tmp_path):
    """Every metric the Grafana dashboard and the alert rules query is one a live worker
    or gateway exposes (after one request, so every family has samples)."""
    import json as _json

    import numpy as np
    import tritonclient.grpc as grpcclient

    gateway, workers = mesh
    i = grpcclient.InferInput("input", [1, 64], "FP32")
    i.set_data_from_numpy(np.zeros((1, 64), np.float32))
    gateway.client.infer("digits", [i])
    exposed = exposed_names(gateway.metrics_url) | exposed_names(workers[0].metrics_url)
    # The split, hedge, shadow and rollback series exist from start for the models of a routing file, before
    # any request, so their panels are not empty.
    routes = tmp_path / "routes.yaml"
    routes.write_text('models:\n  digits:\n    split: {"1": 1}\n    hedge: {after: p95}\n'
                      '    shadow: {target: {version: 1}}\n    guard: {version: 1, max_error_rate: 0.5}\n')
    routed = Gateway(workers[0], extra=("--routes", str(routes)))
    try:
        exposed |= exposed_names(routed.metrics_url)
    finally:
        routed.stop()
    # The placement series: a placement-mode worker and its gateway after one cold request.
    placing = Worker("--model-control-mode", "placement", "--model-memory-bytes", str(1 << 30))
    placed = Gateway(placing)
    try:
        placed.client.infer("digits", [i])
        # Copies per model are counted once a second.
        deadline = time.monotonic() + 30
        while "infermesh_gateway_placement_copies" not in exposed_names(placed.metrics_url):
            assert time.monotonic() < deadline, "no copies series"
            time.sleep(0.1)
        exposed |= exposed_names(placed.metrics_url) | exposed_names(placing.metrics_url)
    finally:
        placed.stop()
        placing.stop()
    # The sequence series: a worker with a stateful model after one sequence start.
    sys.path.append(str(ROOT / "bench"))
    from stateful_models import write
    stateful = Worker("--model-repository", str(write(tmp_path / "stateful")))
    try:
        x = grpcclient.InferInput("INPUT", [1, 4], "FP32")
        x.set_data_from_numpy(np.zeros((1, 4), np.float32))
        stateful.client.infer("accumulate", [x], sequence_id=1, sequence_start=True)
        exposed |= exposed_names(stateful.metrics_url)
    finally:
        stateful.stop()
    dashboard = _json.loads((ROOT / "deploy/monitoring/dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((ROOT / "deploy/monitoring/alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:infermesh|process)_[a-z_]+)", e)}
    assert used, "no metrics referenced"
    assert used - exposed == set(), f"queried but not exposed: {sorted(used - exposed)}"


def test_autoscaling_is_wired_to_a_metric_the_worker_exports(mesh, tmp_path):
    """HPA (through the prometheus-adapter rule) and the KEDA alternative scale the workers
    on the same series, which a live worker exports; CPU is the fallback."""
    _, workers = mesh
    exposed = exposed_names(workers[0].metrics_url)
    adapter_file = ROOT / "deploy/autoscaling/prometheus-adapter.yaml"
    assert "passed" in run(venv("kubernetes-validate"), "--strict", str(adapter_file))
    rules = yaml.safe_load(yaml.safe_load(adapter_file.read_text())["data"]["config.yaml"])["rules"]
    served = {}
    for rule in rules:
        series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
        assert series in exposed, series
        served[rule["name"]["as"]] = series

    docs = [d for d in yaml.safe_load_all(render("production")) if d]
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler"
               and d["spec"]["scaleTargetRef"]["name"] == "infermesh-worker")
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Pods"]["pods"]["metric"]["name"] in served
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60

    docs = [d for d in yaml.safe_load_all(render("production-keda")) if d]
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"
                and d["spec"]["scaleTargetRef"]["name"] == "infermesh-worker"], "KEDA owns the worker HPA"
    (so,) = [d for d in docs if d["kind"] == "ScaledObject"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    target = so["spec"]["scaleTargetRef"]["name"]
    assert any(d["kind"] == "Deployment" and d["metadata"]["name"] == target for d in docs)
    assert so["spec"]["minReplicaCount"] >= 1, "scale-to-zero is documented as opt-in"
    prom = next(t for t in so["spec"]["triggers"] if t["type"] == "prometheus")["metadata"]
    assert set(re.findall(r"(infermesh_\w+)", prom["query"])) <= exposed
    assert float(prom["threshold"]) > 0


def test_checkov_passes_with_every_skip_justified(tmp_path):
    """checkov on every rendered overlay, the adapter rule and both Dockerfiles; the
    checks it skips are the ones listed (each with its reason) in deploy/checkov.yaml."""
    config = ROOT / "deploy/checkov.yaml"
    skipped = yaml.safe_load(config.read_text())["skip-check"]
    text = config.read_text()
    for check in skipped:
        before = text.split(f"- {check}")[0].rstrip().splitlines()
        assert before[-1].lstrip().startswith("#"), f"{check} is skipped without a reason"
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(render(overlay))
    (tmp_path / "prometheus-adapter.yaml").write_text((ROOT / "deploy/autoscaling/prometheus-adapter.yaml").read_text())
    checkov = ROOT / ".venv-checkov" / "bin" / "checkov"
    # A venv of its own, made only when asked (scripts/test.sh asks before these tests).
    assert checkov.exists(), "checkov is installed into .venv-checkov by `scripts/pyenv.sh checkov`"
    out = run(str(checkov), "--config-file", str(config), "-d", str(tmp_path), "--framework", "kubernetes")
    assert "Failed checks: 0" in out and "Passed checks: " in out, out
    out = run(str(checkov), "--config-file", str(config), "-f", "Dockerfile.gateway", "-f", "Dockerfile.worker",
              "--framework", "dockerfile")
    assert "Failed checks: 0" in out, out


CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/", "cert-manager.io/")


def test_custom_resources_match_their_crd_schemas():
    """ServiceMonitor, PrometheusRule, ScaledObject, and cert-manager's Certificate and
    Issuer (which kubernetes-validate has no schema for) validated against the CRDs'
    published JSON schemas (tests/crd)."""
    import json

    docs = {}
    for overlay in OVERLAYS:
        for d in yaml.safe_load_all(render(overlay)):
            if d and d["apiVersion"].startswith(CRD_GROUPS):
                docs[(d["kind"], d["metadata"]["name"])] = d
    assert {k for k, _ in docs} == {"ServiceMonitor", "PrometheusRule", "ScaledObject", "Certificate", "Issuer"}
    out = subprocess.run(["node", "validate.mjs"], input=json.dumps(list(docs.values())), capture_output=True,
                         text=True, timeout=60, cwd=ROOT / "tests/crd")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("valid: ") == len(docs)


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_ports_and_gpus_line_up(overlay):
    """Every selector picks the pods it means, every Service and probe port is a container
    port at the binaries' defaults (gRPC 8001, metrics 8002, health 8003, and HTTP/REST 8000
    on the gateway, whose workers leave HTTP off), and GPUs appear only in the GPU overlays."""
    docs = [d for d in yaml.safe_load_all(render(overlay)) if d]
    deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    pods = {n: d["spec"]["template"] for n, d in deps.items()}
    for name, dep in deps.items():
        assert matches(dep["spec"]["selector"]["matchLabels"], pods[name]["metadata"]["labels"]), name
        (c,) = pods[name]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        want = {"grpc": 8001, "metrics": 8002, "health": 8003}
        if name == "infermesh-gateway":
            want["http"] = 8000
        else:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("INFERMESH_ALLOW_HTTP") == "false", name
        assert ports == want, name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] in ports.values(), (name, probe)
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind == "Service":
            picked = [n for n, p in pods.items() if matches(d["spec"]["selector"], p["metadata"]["labels"])]
            assert picked == [name], (kind, name, picked)
            (c,) = pods[name]["spec"]["containers"]
            names = {p["name"] for p in c["ports"]}
            assert all(p["targetPort"] in names for p in d["spec"]["ports"]), (kind, name)
        if kind in ("PodDisruptionBudget", "NetworkPolicy"):
            sel = d["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]["matchLabels"]
            assert [n for n, p in pods.items() if matches(sel, p["metadata"]["labels"])] == [name], (kind, name)
        if kind == "HorizontalPodAutoscaler":
            assert d["spec"]["scaleTargetRef"]["name"] in deps, name
    gpus = [n for n, p in pods.items() if "nvidia.com/gpu" in p["spec"]["containers"][0]["resources"].get("limits", {})]
    assert gpus == ([] if overlay in ("cpu", "explicit", "placement") else ["infermesh-worker"])


def test_the_tls_shape_lines_up():
    """production-tls: every mounted Secret is one a Certificate writes (or the auth
    Secret), read-only; the
    name the gateway checks is on the workers' certificate; the workers accept exactly the
    gateway's client certificate's name, which only a client-auth certificate carries; the
    CA issuer is the one that signs the three certificates; probes stay on the health
    port."""
    docs = [d for d in yaml.safe_load_all(render("production-tls")) if d]
    certs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    by_secret = {c["secretName"]: c for c in certs.values()}
    secret_objects = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    # Everything lives in the namespace the pods mount Secrets from.
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"infermesh"}
    deps = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"}
    env = {name: {e["name"]: e.get("value") for e in pod["containers"][0]["env"]} for name, pod in deps.items()}
    for name, pod in deps.items():
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        for vol, secret in secrets.items():
            assert secret in by_secret or secret in secret_objects, (name, secret)
            assert mounts[vol]["readOnly"] is True, (name, vol)
        c = pod["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == 8003, (name, probe)
    worker, gateway = env["infermesh-worker"], env["infermesh-gateway"]
    assert worker["INFERMESH_GRPC_USE_SSL_MUTUAL"] == "true"
    assert gateway["INFERMESH_WORKER_TLS_SERVER_NAME"] in certs["infermesh-worker-serving"]["dnsNames"]
    allowed = worker["INFERMESH_GRPC_ALLOWED_CLIENT_NAMES"].split(",")
    client_names = [n for c in certs.values() if "client auth" in c.get("usages", []) for n in c["dnsNames"]]
    assert sorted(allowed) == sorted(client_names) == certs["infermesh-gateway-client"]["dnsNames"]
    for name in ("infermesh-gateway-serving", "infermesh-worker-serving", "infermesh-gateway-client"):
        assert certs[name]["issuerRef"] == {"name": "infermesh-ca", "kind": "Issuer"}, name
        assert "client auth" not in certs[name]["usages"] or name == "infermesh-gateway-client"
    assert certs["infermesh-ca"]["isCA"] is True
    # The auth file comes from a Secret, mounted read-only where the flag points, and
    # every key in it has the form the gateway accepts.
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    auth = yaml.safe_load(secrets["infermesh-auth"]["stringData"]["auth.yaml"])
    for t in auth["tenants"]:
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", k) for k in t["keys"]), t
    mounts = {m["mountPath"]: m for m in deps["infermesh-gateway"]["containers"][0]["volumeMounts"]}
    assert gateway["INFERMESH_AUTH_CONFIG"] == "/etc/infermesh/auth/auth.yaml"
    assert mounts["/etc/infermesh/auth"]["readOnly"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_routing_file_is_mounted_so_updates_reach_the_gateway(overlay, tmp_path):
    """The gateway reads INFERMESH_ROUTES from the infermesh-routes ConfigMap, mounted as a
    directory (a subPath mount never sees an update), and what the ConfigMap holds is a
    routing file the gateway accepts."""
    docs = [d for d in yaml.safe_load_all(render(overlay)) if d]
    routes = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "infermesh-routes")
    gateway = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "infermesh-gateway")
    pod = gateway["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    path = next(e["value"] for e in c["env"] if e["name"] == "INFERMESH_ROUTES")
    volume = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "infermesh-routes")
    mount = next(m for m in c["volumeMounts"] if m["name"] == volume["name"])
    assert "subPath" not in mount and mount["readOnly"] is True
    assert path == f"{mount['mountPath']}/routes.yaml"
    (tmp_path / "routes.yaml").write_text(routes["data"]["routes.yaml"])
    out = run(binary("infermesh"), "routes", "--check", str(tmp_path / "routes.yaml"))
    assert "ok" in out
