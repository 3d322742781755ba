"""The forking server that starts the tests' commands (tests/forked.py) gives a command what a fresh interpreter
gives it: arguments, module, folder, import path, environment, session, standard streams, exit status, signals."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, popen

pytestmark = pytest.mark.e2e
PROBE = [sys.executable, "-m", "tests.forked_probe"]


def started(args: list[str], fresh: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTEST_PROBE": "a value"}  # one the server lets differ
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if fresh:
        return subprocess.Popen(PROBE + args, cwd=ROOT, env=env, start_new_session=True, **pipes)
    proc = popen(PROBE + args, env, start_new_session=True, **pipes)
    assert type(proc).__name__ == "Forked"  # this test is about the server: it must not fall back to a fresh start
    return proc


def test_a_forked_command_sees_and_returns_what_a_fresh_one_does():
    results = []
    for fresh in (True, False):
        proc = started(["7", "two words"], fresh)
        out, err = proc.communicate("input line\n", timeout=120)
        results.append((proc.returncode, json.loads(out), err))
    assert results[0] == results[1]
    status, seen, err = results[0]
    assert status == 7 and err == "to stderr\n"
    assert seen == {
        "argv": ["7", "two words"],
        "argv0": "tests/forked_probe.py",
        "name": "tests.forked_probe",
        "cwd": str(ROOT),
        "path0": str(ROOT),
        "probe": "a value",
        "session_leader": True,
        "stdin": "input line\n",
    }


def test_a_signal_ends_a_forked_command_as_it_ends_a_fresh_one():
    for fresh in (True, False):
        proc = started(["sleep"], fresh)
        proc.stdin.close()
        assert json.loads(proc.stdout.readline())["argv"] == ["sleep"]
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.1)
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group, as `run` kills a command that hangs
        assert proc.wait(timeout=60) == -signal.SIGTERM
        proc.stdout.close()
        proc.stderr.close()
