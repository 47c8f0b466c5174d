"""``python -m bench.profile``: where jobgate's time goes, per process, under one kind of load.

Starts the same stack as the benchmark (a private Redis, one gateway, workers), runs one
measurement of the benchmark's jobgate adapter (``batched``, ``unary``, ``client`` or ``latency``) and
reports, for Redis, the gateway, each worker and the submitting client, the CPU time each used
per job (from /proc, so it counts only that process, whatever else the machine runs). With
``--py-spy`` (``pip install py-spy``) it also samples the gateway and the first worker while
they hold the GIL and prints the functions with the most samples, themselves and with callees.
With ``--scripts`` it also reports Redis's own time per script call and per job, by script, from
Redis's SLOWLOG set to log every command (which costs Redis a little time itself).
docs/PERFORMANCE.md records what this showed.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis as redis_client

from bench.systems.jobgate import Jobgate, cpu_s
from devtools.servers import RedisProcess
from protocol.scripts import NAMES, source


def hot_spots(raw: Path, top: int) -> str:
    """The functions with most samples in a py-spy raw (collapsed stacks) file."""
    own: collections.Counter[str] = collections.Counter()
    total_with_callees: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].split(":")[0].rstrip(")") for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            total_with_callees[frame] += n
    if not total:
        return "  (no samples)"
    lines = ["  own time:"]
    lines += [f"    {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    lines += ["  with callees:"]
    lines += [f"    {n / total:6.1%}  {name}" for name, n in total_with_callees.most_common(top + 8)]
    return "\n".join(lines)


def script_names() -> dict[str, str]:
    """Script name by SHA1 of its full text (as Redis names it in EVALSHA), plain and sharded."""
    return {
        hashlib.sha1(source(name, sharded=sharded).encode()).hexdigest(): name
        for name in NAMES
        for sharded in (False, True)
    }


def script_times(url: str, jobs: int) -> str:
    """Redis's time per script call, and in all per job, from a SLOWLOG that logged every command."""
    names = script_names()
    calls: collections.Counter[str] = collections.Counter()
    micros: collections.Counter[str] = collections.Counter()
    with redis_client.Redis.from_url(url) as r:
        for entry in r.slowlog_get(r.slowlog_len()):
            args = entry["command"].split()
            command = args[0].decode().lower() if args else "?"
            name = names.get(args[1].decode(), "?") if command == "evalsha" and len(args) > 1 else command
            calls[name] += 1
            micros[name] += entry["duration"]
    lines = [f"{'Redis, by command':<20} {'calls':>8} {'µs per call':>12} {'µs per job':>11}"]
    for name, total in micros.most_common():
        lines.append(f"{name:<20} {calls[name]:>8,} {total / calls[name]:12.0f} {total / jobs:11.1f}")
    lines.append(f"{'all':<20} {sum(calls.values()):>8,} {'':>12} {sum(micros.values()) / jobs:11.1f}")
    return "\n".join(lines)


def measure(system: Jobgate, args: argparse.Namespace) -> tuple[int, str]:
    """Runs the chosen load once: the jobs it ran and its figure (a rate, or latency percentiles)."""
    if args.load == "batched":
        return args.jobs, f"{system.batched(args.jobs, args.payload):,.0f} jobs/s"
    if args.load == "unary":
        return args.jobs // 4, f"{system.unary(args.jobs // 4, 32):,.0f} jobs/s"
    if args.load == "client":
        return args.jobs // 2, f"{system.client_unary(args.jobs // 2, 32):,.0f} jobs/s"
    trips = sorted(system.round_trips(args.jobs // 10))
    return len(trips), f"RunJob p50 {trips[len(trips) // 2]:.2f} ms, p99 {trips[int(len(trips) * 0.99)]:.2f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("load", choices=("batched", "unary", "client", "latency"))
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs (latency: round trips, 1/10 of this)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--payload", type=int, default=0, help="batched: bytes of payload per job (echoed back)")
    parser.add_argument("--py-spy", action="store_true", help="also sample the gateway and a worker with py-spy")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--scripts", action="store_true", help="also report Redis's time per script (SLOWLOG)")
    args = parser.parse_args()
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if args.py_spy and not spy:
        parser.error("py-spy is not installed: pip install py-spy")
    redis = RedisProcess().start()
    system = Jobgate(redis.url)
    out = Path(tempfile.mkdtemp(prefix="jobgate-profile-"))
    try:
        system.start(args.workers)
        assert system.stack
        pids = {"redis": redis.pid, "gateway": system.gateway_pid, "client": os.getpid()}
        pids |= {f"worker {i + 1}": w.pid for i, w in enumerate(system.stack.workers)}
        samplers = []
        if args.py_spy and spy:
            for name in ("gateway", "worker 1"):
                cmd = [spy, "record", "--gil", "--nonblocking", "-r", "250", "-f", "raw", "-p", str(pids[name])]
                cmd += ["-o", str(out / f"{name}.txt")]
                samplers.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1)  # py-spy attaches
        if args.scripts:
            with redis_client.Redis.from_url(redis.url) as r:
                r.config_set("slowlog-max-len", 1_000_000)
                r.config_set("slowlog-log-slower-than", 0)
                r.slowlog_reset()
        before = {name: cpu_s(pid) for name, pid in pids.items()}
        began = time.perf_counter()
        jobs, figure = measure(system, args)
        elapsed = time.perf_counter() - began
        used = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
        for sampler in samplers:
            sampler.send_signal(2)  # SIGINT: py-spy writes what it has
            sampler.wait(timeout=30)
        scripts = script_times(redis.url, jobs) if args.scripts else ""
    finally:
        system.stop()
        redis.stop()
    print(f"{args.load}: {jobs:,} jobs in {elapsed:.1f} s, {figure}")
    print(f"{'process':<10} {'CPU %':>7} {'CPU µs per job':>15}")
    for name, seconds in used.items():
        print(f"{name:<10} {seconds / elapsed:7.0%} {seconds / jobs * 1e6:15.0f}")
    print(f"{'all':<10} {sum(used.values()) / elapsed:7.0%} {sum(used.values()) / jobs * 1e6:15.0f}")
    if scripts:
        print(f"\n{scripts}")
    for name in ("gateway", "worker 1"):
        if (out / f"{name}.txt").exists():
            print(f"\n{name} (py-spy, samples holding the GIL):\n{hot_spots(out / f'{name}.txt', args.top)}")
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
