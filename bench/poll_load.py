"""What browsers polling the Train tab cost a live training run (a benchmark, not a test).

Starts the real app (``build_app``, served by Gradio on 127.0.0.1) in this process with a real tiny
training run (``builtin:tiny-sd15``, the built-in sample dataset, resolution 128, no checkpoints or
validation images unless --set asks), then compares training with no clients and with N clients
that poll the Train tab the way browsers do. The clients are a separate process with one thread
per client, each with its own session hash and a kept-alive HTTP connection: every ``--interval``
seconds it does what the Train tab's timer does (GET the ``/lora-gui/train-poll`` route its
JavaScript fetches; in older versions, the Gradio event ``/gradio_api/run/train_poll``), and, as the
browser does, it calls every event that listens to ``change`` on one of the poll's outputs whenever
that output's value changed. Endpoints and wiring are read from the app's ``/config``, so the
benchmark follows the UI as built (older UIs are measured the same way).

    python bench/poll_load.py                          # 20 clients, 3 rounds of 20 s phases
    python bench/poll_load.py --clients 5 --seconds 30 --rounds 5
    python bench/poll_load.py --set sample.every=10    # any config override (validation images on)
    python bench/poll_load.py --json                   # one JSON line instead of a table

Phases alternate: 0 clients, N clients, 0 clients, ... (--rounds N-client phases), after a warm-up
of --warmup-steps steps; each N-client phase starts after the clients have polled for
--client-warmup seconds (a tab's first poll fetches everything). Step times are wall-clock times
between consecutive optimizer steps (a ``Progress`` event each), so they include any time the
training thread waits for the GIL. One line per phase, then:

- median_step_ms_0_clients / _n_clients and step_time_ratio (N over 0); per round too (each
  N-client phase against the 0-client phases on both sides of it);
- steps_per_s for both, polls_per_s, requests_per_s (polls plus the refreshes they triggered),
  errors and the median poll latency;
- server_cpu_ms_per_poll: CPU of the server's Python threads except the training thread (the uvicorn
  loop and the worker threads that run the handlers), read from /proc per thread, minus their idle
  rate in the 0-client phases, divided by the polls; the refreshes a poll triggered count in it;
- other_processes_cores: CPU used meanwhile by other processes on the machine. They slow training
  too: rounds where they used more than --max-other-cores are left out (unless all of them are).

The clients share the machine's CPUs with the server, as a browser on the same machine would; their
own CPU is not counted in server_cpu_ms_per_poll but shown as client_cpu_ms_per_poll (it too takes
cores from training here).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

POLL_API = "train_poll"


# ----------------------------------------------------------------------------- the clients (own process)


def event_graph(url: str) -> tuple[dict, dict[int, list[dict]]]:
    """The poll event, and for each component id the events that run when its value changes.

    The poll is the Train tab's timer event: a Gradio event named ``train_poll`` in older versions; now
    JavaScript in the browser that GETs a bare route (its path is read from the event's ``js`` and put
    into the returned dict as ``route``).
    """
    with urllib.request.urlopen(url + "config", timeout=30) as response:
        config = json.loads(response.read())
    deps = config["dependencies"]
    poll = next((dep for dep in deps if dep.get("api_name") == POLL_API), None)
    if poll is None:
        poll = next(dep for dep in deps if any(event == "tick" for _, event in dep["targets"]))
        route = re.search(r'"(lora-gui/[\w-]+)"', poll.get("js") or "")
        if poll.get("backend_fn") or route is None:
            raise SystemExit("the Train tab's timer event is neither train_poll nor a fetch of a lora-gui route")
        poll = {**poll, "route": route.group(1)}
    on_change: dict[int, list[dict]] = {}
    for dep in deps:
        for target_id, event in dep["targets"]:
            if event == "change" and target_id in poll["outputs"]:
                if dep.get("queue") is not False:
                    raise SystemExit(f"event {dep.get('api_name')} is queued; this client only speaks /run")
                on_change.setdefault(target_id, []).append(dep)
    return poll, on_change


class BrowserLike:
    """One browser tab: polls on a timer, keeps output values, fires change listeners like the frontend.

    Like a browser it keeps its HTTP connection open between requests.
    """

    def __init__(self, url: str, poll: dict, on_change: dict, log: list) -> None:
        self.url, self.poll, self.on_change, self.log = url, poll, on_change, log
        self.session = uuid.uuid4().hex[:11]
        self.values: dict[int, object] = {}
        self.connection: http.client.HTTPConnection | None = None

    def post(self, api_name: str, body: dict) -> dict:
        return self.request("POST", f"gradio_api/run/{api_name}", json.dumps(body))

    def request(self, method: str, path: str, body: str | None = None) -> dict:
        if self.connection is None:
            address = urllib.parse.urlparse(self.url)
            self.connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            self.connection.request(method, f"{urllib.parse.urlparse(self.url).path}{path}", body, headers)
            response = self.connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            self.connection.close()
            self.connection = None
            raise
        if response.status != 200:
            raise OSError(f"HTTP {response.status}: {payload[:200]!r}")
        return json.loads(payload)

    def call(self, dep: dict, kind: str) -> None:
        data = [self.values.get(i) for i in dep["inputs"]]  # State inputs go as null, as the browser sends them
        body = {"data": data, "event_data": None, "fn_index": dep["id"], "trigger_id": None,
                "session_hash": self.session}
        started = time.time()
        try:
            if "route" in dep:  # the timer's JavaScript: a GET, no Gradio event
                result = {"data": self.request("GET", dep["route"])}
            else:
                result = self.post(dep["api_name"], body)
        except (OSError, http.client.HTTPException) as exc:
            self.log.append((started, time.time(), kind, repr(exc)))
            return
        self.log.append((started, time.time(), kind, None))
        changed = []
        for comp_id, value in zip(dep["outputs"], result["data"], strict=False):
            if isinstance(value, dict) and value.get("__type__") == "update":
                if "value" not in value:
                    continue
                value = value["value"]
            if self.values.get(comp_id, "\0unset") != value:
                self.values[comp_id] = value
                changed.append(comp_id)
        for comp_id in changed:
            for listener in self.on_change.get(comp_id, []):
                self.call(listener, "refresh")

    def run(self, interval: float, until: float) -> None:
        time.sleep(random.uniform(0, interval))  # tabs opened at different moments
        while time.time() < until:
            started = time.time()
            self.call(self.poll, "poll")
            time.sleep(max(0.0, interval - (time.time() - started)))


def client_main(args: argparse.Namespace) -> None:
    poll, on_change = event_graph(args.url)
    until = time.time() + args.duration
    logs: list[list] = [[] for _ in range(args.clients)]
    threads = [threading.Thread(target=BrowserLike(args.url, poll, on_change, logs[i]).run,
                                args=(args.interval, until), daemon=True) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    json.dump([row for log in logs for row in log], sys.stdout)


# ----------------------------------------------------------------------------- the server side (this process)


def python_thread_cpu(exclude: set[int]) -> float:
    """CPU seconds of this process's live Python threads, except the native thread ids in ``exclude``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for thread in threading.enumerate():
        tid = thread.native_id
        if tid is None or tid in exclude:
            continue
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def machine_busy_cpu() -> float:
    """CPU seconds all processes on the machine have used (busy time from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def pid_cpu(pid: int | None) -> float:
    """CPU seconds of a running process (all its threads); 0 for None."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class StepClock:
    """Wall-clock time of every finished optimizer step (a ``Progress`` event), recorded as it arrives."""

    def __init__(self, runner) -> None:
        from lora_gui.events import Progress

        self.times: list[tuple[int, float]] = []
        record = runner._record  # benchmark instrumentation: the engine calls this for every event

        def timed(event) -> None:
            if isinstance(event, Progress):
                self.times.append((event.step, time.perf_counter()))
            record(event)

        runner._record = timed

    def intervals(self, start: float, end: float) -> list[float]:
        """Seconds between consecutive steps that both finished inside [start, end]."""
        inside = [(step, t) for step, t in self.times if start <= t <= end]
        return [b - a for (sa, a), (sb, b) in zip(inside, inside[1:], strict=False) if sb == sa + 1]


