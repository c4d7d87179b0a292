"""``simulator serve`` as a process (issue 10, item 7): a port it cannot have is one line and exit 2,
never a traceback; SIGTERM stops it as Ctrl-C does, removing its temporary CA; so does stopping the
simulator's own process (simulator/process.py) with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shared.cli import main
from simulator import Estate
from simulator.process import SimulatorProcess

ROOT = Path(__file__).resolve().parent.parent


def test_a_busy_port_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "shared", "simulator", "serve", "--arm-port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # no traceback
    assert lines[0].startswith(
        f"avma-remediator: simulator serve: cannot listen on 127.0.0.1 (ARM port {port}, identity port 0): "
    )
    assert "address already in use" in lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arm-port", "70000"], "--arm-port 70000: a TCP port is 0-65535"),
        (["--identity-port", "-1"], "--identity-port -1: a TCP port is 0-65535"),
        (["--latency", "-1"], "--latency must not be negative"),
    ],
)
def test_a_port_that_cannot_exist_is_refused_before_anything_starts(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulator", "serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avma-remediator: simulator serve: ") and message in err


def test_sigterm_stops_it_as_ctrl_c_does_and_removes_the_temporary_ca() -> None:
    serve = subprocess.Popen(
        [sys.executable, "-m", "shared", "simulator", "serve", "--latency", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert serve.stdout is not None
        bundle = ""
        for line in serve.stdout:
            if line.startswith("export AZURE_CA_BUNDLE="):
                bundle = line.strip().split("=", 1)[1]
            if line.startswith("# Ctrl-C"):
                break
        assert bundle and Path(bundle).is_file()
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=60)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert serve.returncode == 0, err
    assert "Traceback" not in err
    assert not Path(bundle).parent.exists()  # the whole avma-sim-* directory


def test_terminating_the_simulator_process_removes_its_ca() -> None:
    sim = SimulatorProcess(Estate.from_dict({"vms": []}), latency_s=0.0).start()
    bundle = Path(sim.env()["AZURE_CA_BUNDLE"])
    assert bundle.is_file()
    process = sim._process
    assert process is not None and process.pid is not None
    os.kill(process.pid, signal.SIGTERM)
    process.join(30)
    sim.stop()
    assert not bundle.parent.exists()
