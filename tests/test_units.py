"""The deployment units (monitoring/systemd, monitoring/kubernetes) against the CLI they start: every
`deberta-rad` command line in them names a subcommand and options the Typer app has, so a renamed
option fails here, not at 3 a.m. Also: the manifests parse and keep the properties the monitor relies on
(one replica, Recreate, a read-only capture), and `systemd-analyze verify` accepts the units where it is
installed."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import typer
import yaml
from conftest import REPO

from deberta_rad.cli import app

SYSTEMD = REPO / "monitoring" / "systemd"
KUBERNETES = REPO / "monitoring" / "kubernetes"
UNITS = sorted(SYSTEMD.glob("*.service"))
MANIFESTS = sorted(KUBERNETES.glob("*.yaml"))


def unit_settings(path: Path) -> dict[str, list[str]]:
    """key -> values of a systemd unit (keys such as Environment= repeat)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def deberta_rad_calls(argv: list[str]) -> Iterator[list[str]]:
    """The `deberta-rad` invocations of a command line (also inside `sh -c "...; ..."`), without the
    program name."""
    if len(argv) >= 3 and Path(argv[0]).name in ("sh", "bash") and argv[1] == "-c":
        for part in re.split(r";|&&|\|\|", argv[2]):
            yield from deberta_rad_calls(shlex.split(part))
    elif argv and Path(argv[0]).name == "deberta-rad":
        yield argv[1:]


def containers(node: object) -> Iterator[dict]:
    """Every container of a manifest, at any depth (Deployment, CronJob)."""
    if isinstance(node, dict):
        yield from node.get("containers", [])
        for value in node.values():
            yield from containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers(item)


def calls_in(path: Path) -> list[list[str]]:
    if path.suffix == ".service":
        lines = [shlex.split(v.lstrip("-@+!")) for v in unit_settings(path).get("ExecStart", [])]
    else:
        lines = [
            c.get("command", []) + c.get("args", []) for c in containers(list(yaml.safe_load_all(path.read_text())))
        ]
    return [call for argv in lines for call in deberta_rad_calls(argv)]


@pytest.mark.parametrize("path", UNITS + MANIFESTS, ids=lambda p: p.name)
def test_every_command_line_matches_the_cli(path: Path) -> None:
    commands = typer.main.get_command(app).commands
    calls = calls_in(path)
    assert calls, f"{path.name} starts no deberta-rad command"
    for subcommand, *arguments in calls:
        assert subcommand in commands, f"{path.name}: `deberta-rad {subcommand}` does not exist"
        params: list[click.Parameter] = commands[subcommand].params
        options = {opt for p in params for opt in p.opts + p.secondary_opts if opt.startswith("-")}
        used = {a.split("=", 1)[0] for a in arguments if a.startswith("-")}
        assert used <= options, f"{path.name}: deberta-rad {subcommand} has no {sorted(used - options)}"


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_units_run_as_the_service_user_hardened(path: Path) -> None:
    settings = unit_settings(path)
    for key, value in {
        "User": "deberta-rad",
        "WorkingDirectory": "/srv/deberta-rad",
        "EnvironmentFile": "/etc/deberta-rad/env",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
    }.items():
        assert settings.get(key) == [value], f"{path.name}: {key}={settings.get(key)}"
    assert "/var/lib/deberta-rad" in settings["ReadWritePaths"][0].split()


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None or not Path("/lib/systemd/system/multi-user.target").is_file():
        pytest.skip("systemd-analyze (or systemd's own units) not installed")
    # A root with systemd's units and a stand-in for the venv's deberta-rad, which verify requires.
    shutil.copytree("/lib/systemd/system", tmp_path / "usr/lib/systemd/system", symlinks=True)
    program = tmp_path / "srv/deberta-rad/.venv/bin/deberta-rad"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(unit, tmp_path / "etc/systemd/system")
        copied = tmp_path / "etc/systemd/system" / unit.name
        result = subprocess.run([analyze, "verify", f"--root={tmp_path}", str(copied)], capture_output=True, text=True)
        assert result.returncode == 0 and not result.stderr.strip(), f"{unit.name}: {result.stderr}"


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERNETES / name).read_text()) if d]


def manifest(name: str) -> dict[str, dict]:
    """kind -> resource (the first of each kind) of a manifest file."""
    return {d["kind"]: d for d in reversed(documents(name))}


def test_the_long_running_monitor_keeps_one_pod_and_reads_the_capture_only() -> None:
    resources = manifest("monitor-deployment.yaml")
    deployment = resources["Deployment"]["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"
    pod = deployment["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9108"
    container = pod["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": 9108} in container["ports"]
    capture = next(v for v in pod["spec"]["volumes"] if v["name"] == "capture")
    assert capture["persistentVolumeClaim"]["readOnly"]
    assert next(m for m in container["volumeMounts"] if m["name"] == "capture")["readOnly"]
    claims = [d for d in documents("monitor-deployment.yaml") if d["kind"] == "PersistentVolumeClaim"]
    modes = {c["metadata"]["name"]: c["spec"]["accessModes"] for c in claims}
    assert modes == {"deberta-rad-capture": ["ReadWriteMany"], "deberta-rad-monitor-state": ["ReadWriteOnce"]}
    assert resources["Service"]["spec"]["ports"][0]["port"] == 9108


def test_the_one_shot_monitor_runs_hourly_never_twice_at_once() -> None:
    cronjob = manifest("monitor-cronjob.yaml")["CronJob"]["spec"]
    assert cronjob["schedule"] == "0 * * * *" and cronjob["concurrencyPolicy"] == "Forbid"
    [call] = calls_in(KUBERNETES / "monitor-cronjob.yaml")
    assert call[0] == "monitor" and "--follow" not in call


def test_the_relabel_receiver_listens_on_9109() -> None:
    resources = manifest("relabel-on-alert.yaml")
    assert resources["Deployment"]["spec"]["replicas"] == 1
    assert resources["Service"]["spec"]["ports"][0]["port"] == 9109
    [call] = calls_in(KUBERNETES / "relabel-on-alert.yaml")
    assert call[call.index("--port") + 1] == "9109"