class Meter:
    def __init__(self, runner) -> None:
        self.runner = runner

    def read(self, client_pid: int | None) -> dict:
        excluded = {threading.main_thread().native_id}
        excluded |= {t.native_id for t in threading.enumerate() if t.name.startswith("lora-gui")}
        times = os.times()
        process = times.user + times.system
        return {"time": time.time(), "clock": time.perf_counter(), "step": self.runner.snapshot().step,
                "process_cpu": process, "server_cpu": python_thread_cpu(excluded),
                "own_cpu": process + pid_cpu(client_pid), "machine_cpu": machine_busy_cpu()}


def start_app(workspace_root: Path):
    from lora_gui.ui.app import MAX_UPLOAD_BYTES, build_app
    from lora_gui.ui.session import AppSession
    from lora_gui.ui.workspace import Workspace

    workspace = Workspace.create(workspace_root)
    session = AppSession(workspace=workspace)
    app = build_app(session)
    app.queue(default_concurrency_limit=4)
    _, url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                           allowed_paths=workspace.allowed_paths(), max_file_size=MAX_UPLOAD_BYTES)
    return app, session, url


def start_training(session, args: argparse.Namespace) -> None:
    from lora_gui.config import build_config
    from lora_gui.data.sample_dataset import create_sample_dataset

    dataset = create_sample_dataset(session.workspace.datasets / "sample")
    output = session.workspace.outputs / "poll-bench"
    config = build_config(preset="sd15-cpu-demo", overrides=[
        f"dataset.dir={dataset}", f"output.dir={output}", "output.name=poll-bench",
        f"dataset.resolution={args.resolution}", "train.max_steps=1000000", "output.save_every=0",
        "sample.every=0", *args.set])
    session.runner.start(config)
    session.train_started_config = config


