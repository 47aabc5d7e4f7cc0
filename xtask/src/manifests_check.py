"""The deployment manifests agree with each other and with the agent.

Run by `cargo xtask manifests` with the validator's Python (PyYAML is one
of kubernetes-validate's dependencies). Schema validation says each file is
a valid object; this says they fit together: the Service selects the
DaemonSet's pods, the ServiceMonitor selects the Service and scrapes the
port the agent serves, the scrape annotations name that port, and the
agent keeps the capabilities the README lists and no others.
"""

import sys

import yaml

WANTED_CAPS = {"SYS_ADMIN", "SYS_PTRACE", "KILL"}


def load(directory):
    objects = {}
    for name in ["namespace", "daemonset", "service", "servicemonitor"]:
        with open(f"{directory}/{name}.yaml") as f:
            objects[name] = yaml.safe_load(f)
    with open(f"{directory}/kustomization.yaml") as f:
        objects["kustomization"] = yaml.safe_load(f)
    return objects


def check(objects):
    errors = []
    ds, svc, sm = objects["daemonset"], objects["service"], objects["servicemonitor"]
    pod = ds["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    (agent,) = spec["containers"]

    def expect(condition, message):
        if not condition:
            errors.append(message)

    expect(spec.get("hostPID") is True, "the agent needs hostPID to see the node's processes")
    expect(
        ds["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(),
        "the DaemonSet's selector does not select its own pods",
    )
    expect(svc["spec"]["selector"].items() <= pod_labels.items(), "the Service does not select the agents")
    expect(
        sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items(),
        "the ServiceMonitor does not select the Service",
    )
    namespace = objects["namespace"]["metadata"]["name"]
    for name, obj in [("daemonset", ds), ("service", svc), ("servicemonitor", sm)]:
        expect(obj["metadata"].get("namespace") == namespace, f"{name} is not in namespace {namespace}")
    expect(namespace in sm["spec"]["namespaceSelector"]["matchNames"], "the ServiceMonitor looks in another namespace")

    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    expect("metrics" in ports, "the agent has no port named metrics")
    port = ports.get("metrics")
    expect(
        any(a == f"--metrics-addr=0.0.0.0:{port}" for a in agent["args"]),
        f"the agent does not serve /metrics on every interface at port {port}",
    )
    expect(agent["args"][:2] == ["watch", "--all"], "the agent does not run `loopguard watch --all`")
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    expect(
        svc_ports.get("metrics", {}).get("targetPort") in ("metrics", port),
        "the Service's metrics port does not lead to the agent's",
    )
    expect(
        all(e["port"] in svc_ports for e in sm["spec"]["endpoints"]),
        "the ServiceMonitor scrapes a port the Service does not have",
    )
    annotations = pod["metadata"].get("annotations", {})
    expect(annotations.get("prometheus.io/scrape") == "true", "no prometheus.io/scrape annotation")
    expect(annotations.get("prometheus.io/port") == str(port), "prometheus.io/port is not the metrics port")

    security = agent["securityContext"]
    caps = security["capabilities"]
    expect(caps.get("drop") == ["ALL"], "the agent must drop every capability it does not add")
    expect(set(caps.get("add", [])) == WANTED_CAPS, f"the agent must add exactly {sorted(WANTED_CAPS)}")
    expect(security.get("privileged") is False, "the agent must not be privileged")
    expect(security.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
    limits = agent["resources"].get("limits", {})
    expect({"cpu", "memory"} <= limits.keys(), "the agent needs cpu and memory limits")
    for mount in agent.get("volumeMounts", []):
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        if "hostPath" in volume:
            expect(mount.get("readOnly") is True, f"host path {volume['hostPath']['path']} must be mounted read-only")

    listed = set(objects["kustomization"]["resources"])
    expect(
        listed == {"namespace.yaml", "daemonset.yaml", "service.yaml", "servicemonitor.yaml"},
        "kustomization.yaml does not list every manifest",
    )
    return errors


def main():
    objects = load(sys.argv[1])
    errors = check(objects)
    # The check has teeth: a Service that selects nothing is caught.
    objects["service"]["spec"]["selector"] = {"app.kubernetes.io/name": "other"}
    assert check(objects), "a Service selecting other pods was not caught"
    for error in errors:
        print(f"manifests: {error}", file=sys.stderr)
    if errors:
        sys.exit(1)
    print("manifests: the DaemonSet, Service, ServiceMonitor and annotations agree")


main()
