"""Network faults, timed: three workers each in a network namespace of its own, the front
(the infermesh gateway, or nginx grpc_pass at its defaults as the reference) and the load
generator in another (tests/python/netns_mesh.py). 20 s of digits requests at concurrency
8 with 2 s deadlines; 5 s in, worker 1 gets the fault (for the slow link, worker 3):

  blackhole   iptables DROP both ways, to the end of the run
  reject      iptables REJECT --reject-with tcp-reset, to the end of the run
  partition   DROP, removed 10 s later
  sigstop     SIGSTOP of the worker's process, SIGCONT 10 s later
  slow        its link turns slow: 50 ms more each way (a userspace delay proxy)
  dns         the headless name drops worker 1 and adds worker 3; 3 s later worker 1 gets
              SIGTERM (a scale-down); 3 s after that the DNS server goes away. nginx, which
              resolves names once at start, has the first two workers' addresses.

Prints one table: requests sent and failed, when the faulted worker got its last new
request after the fault (the gateway's infermesh_gateway_worker_attempts_total sampled
every 100 ms; nginx's access log), its share of the attempts while faulted and the attempts
it got after the heal, and latency over the run and in the 5 s after the fault.

Needs root (ip netns). Release builds; run through bench/faults.sh.
    bench/netns_faults.py [--fronts infermesh,nginx] [--faults blackhole,...]
"""
import argparse
import json
import pathlib
import signal
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "python"))

from netns_mesh import Mesh  # noqa: E402

SECONDS, FAULT_AT, HEAL_AFTER, CONCURRENCY, DEADLINE = 20, 5, 10, 8, 2.0
FAULTS = ["none", "blackhole", "reject", "partition", "sigstop", "slow", "dns"]


def drop(mesh, addr, target):
    for rule in (("-A", "OUTPUT", "-d", addr), ("-A", "INPUT", "-s", addr)):
        extra = ("-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset") if target == "REJECT" else ("-j", "DROP")
        mesh.iptables(*rule, *extra)


def timeline(mesh, fault, front):
    """(seconds after the fault, action) pairs; and when the fault heals, if it does."""
    addr = "10.231.1.2"
    w1 = mesh.workers[0][1]
    if fault == "blackhole":
        return [(0, lambda: drop(mesh, addr, "DROP"))], None
    if fault == "reject":
        return [(0, lambda: drop(mesh, addr, "REJECT"))], None
    if fault == "partition":
        return [(0, lambda: drop(mesh, addr, "DROP")), (HEAL_AFTER, lambda: mesh.iptables("-F"))], HEAL_AFTER
    if fault == "sigstop":
        return [(0, lambda: w1.send_signal(signal.SIGSTOP)), (HEAL_AFTER, lambda: w1.send_signal(signal.SIGCONT))], HEAL_AFTER
    if fault == "slow":
        return [(0, mesh.turn_slow)], None
    if fault == "dns":
        steps = [(3, lambda: w1.send_signal(signal.SIGTERM))]
        if front == "infermesh":
            steps = [(0, lambda: mesh.set_dns(mesh.listed[1:])), *steps, (6, mesh.stop_dns)]
        return steps, None
    return [], None


def attempts_from_metrics(samples, faulted):
    """[(time, attempts to the faulted worker, attempts to all)] from the gateway's metrics.
    A worker that left the pool has no series any more: its last count stands."""
    known, out = {}, []
    for t, a in samples:
        known.update(a)
        out.append((t, known.get(faulted, 0), sum(known.values())))
    return out


def attempts_from_log(log, faulted):
    """The same from nginx's access log: each line is one request, with the workers tried."""
    events = []
    for line in log.splitlines():
        end, took, upstreams, _ = line.split(" ", 3)
        tried = upstreams.strip('"').replace(" : ", ", ").split(", ")
        events.append((float(end) - float(took), sum(u == faulted for u in tried), len(tried)))
    out, f, a = [], 0, 0
    for t, nf, na in sorted(events):
        f, a = f + nf, a + na
        out.append((t, f, a))
    return out


