#!/usr/bin/env python3
"""What naming requests costs the target, per `--requests` mode, measured
without wall-clock throughput: the server's CPU time per request (the sum of
its threads' /proc/PID/task/*/schedstat run time) and the agent's BPF time
per request (`bpftool prog show` run_time_ns, kernel.bpf_stats_enabled=1),
modes interleaved, the order reversed every other round.

    sudo python3 xtask/scripts/request_cost.py target/release/stall-server \
        target/release/loopguard none,off,table,probes ROUNDS SECS [CONNS]

The server runs with one worker on CPU 0, the agent and wrk on CPU 1. By
default wrk waits 1 ms between requests on each connection (a paced rate);
SAT=1 drives it at saturation. `none` is the server unattached. Needs root,
wrk and bpftool (`cargo xtask setup` installs them)."""
import json, os, re, subprocess, sys, time, glob

DELAY_SCRIPT = "/tmp/loopguard-request-cost-delay.lua"
with open(DELAY_SCRIPT, "w") as f:
    f.write("function delay()\n  return 1\nend\n")

SERVER = sys.argv[1]
AGENT = sys.argv[2]
MODES = sys.argv[3].split(",")
ROUNDS = int(sys.argv[4]) if len(sys.argv) > 4 else 2
SECS = int(sys.argv[5]) if len(sys.argv) > 5 else 5
CONNS = sys.argv[6] if len(sys.argv) > 6 else "4"

def cpu_ns(pid):
    total = 0
    for f in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            total += int(open(f).read().split()[0])
        except Exception:
            pass
    return total

def prog_ids(pid):
    ids = []
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            if "bpf-prog" in os.readlink(fd):
                info = open(f"/proc/{pid}/fdinfo/{os.path.basename(fd)}").read()
                m = re.search(r"prog_id:\s*(\d+)", info)
                if m: ids.append(int(m.group(1)))
        except Exception:
            pass
    return sorted(set(ids))

def prog_stats(ids):
    out = {}
    for i in ids:
        j = json.loads(subprocess.run(["bpftool", "prog", "show", "id", str(i), "-j"], capture_output=True, text=True).stdout)
        out[j.get("name", str(i))] = (j.get("run_time_ns", 0), j.get("run_cnt", 0))
    return out

srv = subprocess.Popen(["taskset", "-c", "0", SERVER, "--addr", "127.0.0.1:0", "--workers", "1"], stdout=subprocess.PIPE, text=True)
addr = srv.stdout.readline().strip().split()[-1]
pid = srv.pid
subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=1"])
url = f"http://{addr}/fast"
subprocess.run(["wrk", "-t1", "-c2", "-d1s", url], capture_output=True)
results = {m: [] for m in MODES}
try:
    for r in range(ROUNDS):
        order = MODES if r % 2 == 0 else list(reversed(MODES))
        for mode in order:
            agent = None
            if mode != "none":
                agent = subprocess.Popen(["taskset", "-c", "1", AGENT, "attach", "--pid", str(pid), "--format", "json", "--requests", mode, "--no-cumulative"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                while True:
                    line = agent.stdout.readline()
                    if not line or '"attached"' in line: break
                time.sleep(0.5)
            ids = prog_ids(agent.pid) if agent else []
            before = prog_stats(ids)
            c0 = cpu_ns(pid)
            w = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{CONNS}", f"-d{SECS}s", ] + ([] if os.environ.get("SAT") else ["-s", DELAY_SCRIPT]) + [url], capture_output=True, text=True).stdout
            c1 = cpu_ns(pid)
            after = prog_stats(ids)
            n = int(re.search(r"(\d+) requests in", w).group(1))
            bpf = {k: ((after[k][0]-before[k][0]), (after[k][1]-before[k][1])) for k in after if k in before}
            ours = ("poll_enter", "poll_exit", "request_start", "request_end")
            bpf_ns_req = sum(v[0] for k, v in bpf.items() if k in ours) / n
            per = {k: (round(v[0]/v[1]) if v[1] else 0, round(v[1]/n, 2)) for k, v in bpf.items() if v[1]}
            results[mode].append(((c1-c0)/n/1000, n/SECS, bpf_ns_req/1000))
            print(f"round {r} {mode:7s} reqs {n:6d} ({n/SECS:7.0f}/s) server cpu {(c1-c0)/n/1000:7.2f} us/req, bpf {bpf_ns_req/1000:5.2f} us/req {per}", flush=True)
            if agent:
                agent.send_signal(2)
                try: agent.wait(timeout=60)
                except Exception: agent.kill()
finally:
    srv.kill()
for m, rs in results.items():
    cpus = sorted(x[0] for x in rs)
    print(f"{m:7s} server cpu us/req: {' '.join(f'{c:.2f}' for c in cpus)}  median {cpus[len(cpus)//2]:.2f}; bpf us/req median {sorted(x[2] for x in rs)[len(rs)//2]:.2f}")
