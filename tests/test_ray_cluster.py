"""training/ray_cluster.py: a local Ray stays on 127.0.0.1; and the README's cluster commands, as
typed, against a head started with `ray start --head --node-ip-address 127.0.0.1`.

The Ray these tests start keeps to the test: HOME (and so the token, ~/.ray/auth_token) and Ray's
temp dir are the test's own, its ports are free ones on 127.0.0.1, and a marker in its
environment, which every Ray process inherits, lets the teardown end exactly those processes by
pid (`ray stop` would end every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.training_data import TEST_MODEL
from training.checkpoint import find_latest, read_meta
from training.ray_cluster import CLUSTER_MODE, RayAddressError, check_loopback, init_ray

RAY = Path(sys.executable).parent / "ray"  # the environment's CLI: its `python` runs the job
requires_ray_cli = pytest.mark.skipif(not RAY.is_file(), reason=f"no ray CLI beside {sys.executable}")
MARKER = "CRUCIBLE_TEST_RAY"


# --- the local Ray ---------------------------------------------------------------------------------


def fake_ray(monkeypatch, node_address: str = "127.0.0.1") -> list:
    """A stand-in for `ray` in sys.modules (the real one would stay imported in the test
    process, without cluster mode off); returns the calls made to it."""
    calls = []
    ray = types.SimpleNamespace(
        init=lambda address, **kwargs: calls.append(("init", address, kwargs)),
        shutdown=lambda: calls.append(("shutdown",)),
        util=types.SimpleNamespace(get_node_ip_address=lambda: node_address),
    )
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_init_ray_refuses_a_local_ray_when_ray_was_imported_first(monkeypatch):
    calls = fake_ray(monkeypatch)
    monkeypatch.delenv(CLUSTER_MODE, raising=False)
    with pytest.raises(RayAddressError, match=f"ray was imported before {CLUSTER_MODE}=0 was set"):
        init_ray()
    assert calls == []  # refused before starting anything


def test_init_ray_starts_a_ray_of_its_own_or_joins_ray_address(monkeypatch):
    calls = fake_ray(monkeypatch)
    monkeypatch.setenv(CLUSTER_MODE, "0")
    init_ray()
    # "local", not None: ray.init() would join a Ray that `ray start` left on this machine
    quiet = {"log_to_driver": False, "configure_logging": False}
    assert calls == [("init", "local", {"include_dashboard": False, **quiet})]
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # as under `ray job submit`
    init_ray()
    assert calls[1] == ("init", "10.0.0.1:6379", quiet)


def test_a_local_ray_off_loopback_is_shut_down(monkeypatch):
    calls = fake_ray(monkeypatch, node_address="192.0.2.2")
    monkeypatch.setenv(CLUSTER_MODE, "0")
    with pytest.raises(RayAddressError, match="came up on 192.0.2.2, not 127.0.0.1"):
        init_ray()
    assert calls[-1] == ("shutdown",)
    check_loopback("127.0.0.1")  # on loopback: nothing to do
    assert len(calls) == 2


@pytest.mark.slow
def test_local_ray_node_is_on_loopback_and_an_earlier_import_fails_in_one_line(tmp_path):
    pytest.importorskip("ray")
    pytest.importorskip("psutil")  # to end this Ray's processes
    env = _ray_env(tmp_path, marker=uuid.uuid4().hex)
    env.pop(CLUSTER_MODE, None)
    up = "from training.ray_cluster import init_ray; init_ray(); import ray; print(ray.util.get_node_ip_address())"
    first = "import ray; from training.ray_cluster import init_ray; init_ray()"
    try:
        done = _python(up, env)
        assert done.returncode == 0 and done.stdout.split()[-1] == "127.0.0.1", done.stderr[-3000:]
        done = _python(first, env)
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 1 and last.startswith("training.ray_cluster.RayAddressError: ray was imported before")
    finally:
        _end_ray(env[MARKER])


# --- the README's cluster commands -----------------------------------------------------------------


@pytest.mark.slow
@requires_ray_cli
def test_readme_cluster_commands_run_a_pretraining_job(training_data, tmp_path):
    pytest.importorskip("psutil")  # to end this Ray's processes
    env = _ray_env(tmp_path, marker=uuid.uuid4().hex)
    env["RAY_AUTH_MODE"] = "token"  # as the README exports it on every node and where jobs are submitted
    env[CLUSTER_MODE] = "0"  # one machine: keep the head's node address 127.0.0.1 (README)
    # Ray's temp dir, where `ray start` leaves the address that Ray's own processes look up; short,
    # as its socket paths must stay under 108 bytes
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    env["RAY_TMPDIR"] = str(temp_dir)
    port, dashboard, client, agent = _free_ports(4)
    api, run_dir = f"http://127.0.0.1:{dashboard}", tmp_path / "pt"
    # the README's command as a shell runs it, with the tiny model and two steps
    card = (
        f"ray job submit --address {api} --working-dir . -- python launch/pretrain.py "
        f"--config configs/models/tiny.yaml run_dir={run_dir} data.train={training_data['pretrain']} "
        f"ray.num_workers=2 train.max_steps=2 data.seq_len=128 train.micro_batch=4 train.precision=fp32 "
        "collective_timeout_s=300 " + shlex.quote("model.overrides=" + json.dumps(TEST_MODEL))
    )
    try:
        _ray(env, "get-auth-token", "--generate")
        assert (Path(env["HOME"]) / ".ray" / "auth_token").is_file()
        _ray(
            env,
            *("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port)),
            *("--dashboard-port", str(dashboard), "--ray-client-server-port", str(client)),
            *("--dashboard-agent-listen-port", str(agent), "--disable-usage-stats"),
        )
        without_token = _ray(env | {"RAY_AUTH_MODE": "disabled"}, "job", "list", "--address", api, check=False)
        assert without_token.returncode != 0 and "Missing authentication token" in without_token.stderr
        job = subprocess.run(card, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        _end_ray(env[MARKER])
        shutil.rmtree(temp_dir, ignore_errors=True)
    log = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in log, log[-4000:]
    assert "pretrain: stopped at step 2" in log
    assert read_meta(find_latest(run_dir))["state"]["step"] == 2
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def _ray_env(tmp_path: Path, marker: str) -> dict[str, str]:
    """This environment's python and ray first on PATH, HOME in tmp_path, no Ray address or token
    from outside, and the marker every process of this Ray inherits."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    (tmp_path / "home").mkdir(exist_ok=True)
    env.update(HOME=str(tmp_path / "home"), PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}", **{MARKER: marker})
    return env


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _ray(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(RAY), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert not check or done.returncode == 0, f"ray {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _end_ray(marker: str) -> None:
    """End the processes whose environment holds this marker, by pid: SIGTERM, then SIGKILL."""
    import psutil

    def marked() -> list:
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get(MARKER) == marker and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (psutil.Error, OSError):
                pass
        return found

    for signal_them in ("terminate", "kill"):
        for p in marked():
            try:
                getattr(p, signal_them)()
            except psutil.Error:
                pass
        deadline = time.time() + 10
        while marked() and time.time() < deadline:
            time.sleep(0.2)
    assert not marked(), "Ray processes of this test outlived SIGKILL"
