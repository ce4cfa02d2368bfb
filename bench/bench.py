#!/usr/bin/env python3
"""Userspace WireGuard benchmark: plain veth vs wireguard-go vs boringtun-cli vs our engine;
and the eBPF datapath with no policy vs with ~1,000 policy rules loaded (variant `policy`).

Every variant gets its own pair of network namespaces joined by a veth (created here, removed
at the end, unique names). iperf3 runs over the tunnel (or the bare veth) with cubic congestion
control on both ends: TCP single stream and 4 streams, ping RTT on the idle tunnel, and CPU
(whole machine, and the tunnel processes alone) during the single-stream run. Rounds are
interleaved across variants so drift hits all of them alike. Prints min/median/max and the
ratios to veth and to wireguard-go, as a Markdown table.

The `policy` variant: three "nodes" (network namespaces), each with two pod namespaces behind
veths routed through the node: plain routing (no programs), the eBPF datapath with an empty
policy, and the datapath with the policy maps filled by the wiremesh-policy compiler from a
synthetic cluster (>= --policy-rules rule entries; the measured flow allowed by a named-port
ingress rule and an ipBlock egress rule). bpf/examples/datapath-bench loads and attaches the
programs and reports their kernel run-time statistics. TCP single stream pod a -> pod b, rounds
interleaved (order reversed every other round); prints the per-round ratio policy / no-policy (min / median / max)
and, per round, from_pod's cost under BPF_PROG_TEST_RUN (no network noise): a packet of an
established flow, the first packet of a new allowed flow, a denied packet.

The `floor` variant: what this machine allows any userspace engine, measured in the same run by
device/examples/engine-floor (no network I/O): how many Gbit/s one core moves through the noise
layer our engine drives (boringtun encapsulate + decapsulate, 1420-byte packets), and how long a
sleeping thread takes to wake (after 10 ms idle, and right after a round trip). From these and the
veth run it prints the best single-stream rate this machine could reach if a tunnel's only cost
were its crypto, and the part of our engine's CPU per Gbit/s that is not crypto (I/O and engine).
Every tunnel variant also gets a back-to-back RTT (ping -f): the path's cost without the idle
CPU's wake-up and cold caches.

Needs root, iperf3, ping, wg, wireguard-go. Run through `make bench`.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

PID = os.getpid()
KILL_LIST = []  # (pid) of processes we started
NS_LIST = []  # namespaces we created
SOCKETS = []  # UAPI sockets our tunnel processes serve


def sh(*args, check=True, capture=True, env=None, timeout=120):
    res = subprocess.run(list(args), capture_output=capture, text=True, env=env, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {res.stdout}\n{res.stderr}")
    return res.stdout if capture else ""


def nsx(ns, *args, **kw):
    return sh("ip", "netns", "exec", ns, *args, **kw)


def wait_for(what, fn, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class Topology:
    """Two namespaces a/b joined by a veth; optionally a tunnel on top."""

    def __init__(self, tag, idx):
        self.a = f"wmb{PID % 10000}{tag}a"
        self.b = f"wmb{PID % 10000}{tag}b"
        self.under = (f"192.168.{100 + idx}.1", f"192.168.{100 + idx}.2")
        self.tun_ip = (f"10.{100 + idx}.0.1", f"10.{100 + idx}.0.2")
        self.procs = []
        for ns in (self.a, self.b):
            sh("ip", "netns", "add", ns)
            NS_LIST.append(ns)
            nsx(ns, "ip", "link", "set", "lo", "up")
        va, vb = f"v{PID % 10000}{tag}a", f"v{PID % 10000}{tag}b"
        sh("ip", "link", "add", va, "netns", self.a, "type", "veth", "peer", "name", vb, "netns", self.b)
        nsx(self.a, "ip", "addr", "add", f"{self.under[0]}/24", "dev", va)
        nsx(self.b, "ip", "addr", "add", f"{self.under[1]}/24", "dev", vb)
        nsx(self.a, "ip", "link", "set", va, "up")
        nsx(self.b, "ip", "link", "set", vb, "up")
        self.target = self.under[1]
        self.source_ns = self.a
        self.server_ns = self.b

    def start_tunnel(self, kind, argv_for, env, tmp):
        tag = {"boringtun-cli": "t", "ours-busy-poll": "p"}.get(kind, kind[0])
        ifs = (f"wb{PID % 10000}{tag}a", f"wb{PID % 10000}{tag}b")
        keys = []
        for ns, ifname in zip((self.a, self.b), ifs):
            log = open(os.path.join(tmp, f"{ifname}.log"), "w")
            p = subprocess.Popen(["ip", "netns", "exec", ns] + argv_for(ifname),
                                 stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **env})
            KILL_LIST.append(p)
            self.procs.append(p)
            sock = f"/var/run/wireguard/{ifname}.sock"
            SOCKETS.append(sock)
            wait_for(f"{kind} socket {sock}", lambda: os.path.exists(sock) or p.poll() is not None)
            if p.poll() is not None:
                raise RuntimeError(f"{kind} exited: {open(log.name).read()}")
            priv = sh("wg", "genkey").strip()
            pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True).stdout.strip()
            kf = os.path.join(tmp, f"{ifname}.key")
            with open(kf, "w") as f:
                f.write(priv)
            keys.append((kf, pub))
        ports = (51901, 51902)
        for i, (ns, ifname) in enumerate(zip((self.a, self.b), ifs)):
            j = 1 - i
            nsx(ns, "wg", "set", ifname, "private-key", keys[i][0], "listen-port", str(ports[i]),
                "peer", keys[j][1], "endpoint", f"{self.under[j]}:{ports[j]}",
                "allowed-ips", f"{self.tun_ip[j]}/32")
            nsx(ns, "ip", "addr", "add", f"{self.tun_ip[i]}/24", "dev", ifname)
            nsx(ns, "ip", "link", "set", ifname, "up")
        self.target = self.tun_ip[1]
        wait_for(f"{kind} tunnel", lambda: subprocess.run(
            ["ip", "netns", "exec", self.a, "ping", "-c", "1", "-W", "1", self.target],
            capture_output=True).returncode == 0, timeout=30)

    def proc_cpu(self):
        total = 0
        for p in self.procs:
            try:
                with open(f"/proc/{p.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime (ticks)
            except FileNotFoundError:
                pass
        return total


def system_busy():
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def iperf(topo, seconds, streams):
    server = subprocess.Popen(["ip", "netns", "exec", topo.server_ns, "iperf3", "-s", "-1", "-B", topo.target],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    KILL_LIST.append(server)
    try:
        time.sleep(0.3)
        out = nsx(topo.source_ns, "iperf3", "-c", topo.target, "-t", str(seconds), "-P", str(streams),
                  "-C", "cubic", "-J", timeout=seconds + 60)
    finally:
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    data = json.loads(out)
    end = data["end"]
    # The default here is bbr (and cubic is not in the allowed list for new namespaces), so
    # iperf3 sets cubic per socket (-C, needs CAP_NET_ADMIN): check it took.
    used = end.get("sender_tcp_congestion")
    if used != "cubic":
        raise RuntimeError(f"iperf3 sender used congestion control {used!r}, not cubic")
    return end["sum_received"]["bits_per_second"] / 1e9, end["sum_sent"].get("retransmits", 0)


def ping_rtt(topo, count):
    """Median round-trip time in microseconds of `count` pings 10 ms apart (idle tunnel).
    The median, not the mean: a few multi-millisecond scheduling outliers on a shared
    machine would otherwise decide the result."""
    out = nsx(topo.source_ns, "ping", "-c", str(count), "-i", "0.01", topo.target)
    times = [float(tok.split("=")[1]) for tok in out.split() if tok.startswith("time=")]
    if len(times) < count // 2:
        raise RuntimeError(f"ping {topo.target}: only {len(times)} of {count} replies")
    return statistics.median(times) * 1000.0


def flood_rtt(topo, count):
    """Mean round-trip time in microseconds of `count` back-to-back pings (ping -f: the next one
    leaves when the previous reply arrives), so no CPU goes idle between them."""
    out = nsx(topo.source_ns, "ping", "-f", "-q", "-c", str(count), topo.target)
    m = re.search(r"= [0-9.]+/([0-9.]+)/", out)
    if not m or f"{count} received" not in out:
        raise RuntimeError(f"ping -f {topo.target}: {out.strip().splitlines()[-2:]}")
    return float(m.group(1)) * 1000.0


def engine_floor(binary):
    """Runs device/examples/engine-floor once; returns its JSON."""
    out = subprocess.run([binary, "--seconds", "1", "--wakes", "200"], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"engine-floor failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def measure_throughput(topo, seconds):
    ticks = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count()
    b0, t0 = system_busy()
    p0 = topo.proc_cpu()
    w0 = time.monotonic()
    single, retr = iperf(topo, seconds, 1)
    wall = time.monotonic() - w0
    b1, t1 = system_busy()
    p1 = topo.proc_cpu()
    cpu_sys = 100.0 * ncpu * (b1 - b0) / max(1, t1 - t0)
    cpu_tun = 100.0 * (p1 - p0) / ticks / wall
    time.sleep(1)
    multi, _ = iperf(topo, seconds, 4)
    time.sleep(1)
    return {"single": single, "multi": multi, "cpu_sys": cpu_sys, "cpu_tunnel": cpu_tun, "retransmits": retr}


class PodPair:
    """A node namespace routing between two pod namespaces (pod a 10.2x.1.2, pod b 10.2x.2.2)."""

    def __init__(self, tag, idx):
        base = f"wmp{PID % 10000}{tag}"
        self.node, self.pa, self.pb = f"{base}n", f"{base}a", f"{base}b"
        self.host_a, self.host_b = f"h{PID % 10000}{tag}a", f"h{PID % 10000}{tag}b"
        self.ip_a, self.ip_b = f"10.{220 + idx}.1.2", f"10.{220 + idx}.2.2"
        for ns in (self.node, self.pa, self.pb):
            sh("ip", "netns", "add", ns)
            NS_LIST.append(ns)
            nsx(ns, "ip", "link", "set", "lo", "up")
        for ns, host, ip in ((self.pa, self.host_a, self.ip_a), (self.pb, self.host_b, self.ip_b)):
            gw = ip.rsplit(".", 1)[0] + ".1"
            sh("ip", "-n", self.node, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", gw)
            sh("ip", "-n", self.node, "addr", "add", f"{gw}/24", "dev", host)
            sh("ip", "-n", self.node, "link", "set", host, "up")
        for k in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"):
            nsx(self.node, "sysctl", "-qw", k)
        self.loader = None
        self.loaded = None
        # What iperf() expects of a topology.
        self.source_ns, self.server_ns, self.target = self.pa, self.pb, self.ip_b

    def load(self, binary, bpffs, rules, port):
        pin = os.path.join(bpffs, self.node)
        self.loader = subprocess.Popen(
            [binary, "--netns", self.node, "--pin-dir", pin, "--iface", self.host_a, "--iface", self.host_b,
             "--pod-a", self.ip_a, "--pod-b", self.ip_b, "--port", str(port), "--rules", str(rules)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        KILL_LIST.append(self.loader)
        line = self.loader.stdout.readline()
        if not line:
            raise RuntimeError(f"datapath-bench exited ({self.loader.wait()}) without loading")
        self.loaded = json.loads(line)

    def test_runs(self):
        self.loader.stdin.write("testrun\n")
        self.loader.stdin.flush()
        return json.loads(self.loader.stdout.readline())

    def stats(self):
        self.loader.stdin.write("stats\n")
        self.loader.stdin.flush()
        return json.loads(self.loader.stdout.readline())

    def probe(self, port):
        """'open', 'refused' or 'timeout' for a TCP connect a -> b:port."""
        code = ("import socket,sys\n"
                "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5); print('open')\n"
                "except ConnectionRefusedError: print('refused')\n"
                "except OSError: print('timeout')\n")
        return nsx(self.pa, "python3", "-c", code, self.ip_b, str(port)).strip()


def policy_bench(args):
    """eBPF datapath throughput, no policy vs --policy-rules rules; returns the printed report."""
    port = 5201
    bpffs = tempfile.mkdtemp(prefix="wm-bench-bpffs-")
    sh("mount", "-t", "bpf", "bpf", bpffs)
    pairs = {}
    try:
        for idx, (name, rules) in enumerate((("routed", None), ("ebpf-no-policy", 0),
                                             (f"ebpf-{args.policy_rules}-rules", args.policy_rules))):
            pair = PodPair("rnp"[idx], idx)
            if rules is not None:
                pair.load(args.datapath_bench, bpffs, rules, port)
            pairs[name] = pair
        names = list(pairs)
        none_name, rules_name = names[1], names[2]
        # The policy really is enforced on this path, and the path works without it.
        for name in names[1:]:
            wait_for(f"{name}: pod a reaches pod b", lambda: subprocess.run(
                ["ip", "netns", "exec", pairs[name].pa, "ping", "-c", "1", "-W", "1", pairs[name].ip_b],
                capture_output=True).returncode == 0 or name == rules_name, timeout=10)
        got = pairs[none_name].probe(port + 1), pairs[rules_name].probe(port + 1)
        if got != ("refused", "timeout"):
            raise RuntimeError(f"tcp/{port + 1} a -> b: expected refused without policy and dropped with it, got {got}")
        results = {n: [] for n in names}
        for r in range(args.policy_runs):
            # Alternate the order so no variant always follows the same one.
            for name in (names if r % 2 == 0 else names[::-1]):
                pair = pairs[name]
                s0 = pair.stats() if pair.loader else None
                gbit, retr = iperf(pair, args.time, 1)
                m = {"single": gbit, "retransmits": retr}
                if s0:
                    s1 = pair.stats()
                    busy = sum(s1[p]["run_ns"] - s0[p]["run_ns"] for p in ("from_pod", "to_pod"))
                    m["prog_cpu_pct"] = 100.0 * busy / (args.time * 1e9)
                    for prog in ("from_pod", "to_pod"):
                        runs = s1[prog]["runs"] - s0[prog]["runs"]
                        m[f"{prog}_runs"] = runs
                        m[f"{prog}_ns"] = (s1[prog]["run_ns"] - s0[prog]["run_ns"]) / max(1, runs)
                if pair.loader:
                    m.update(pair.test_runs())
                results[name].append(m)
                extra = (f"  from_pod {m['from_pod_ns']:.0f} ns/run ({m['from_pod_runs']} runs)"
                         if "from_pod_ns" in m else "")
                print(f"policy run {r + 1}/{args.policy_runs} {name:18s} {gbit:.2f} Gbit/s  retr {retr}{extra}",
                      flush=True)
                time.sleep(0.5)
    finally:
        for pair in pairs.values():
            if pair.loader and pair.loader.poll() is None:
                pair.loader.stdin.close()
                pair.loader.wait(timeout=10)
        for pair in pairs.values():
            for ns in (pair.pa, pair.pb, pair.node):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
                NS_LIST.remove(ns)
        subprocess.run(["umount", bpffs], capture_output=True)
        os.rmdir(bpffs)

    loaded = pairs[rules_name].loaded
    ratios = [p["single"] / n["single"] for p, n in zip(results[rules_name], results[none_name])]
    lines = [
        "",
        f"eBPF datapath, TCP 1 stream pod a -> pod b through the node (from_pod/to_pod on both veths): "
        f"{args.policy_runs} interleaved rounds x {args.time} s, cubic, {os.cpu_count()} cores, kernel {os.uname().release}",
        f"policy loaded: {loaded['policies']} NetworkPolicies compiled to {loaded['rules']} rule entries, "
        f"{loaded['isolated']} isolation entries, {loaded['cidrs']} CIDR entries, {loaded['endpoints']} endpoints",
        "",
        "| variant | TCP 1 stream Gbit/s (min / median / max) | from_pod ns/run (min / median / max) | to_pod ns/run "
        "| programs' CPU % of one core (median) | test run ns: established / new flow / denied (median) |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        rs = results[name]
        fp = fmt3([x["from_pod_ns"] for x in rs], "{:.0f}") if "from_pod_ns" in rs[0] else "-"
        tp = fmt3([x["to_pod_ns"] for x in rs], "{:.0f}") if "to_pod_ns" in rs[0] else "-"
        cpu = f"{statistics.median(x['prog_cpu_pct'] for x in rs):.1f}" if "prog_cpu_pct" in rs[0] else "-"
        tr = "-"
        if "established_ns" in rs[0]:
            def tmed(key):
                vals = [x[key] for x in rs if x[key] is not None]
                return f"{statistics.median(vals):.0f}" if vals else "-"
            tr = f"{tmed('established_ns')} / {tmed('new_flow_ns')} / {tmed('denied_ns')}"
        lines.append(f"| {name} | {fmt3([x['single'] for x in rs])} | {fp} | {tp} | {cpu} | {tr} |")
    med_ratio = statistics.median(x["single"] for x in results[rules_name]) / \
        statistics.median(x["single"] for x in results[none_name])
    lines += [
        "",
        f"throughput with {loaded['rules']} rules / no policy, per round (min / median / max): {fmt3(ratios)}; "
        f"ratio of the medians {med_ratio:.2f} (target >= 0.95)",
    ]
    if args.json:
        with open(args.json + ".policy.json", "w") as f:
            json.dump({"loaded": loaded, "results": results, "ratios": ratios}, f, indent=1)
    return "\n".join(lines)


def cleanup():
    for p in KILL_LIST:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in KILL_LIST:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for ns in NS_LIST:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for s in SOCKETS:
        try:
            os.unlink(s)
        except FileNotFoundError:
            pass


def fmt3(vals, f="{:.2f}"):
    return f"{f.format(min(vals))} / {f.format(statistics.median(vals))} / {f.format(max(vals))}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", help="mesh-agent binary (release); needed for ours, ours-busy-poll")
    ap.add_argument("--boringtun", help="boringtun-cli binary; needed for boringtun-cli")
    ap.add_argument("--datapath-bench", help="bpf/examples/datapath-bench binary; needed for policy")
    ap.add_argument("--engine-floor", help="device/examples/engine-floor binary; needed for floor")
    ap.add_argument("--policy-rules", type=int, default=1000, help="rule entries for the policy variant")
    ap.add_argument("--policy-runs", type=int, default=7, help="interleaved rounds of the policy variant")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--time", type=int, default=5, help="seconds per iperf3 run")
    ap.add_argument("--only", default="veth,wireguard-go,boringtun-cli,ours,ours-busy-poll,floor,policy")
    ap.add_argument("--json", help="also write raw results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (network namespaces)")

    variants = {
        "veth": None,
        "wireguard-go": (lambda ifn: ["wireguard-go", "-f", ifn],
                         {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}),
        "boringtun-cli": (lambda ifn: [args.boringtun, "-f", "--disable-drop-privileges", ifn], {"WG_SUDO": "1"}),
        "ours": (lambda ifn: [args.ours, "device", "--foreground", ifn], {}),
        # Opt-in busy polling (20 ms > the 10 ms ping interval: the workers never sleep while
        # pings flow), to show what the thread wake-ups cost in latency and CPU.
        "ours-busy-poll": (lambda ifn: [args.ours, "device", "--foreground", "--busy-poll-us", "20000", ifn], {}),
    }
    chosen = [v for v in args.only.split(",") if v]
    for v in chosen:
        if v not in variants and v not in ("policy", "floor"):
            sys.exit(f"bench: unknown variant {v!r}")
    for v, need in (("ours", "ours"), ("ours-busy-poll", "ours"), ("boringtun-cli", "boringtun"),
                    ("policy", "datapath_bench"), ("floor", "engine_floor")):
        if v in chosen and not getattr(args, need):
            sys.exit(f"bench: variant {v} needs --{need.replace('_', '-')}")
    run_policy = "policy" in chosen
    run_floor = "floor" in chosen
    chosen = [v for v in chosen if v not in ("policy", "floor")]
    floors = []
    # Tunnel logs and private keys; removed at the end.
    tmp = tempfile.mkdtemp(prefix="wm-bench-")
    results = {v: [] for v in chosen}
    try:
        topos = {}
        for idx, name in enumerate(chosen):
            topo = Topology({"boringtun-cli": "t", "ours-busy-poll": "p"}.get(name, name[0]), idx)
            if variants[name] is not None:
                argv_for, env = variants[name]
                topo.start_tunnel(name, argv_for, env, tmp)
            topos[name] = topo
        for r in range(args.runs):
            # RTT of every variant first, on idle tunnels, before this round's bulk transfers.
            rtts = {name: ping_rtt(topos[name], 200) for name in chosen}
            floods = {name: flood_rtt(topos[name], 5000) for name in chosen}
            for name in chosen:
                m = measure_throughput(topos[name], args.time)
                m["rtt_us"] = rtts[name]
                m["flood_rtt_us"] = floods[name]
                results[name].append(m)
                print(f"run {r + 1}/{args.runs} {name:14s} single {m['single']:.2f} Gbit/s  4x {m['multi']:.2f}"
                      f"  rtt {m['rtt_us']:.0f} us (back-to-back {m['flood_rtt_us']:.0f})"
                      f"  cpu {m['cpu_sys']:.0f}% (tunnel {m['cpu_tunnel']:.0f}%)"
                      f"  retr {m['retransmits']}", flush=True)
            if run_floor:
                f = engine_floor(args.engine_floor)
                floors.append(f)
                print(f"run {r + 1}/{args.runs} floor          noise layer {f['noise_gbps']:.2f} Gbit/s per core"
                      f"  wake-up {f['wake_cold_us']:.0f} us after 10 ms idle, {f['wake_warm_us']:.0f} us warm",
                      flush=True)
    finally:
        cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    policy_report = policy_bench(args) if run_policy else None
    if chosen:
        print_tunnel_table(args, chosen, results)
    if floors:
        print_floor(floors, results)
    if policy_report:
        print(policy_report)


def print_tunnel_table(args, chosen, results):
    def med(name, key):
        return statistics.median(x[key] for x in results[name]) if name in results and results[name] else None

    print()
    print(f"Results: {args.runs} interleaved runs x {args.time} s per iperf3 run, cubic, "
          f"{os.cpu_count()} cores, kernel {os.uname().release}")
    print()
    print("| variant | TCP 1 stream Gbit/s (min / median / max) | TCP 4 streams Gbit/s | ping RTT us (median of 200) | "
          "back-to-back RTT us (ping -f, mean) | "
          "CPU % machine / tunnel procs / tunnel per Gbit/s | 1-stream x veth | 1-stream x wireguard-go | RTT over veth us |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in chosen:
        rs = results[name]
        single = [x["single"] for x in rs]
        multi = [x["multi"] for x in rs]
        rtt = [x["rtt_us"] for x in rs]
        flood = [x["flood_rtt_us"] for x in rs]
        xv = f"{med(name, 'single') / med('veth', 'single'):.2f}" if "veth" in results else "-"
        xg = f"{med(name, 'single') / med('wireguard-go', 'single'):.1f}" if "wireguard-go" in results else "-"
        ro = f"{med(name, 'rtt_us') - med('veth', 'rtt_us'):+.0f}" if "veth" in results else "-"
        per_gbit = f"{med(name, 'cpu_tunnel') / med(name, 'single'):.0f}" if name != "veth" else "-"
        print(f"| {name} | {fmt3(single)} | {fmt3(multi)} | {fmt3(rtt, '{:.0f}')} | {fmt3(flood, '{:.0f}')} | "
              f"{med(name, 'cpu_sys'):.0f} / {med(name, 'cpu_tunnel'):.0f} / {per_gbit} | {xv} | {xg} | {ro} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def print_floor(floors, results):
    """What the machine allows: the crypto-only ceiling and the wake-up cost, next to ours."""
    ncpu = os.cpu_count()
    noise = statistics.median(f["noise_gbps"] for f in floors)
    cold = statistics.median(f["wake_cold_us"] for f in floors)
    warm = statistics.median(f["wake_warm_us"] for f in floors)
    print()
    print(f"Floors (device/examples/engine-floor, {len(floors)} runs interleaved with the above, no network I/O):")
    print(f"- noise layer (boringtun encapsulate + decapsulate, {floors[0]['packet_bytes']}-byte packets) on one core: "
          f"{noise:.2f} Gbit/s, i.e. {100.0 / noise:.1f} % of a core per Gbit/s carried")
    print(f"- wake-up of a thread blocked in read(2): {cold:.0f} us after 10 ms idle, {warm:.0f} us right after a round trip")
    if "veth" in results and results["veth"]:
        veth = statistics.median(x["single"] for x in results["veth"])
        tcp = statistics.median(x["cpu_sys"] / x["single"] for x in results["veth"])
        ceiling = ncpu * 100.0 / (tcp + 100.0 / noise)
        print(f"- TCP itself (iperf3 ends and both stacks, veth run): {tcp:.1f} % CPU per Gbit/s; with both tunnel ends "
              f"on these {ncpu} cores, a tunnel whose only cost were the noise layer would top out at {ceiling:.2f} Gbit/s "
              f"= {ceiling / veth:.2f}x veth (no I/O, no engine: an upper bound)")
        if "ours" in results and results["ours"]:
            ours = statistics.median(x["single"] for x in results["ours"])
            per = statistics.median(x["cpu_tunnel"] / x["single"] for x in results["ours"])
            print(f"- ours: {ours:.2f} Gbit/s = {ours / veth:.2f}x veth = {ours / ceiling:.2f} of that ceiling; tunnel "
                  f"processes {per:.1f} % CPU per Gbit/s, of which noise layer {100.0 / noise:.1f}, TUN/UDP I/O and "
                  f"engine {per - 100.0 / noise:.1f}")
            rtt = statistics.median(x["rtt_us"] for x in results["ours"])
            vrtt = statistics.median(x["rtt_us"] for x in results["veth"])
            floor = vrtt + 2 * cold + warm
            print(f"- idle RTT over veth, ours: {rtt - vrtt:+.0f} us. Estimated floor for a userspace tunnel that sleeps "
                  f"when idle: the encrypted datagrams make the same veth round trip the baseline ping makes "
                  f"({vrtt:.0f} us), plus the wake-ups of the two idle workers and of the first one again for the "
                  f"reply ({2 * cold + warm:.0f} us): +{floor:.0f} us; without the wake-ups (busy polling) +{vrtt:.0f} us")


if __name__ == "__main__":
    main()
