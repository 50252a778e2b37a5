"""Shared fixtures: one local Ray session for the whole run, real data, a real trained model.

Data: the example data shipped in bertray/example_data (subsets of real sets), or the folder that
$BERTRAY_DATA_ROOT names (the full sets). A test that needs the full sets asks for ``full_data_root``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DATA = ROOT / "bertray" / "example_data"
DATA = Path(os.environ.get("BERTRAY_DATA_ROOT") or EXAMPLE_DATA).resolve()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


RAY_FIXTURES = {"ray_session", "trained"}


def pytest_configure(config):
    """Ctrl-C reaches the jobs tests start and stop with SIGINT: a shell starts background
    commands (``pytest ... &`` in a script, some CI runners) with SIGINT ignored, children inherit
    that, and Python then never raises KeyboardInterrupt. A handled signal is reset to its default
    in every child started after this."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    """Tiers: ``slow`` (marked by hand: clusters, long jobs), ``integration`` (a local Ray
    session), ``unit`` (everything else: no Ray). ``-m unit`` runs in well under a minute."""
    for item in items:
        if item.get_closest_marker("slow"):
            continue
        ray_used = RAY_FIXTURES & set(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.integration if ray_used else pytest.mark.unit)


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "trec" / "train.parquet").exists():
        pytest.fail(f"data not found under {DATA}: unset BERTRAY_DATA_ROOT to use the example data shipped in "
                    f"{EXAMPLE_DATA}, or point it at a folder laid out the same way")
    return DATA


@pytest.fixture(scope="session")
def full_data_root(data_root) -> Path:
    """The full sets: skips (naming the variable) when only the shipped subsets are at hand."""
    if data_root == EXAMPLE_DATA.resolve():
        pytest.skip("needs the full data sets: set BERTRAY_DATA_ROOT to a folder holding them (sst2/, trec/, ...)")
    return data_root


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for every test that needs Ray (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh local instance, even while a `ray start` cluster runs.
        # The dashboard stays on: Ray Train's PlacementGroupCleaner asks the state API (served by
        # the dashboard) whether a controller died; without it, a Tune trial that ASHA stops
        # leaks its worker group's CPUs and the next trial's data pipeline never schedules.
        ray.init(address="local", num_cpus=2, log_to_driver=True,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def smoke_config(tmp: Path, *overrides: str):
    """configs/smoke.yaml with ``output_dir`` under ``tmp`` and extra overrides."""
    from bertray.config import RunConfig
    from bertray.config_loader import load_config

    return load_config(ROOT / "configs" / "smoke.yaml", [f"output_dir={tmp}", *overrides], RunConfig)


@pytest.fixture(scope="session")
def trained(ray_session, data_root, tmp_path_factory):
    """A real model trained by bertray on TREC (2 workers, DDP), shared by train and predict tests."""
    from bertray.train import run

    out = tmp_path_factory.mktemp("trained")
    # batch 8 per worker keeps the optimizer steps of the 1-worker smoke run (batch 16)
    cfg = smoke_config(out, "scaling.num_workers=2", "train.amp=fp32", "train.batch_size=8")
    return cfg, run(cfg)


def ray_cli_env() -> dict:
    """Environment for `ray start` / `ray job submit` with token auth on, as on a real cluster."""
    import subprocess

    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token.exists() and "RAY_AUTH_TOKEN" not in env:
        subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    return env


class RayCluster:
    """A real Ray cluster started with `ray start` (head + optional extra nodes), stopped on exit.

    Each node runs `ray start --block` in its own process group, so stopping it never touches the
    test session's own Ray instance (which `ray stop` would).
    """

    def __init__(self, port: int, dashboard_port: int, cpus: int = 2, extra_nodes: int = 0):
        self.port, self.dash, self.cpus, self.extra = port, dashboard_port, cpus, extra_nodes
        self.env = ray_cli_env()
        self.procs = []
        self.address = f"http://127.0.0.1:{dashboard_port}"

    def _start(self, args):
        import subprocess

        # Every node's dashboard agent listens on 52365 by default; a second Ray instance on
        # this machine (the test session's own) would hold it and job submission would fail.
        agent_port = self.port + 1000 + len(self.procs)
        self.procs.append(subprocess.Popen(["ray", "start", "--block", "--disable-usage-stats", f"--num-cpus={self.cpus}",
                                            f"--dashboard-agent-listen-port={agent_port}", *args],
                                           env=self.env, start_new_session=True,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def __enter__(self):
        import subprocess
        import time

        self._start(["--head", f"--port={self.port}", f"--dashboard-port={self.dash}", "--dashboard-host=127.0.0.1"])
        deadline = time.time() + 120
        while subprocess.run(["ray", "job", "list", f"--address={self.address}"], env=self.env,
                             capture_output=True).returncode != 0:
            if time.time() > deadline:
                raise RuntimeError("the Ray head did not come up within 120 s")
            time.sleep(2)
        for _ in range(self.extra):
            self._start([f"--address=127.0.0.1:{self.port}"])
        if self.extra:
            import json

            while True:
                status = subprocess.run(["ray", "list", "nodes", f"--address={self.address}", "--format=json"],
                                        env=self.env, capture_output=True, text=True)
                try:  # the state API may answer with a warning before it is ready
                    alive = [n for n in json.loads(status.stdout) if n.get("state") == "ALIVE"]
                except ValueError:
                    alive = []
                if len(alive) >= 1 + self.extra:
                    break
                if time.time() > deadline:
                    raise RuntimeError(f"only {len(alive)} Ray node(s) came up")
                time.sleep(2)
        return self

    def submit(self, *args: str, timeout: int = 900):
        import subprocess
        import time

        cmd = ["ray", "job", "submit", f"--address={self.address}", "--working-dir", str(ROOT), "--", "python", *args]
        for _ in range(30):
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
            # the job agent starts a little after the dashboard answers
            if "No available agent to submit job" not in proc.stderr:
                return proc
            time.sleep(3)
        return proc

    def __exit__(self, *exc):
        import signal
        import subprocess

        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # `ray start --head` records its address in /tmp/ray/ray_current_cluster and only `ray stop`
        # removes it. Left behind, it points every later address-less lookup at this dead head,
        # among them Ray Train's PlacementGroupCleaner, which then never frees a stopped Tune
        # trial's CPUs.
        from ray._common.utils import get_ray_address_file

        address_file = Path(get_ray_address_file(None))
        if address_file.is_file() and address_file.read_text().strip().endswith(f":{self.port}"):
            address_file.unlink(missing_ok=True)


def kill_a_worker_after_the_first_checkpoint(run_dir: Path):
    """Start a thread that SIGKILLs the Ray Train worker processes once ``run_dir`` has a
    registered checkpoint; returns (``{"pid": ...}`` once killed, the thread)."""
    import signal
    import threading
    import time

    import psutil

    killed: dict = {}

    def kill():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            # a checkpoint counts once Ray Train has registered it (after the upload)
            snapshot = run_dir / "checkpoint_manager_snapshot.json"
            if snapshot.exists() and '"checkpoint_dir_name"' in snapshot.read_text():
                for p in psutil.process_iter(["cmdline"]):  # Ray titles worker processes ray::<Actor>
                    if (p.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker"):
                        os.kill(p.pid, signal.SIGKILL)
                        killed["pid"] = p.pid
                if killed:
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return killed, thread
