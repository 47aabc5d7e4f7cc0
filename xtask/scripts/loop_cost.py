#!/usr/bin/env python3
"""What attaching costs a uvicorn loop, per agent mode, measured as the
server's CPU time per request (the sum of its threads' schedstat run time)
with each BPF program's runs per request and ns per run (`bpftool prog
show`, kernel.bpf_stats_enabled=1). Modes are interleaved, the order
reversed every other round.

    sudo python3 xtask/scripts/loop_cost.py "none,default,--wait-probes uprobe" ROUNDS RATE

RATE is oha's requests per second, or `sat` for saturation. `none` is the
server unattached, `default` the agent with no flag, anything else the
agent with those flags. FastAPI's examples/loop-servers/fastapi_app.py runs
under uvicorn with loopguard-asgi (LOOPGUARD_APP_MIDDLEWARE, default
`loopguard`) on CPU 0, the agent and oha on CPU 1, 5 s per slice. Uses the
venv `cargo xtask setup` / `cargo xtask bench --python` make
(target/e2e-python), target/release/loopguard, oha and bpftool."""
import glob, json, os, re, signal, socket, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = f"{ROOT}/target/e2e-python/bin/python"
LOOPGUARD = f"{ROOT}/target/release/loopguard"
MODES = sys.argv[1].split(",")
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
RATE = sys.argv[3] if len(sys.argv) > 3 else "1600"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_ns(pid):
    total = 0
    for f in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            total += int(open(f).read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def programs(agent_pid):
    ids = set()
    for f in glob.glob(f"/proc/{agent_pid}/fdinfo/*"):
        try:
            found = re.search(r"prog_id:\s*(\d+)", open(f).read())
        except OSError:
            continue
        if found:
            ids.add(found.group(1))
    out = {}
    for prog in ids:
        shown = subprocess.run(["bpftool", "-j", "prog", "show", "id", prog],
                               capture_output=True, text=True).stdout
        info = json.loads(shown)
        out[info.get("name")] = (info.get("run_time_ns", 0), info.get("run_cnt", 0))
    return out


def attach(pid, mode):
    extra = [] if mode == "default" else mode.split()
    agent = subprocess.Popen(
        ["taskset", "-c", "1", LOOPGUARD, "attach", "--pid", str(pid), "--format", "json",
         "--threshold-ms", "50"] + extra,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while True:
        line = agent.stdout.readline()
        if not line:
            sys.exit(f"the agent exited before attaching ({mode})")
        if '"attached"' in line:
            return agent


def main():
    port = free_port()
    env = dict(os.environ)
    env.setdefault("LOOPGUARD_APP_MIDDLEWARE", "loopguard")
    server = subprocess.Popen(
        ["taskset", "-c", "0", PYTHON, "-m", "uvicorn", "fastapi_app:app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--app-dir", f"{ROOT}/examples/loop-servers"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run(server, f"http://127.0.0.1:{port}/fast", port)
    finally:
        server.terminate()
        server.wait()


def run(server, url, port):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c16", "-d2s", url],
                   stdout=subprocess.DEVNULL, check=True)
    subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
    rate = [] if RATE == "sat" else ["-q", RATE]
    for r in range(ROUNDS):
        for mode in MODES if r % 2 == 0 else list(reversed(MODES)):
            agent = attach(server.pid, mode) if mode != "none" else None
            if agent:
                time.sleep(0.5)
                before = programs(agent.pid)
            start = cpu_ns(server.pid)
            shown = subprocess.run(
                ["taskset", "-c", "1", "oha", "--no-tui", "-z", "5s", "-c", "16",
                 "--output-format", "json"] + rate + [url],
                capture_output=True, text=True, check=True).stdout
            used = cpu_ns(server.pid) - start
            requests = sum(json.loads(shown)["statusCodeDistribution"].values())
            line = f"{mode:30s} r{r} {requests / 5:7.0f} req/s server {used / requests / 1000:6.1f} us/req"
            if agent:
                after = programs(agent.pid)
                for name, (ns, runs) in sorted(after.items()):
                    ns0, runs0 = before.get(name, (0, 0))
                    if runs > runs0:
                        line += f" {name}:{(runs - runs0) / requests:.2f}x{(ns - ns0) / (runs - runs0):.0f}ns"
                agent.send_signal(signal.SIGINT)
                agent.wait()
            print(line, flush=True)


main()