def at(series, t):
    """The cumulative counts at time t."""
    last = (0, 0)
    for when, f, a in series:
        if when > t:
            break
        last = (f, a)
    return last


def last_new(series, start, end):
    """Seconds from `start` to the faulted worker's last new attempt before `end`; None if
    it was still getting new ones in the window's last 2 s (it never stopped)."""
    base = at(series, start)[0]
    last = start
    for when, f, _ in series:
        if start < when <= end and f > base:
            base, last = f, when
    if last > end - 2:
        return None
    return last - start


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(front, fault):
    mesh = Mesh(front=front, release=True, metrics=True, dns=fault == "dns",
                slow_last=fault == "slow", slow_ms=0, later_ms=50)
    faulted = mesh.listed[-1] if fault == "slow" else mesh.listed[0]
    try:
        client = mesh.client("timed", mesh.url, str(SECONDS), str(CONCURRENCY), str(DEADLINE),
                             *([mesh.metrics_url] if mesh.metrics_url else []), background=True)
        time.sleep(FAULT_AT)  # pacing the fault inside the load
        t_fault = time.time()
        steps, heal = timeline(mesh, fault, front)
        for offset, action in steps:
            time.sleep(max(0.0, t_fault + offset - time.time()))
            action()
        out, _ = client.communicate(timeout=SECONDS + 120)
        got = json.loads(out)
        log = pathlib.Path(mesh.access_log).read_text() if front == "nginx" else None
    finally:
        mesh.close()
    requests = got["requests"]
    t_end = max(t + d for t, d, _ in requests)
    series = (attempts_from_metrics(got["attempts"], faulted) if front == "infermesh"
              else attempts_from_log(log, faulted))
    window_end = t_fault + heal if heal else t_end
    f0, a0 = at(series, t_fault)
    f1, a1 = at(series, window_end)
    after_heal = (at(series, t_end + 1)[0] - f1) if heal else None
    lat = [d * 1000 for _, d, ok in requests if ok]
    soon = [d * 1000 for t, d, ok in requests if ok and t_fault <= t < t_fault + 5]
    return {
        "sent": len(requests), "failed": sum(not ok for _, _, ok in requests),
        "stopped": None if fault in ("none", "slow") else last_new(series, t_fault, window_end),
        "share": (f1 - f0) / (a1 - a0) if a1 > a0 else float("nan"),
        "after_heal": after_heal,
        "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "p99_soon": pct(soon, 0.99),
        "max": max(d * 1000 for _, d, _ in requests),
    }


def row(front, fault, r):
    stopped = ("—" if fault in ("none", "slow") else "never" if r["stopped"] is None
               else f"{r['stopped']:.1f}")
    heal = "—" if r["after_heal"] is None else str(r["after_heal"])
    return (f"| {fault} | {front} | {r['sent']} | {r['failed']} | {stopped} | {r['share'] * 100:.0f} % | {heal} | "
            f"{r['p50']:.1f} | {r['p99']:.1f} | {r['p99_soon']:.1f} | {r['max']:.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fronts", default="infermesh,nginx")
    ap.add_argument("--faults", default=",".join(FAULTS))
    args = ap.parse_args()
    print(f"{SECONDS} s of digits requests, concurrency {CONCURRENCY}, {DEADLINE:.0f} s deadlines, 3 workers; "
          f"the fault {FAULT_AT} s in (worker 1; worker 3 for slow), healed {HEAL_AFTER} s later where it heals.\n")
    print("| fault | front | sent | failed | last new request to the faulted worker, s after the fault | "
          "its share while faulted | its attempts after the heal | p50 ms | p99 ms | p99 ms in the 5 s after | max ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for fault in args.faults.split(","):
        for front in args.fronts.split(","):
            print(row(front, fault, run(front, fault)), flush=True)


if __name__ == "__main__":
    main()
