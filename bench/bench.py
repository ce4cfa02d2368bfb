#!/usr/bin/env python3
"""Userspace WireGuard benchmark: plain veth vs wireguard-go vs boringtun-cli vs our engine.

Every variant gets its own pair of network namespaces joined by a veth (created here, removed
at the end, unique names). iperf3 runs over the tunnel (or the bare veth) with cubic congestion
control on both ends: TCP single stream and 4 streams, ping RTT on the idle tunnel, and CPU
(whole machine, and the tunnel processes alone) during the single-stream run. Rounds are
interleaved across variants so drift hits all of them alike. Prints min/median/max and the
ratios to veth and to wireguard-go, as a Markdown table.

Needs root, iperf3, ping, wg, wireguard-go. Run through `make bench`.
"""

import argparse
import json
import os
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
    ap.add_argument("--ours", required=True, help="mesh-agent binary (release)")
    ap.add_argument("--boringtun", required=True, help="boringtun-cli binary")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--time", type=int, default=5, help="seconds per iperf3 run")
    ap.add_argument("--only", default="veth,wireguard-go,boringtun-cli,ours,ours-busy-poll")
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
            for name in chosen:
                m = measure_throughput(topos[name], args.time)
                m["rtt_us"] = rtts[name]
                results[name].append(m)
                print(f"run {r + 1}/{args.runs} {name:14s} single {m['single']:.2f} Gbit/s  4x {m['multi']:.2f}"
                      f"  rtt {m['rtt_us']:.0f} us  cpu {m['cpu_sys']:.0f}% (tunnel {m['cpu_tunnel']:.0f}%)"
                      f"  retr {m['retransmits']}", flush=True)
    finally:
        cleanup()

    def med(name, key):
        return statistics.median(x[key] for x in results[name]) if name in results and results[name] else None

    print()
    print(f"Results: {args.runs} interleaved runs x {args.time} s per iperf3 run, cubic, "
          f"{os.cpu_count()} cores, kernel {os.uname().release}")
    print()
    print("| variant | TCP 1 stream Gbit/s (min / median / max) | TCP 4 streams Gbit/s | ping RTT us (median of 200) | "
          "CPU % machine / tunnel procs / tunnel per Gbit/s | 1-stream x veth | 1-stream x wireguard-go | RTT over veth us |")
    print("|---|---|---|---|---|---|---|---|")
    for name in chosen:
        rs = results[name]
        single = [x["single"] for x in rs]
        multi = [x["multi"] for x in rs]
        rtt = [x["rtt_us"] for x in rs]
        xv = f"{med(name, 'single') / med('veth', 'single'):.2f}" if "veth" in results else "-"
        xg = f"{med(name, 'single') / med('wireguard-go', 'single'):.1f}" if "wireguard-go" in results else "-"
        ro = f"{med(name, 'rtt_us') - med('veth', 'rtt_us'):+.0f}" if "veth" in results else "-"
        per_gbit = f"{med(name, 'cpu_tunnel') / med(name, 'single'):.0f}" if name != "veth" else "-"
        print(f"| {name} | {fmt3(single)} | {fmt3(multi)} | {fmt3(rtt, '{:.0f}')} | "
              f"{med(name, 'cpu_sys'):.0f} / {med(name, 'cpu_tunnel'):.0f} / {per_gbit} | {xv} | {xg} | {ro} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