def run_clients(url: str, args: argparse.Namespace, duration: float) -> subprocess.Popen:
    command = [sys.executable, __file__, "--_client", url, "--clients", str(args.clients),
               "--interval", str(args.interval), "--_duration", str(duration)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def wait_for_step(runner, step: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while (snap := runner.snapshot()).step < step:
        if snap.state not in ("running", "paused"):
            raise SystemExit(f"the run ended before the benchmark started: {snap.state} {snap.error}")
        if time.monotonic() > deadline:
            raise SystemExit("the run did not reach the warm-up step in time")
        time.sleep(0.5)


class Phase:
    """One measured window: meter readings at both ends, the step intervals inside, client requests."""

    def __init__(self, clients: int, start: dict, end: dict, steps: list[float], requests: list) -> None:
        self.clients, self.start, self.end, self.steps, self.requests = clients, start, end, steps, requests

    def delta(self, key: str) -> float:
        return self.end[key] - self.start[key]

    @property
    def span(self) -> float:
        return self.delta("time")

    @property
    def median(self) -> float:
        return statistics.median(self.steps) if self.steps else float("nan")

    @property
    def other_cores(self) -> float:
        """CPU that other processes on the machine used meanwhile (they slow training too)."""
        return (self.delta("machine_cpu") - self.delta("own_cpu")) / self.span

    def line(self) -> str:
        return (f"{self.clients:3d} clients: {len(self.steps):4d} steps, median {1000 * self.median:7.1f} ms, "
                f"process {self.delta('process_cpu') / self.span:.2f} cores, "
                f"server threads {self.delta('server_cpu') / self.span:.3f} cores, "
                f"other processes {self.other_cores:.2f} cores")


def measure(meter: Meter, clock: StepClock, url: str, args: argparse.Namespace, clients: int) -> Phase:
    process = None
    if clients:
        process = run_clients(url, argparse.Namespace(**{**vars(args), "clients": clients}),
                              args.client_warmup + args.seconds + 1)
        time.sleep(args.client_warmup)  # every client's first poll fetches everything
    pid = None if process is None else process.pid
    start = meter.read(pid)
    time.sleep(args.seconds)
    end = meter.read(pid)
    requests = []
    if process is not None:
        out, _ = process.communicate(timeout=300)
        requests = [row for row in json.loads(out) if start["time"] <= row[0] and row[1] <= end["time"]]
    phase = Phase(clients, start, end, clock.intervals(start["clock"], end["clock"]), requests)
    print(phase.line(), flush=True)
    return phase


def summarise(args: argparse.Namespace, idle: list[Phase], busy: list[Phase]) -> dict:
    """Rounds are an N-client phase and the 0-client phases on both sides of it; a round where other
    processes used more than --max-other-cores in any of its phases is left out (when any is left)."""
    rounds = [(busy[i], idle[i], idle[i + 1]) for i in range(len(busy))]
    quiet = [r for r in rounds if max(p.other_cores for p in r) <= args.max_other_cores]
    used = quiet or rounds
    ratios = [b.median / statistics.median(a.steps + c.steps) for b, a, c in used]
    busy_used = [b for b, _, _ in used]
    idle_used = list({id(p): p for _, a, c in used for p in (a, c)}.values())
    idle_steps = [s for p in idle_used for s in p.steps]
    busy_steps = [s for p in busy_used for s in p.steps]
    requests = [r for p in busy_used for r in p.requests]
    polls = [r for r in requests if r[2] == "poll" and r[3] is None]
    errors = [r for r in requests if r[3] is not None]
    busy_time = sum(p.span for p in busy_used)
    idle_time = sum(p.span for p in idle_used)
    server_idle_rate = sum(p.delta("server_cpu") for p in idle_used) / idle_time
    server = sum(p.delta("server_cpu") for p in busy_used) - server_idle_rate * busy_time
    client = sum(p.delta("own_cpu") - p.delta("process_cpu") for p in busy_used)

    def ms(value):
        return None if value is None else round(1000 * value, 2)

    return {
        "clients": args.clients, "interval_s": args.interval, "resolution": args.resolution,
        "rounds_used": f"{len(used)} of {len(rounds)}" + ("" if quiet else " (all disturbed: none left out)"),
        "steps_0_clients": len(idle_steps), "steps_n_clients": len(busy_steps),
        "median_step_ms_0_clients": ms(statistics.median(idle_steps)),
        "median_step_ms_n_clients": ms(statistics.median(busy_steps)),
        "step_time_ratio": round(statistics.median(busy_steps) / statistics.median(idle_steps), 3),
        "step_time_ratio_per_round": [round(r, 3) for r in ratios],
        "steps_per_s_0_clients": round(sum(p.delta("step") for p in idle_used) / idle_time, 2),
        "steps_per_s_n_clients": round(sum(p.delta("step") for p in busy_used) / busy_time, 2),
        "polls_per_s": round(len(polls) / busy_time, 2),
        "requests_per_s": round((len(requests) - len(errors)) / busy_time, 2), "errors": len(errors),
        "median_poll_latency_ms": ms(statistics.median(r[1] - r[0] for r in polls)) if polls else None,
        "server_cpu_ms_per_poll": ms(server / len(polls)) if polls else None,
        "client_cpu_ms_per_poll": ms(client / len(polls)) if polls else None,
        "other_processes_cores": round(statistics.mean(p.other_cores for r in used for p in r), 2),
    }


def bench_main(args: argparse.Namespace) -> None:
    from lora_gui.quiet import quiet_expected_noise

    quiet_expected_noise()
    with tempfile.TemporaryDirectory(prefix="poll-bench-") as tmp:
        app, session, url = start_app(Path(tmp) / "workspace")
        try:
            clock = StepClock(session.runner)
            start_training(session, args)
            print(f"app at {url}; warming up to step {args.warmup_steps} ...", flush=True)
            wait_for_step(session.runner, args.warmup_steps)
            meter = Meter(session.runner)
            idle, busy = [], []
            for _ in range(args.rounds):
                idle.append(measure(meter, clock, url, args, 0))
                busy.append(measure(meter, clock, url, args, args.clients))
            idle.append(measure(meter, clock, url, args, 0))
            result = summarise(args, idle, busy)
        finally:
            session.runner.stop()
            session.runner.wait(120)
            app.close()
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32s} {value}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20, help="polling clients (default 20)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between a client's polls (default 1)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each measured phase (default 20)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternations of a 0-client and an N-client phase, then a last 0-client one (default 3)")
    parser.add_argument("--resolution", type=int, default=128, help="training resolution (default 128)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps before measuring (default 5)")
    parser.add_argument("--client-warmup", type=float, default=3.0,
                        help="seconds the clients poll before their phase is measured (default 3)")
    parser.add_argument("--max-other-cores", type=float, default=0.25,
                        help="leave out rounds where other processes used more CPU than this (default 0.25)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    parser.add_argument("--_client", dest="url", help=argparse.SUPPRESS)
    parser.add_argument("--_duration", dest="duration", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.url:
        client_main(arguments)
    else:
        bench_main(arguments)
