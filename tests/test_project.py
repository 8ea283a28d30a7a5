"""Project-level checks: packaging metadata, README Quickstart, CI script, `make lab`."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml  # PyYAML: installed with jupyterlab (jupyter_server -> jupyter-events)

ROOT = Path(__file__).resolve().parents[1]

# conda-forge package name -> PyPI name, where they differ.
CONDA_TO_PYPI = {"pytorch": "torch", "playwright-python": "playwright"}
# Entries of environment.yml that are not project dependencies.
CONDA_TOOLING = {"python", "pip"}

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse_lower_bounds(reqs, where: str) -> dict[str, str]:
    """`["name>=1.2", ...]` -> {"name": "1.2"}; anything fancier fails loudly."""
    out: dict[str, str] = {}
    for req in reqs:
        m = _REQ.match(req)
        assert m, f"{where}: {req!r} is not of the form 'name>=version'; extend tests/test_project.py"
        name = _norm(m.group(1))
        assert name not in out, f"{where}: {name} listed twice"
        out[name] = m.group(2)
    return out


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


# ------------------------------------------------------------------ metadata


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    expected = _parse_lower_bounds(
        project["dependencies"] + project["optional-dependencies"]["test"] + project["optional-dependencies"]["hf"], "pyproject.toml"
    )

    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    assert env["name"] == "moelab"
    assert env["channels"] == ["conda-forge"]

    conda_reqs, pip_sections = [], []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip_sections.append(dep["pip"])
            continue
        name = re.split(r"[<>=!\s]", dep, maxsplit=1)[0]
        if name == "python":
            assert dep == "python=3.11", dep
        if name in CONDA_TOOLING:
            continue
        conda_reqs.append(dep)
    assert pip_sections == [["-e ."]], "environment.yml must pip-install the repo: pip: [-e .]"

    conda = _parse_lower_bounds(conda_reqs, "environment.yml")
    got = {_norm(CONDA_TO_PYPI.get(name, name)): ver for name, ver in conda.items()}
    assert got == expected


def test_readme_quickstart_is_make_lab_and_make_test():
    section = _readme_section("Quickstart")
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", section, flags=re.M | re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    assert commands == ["make lab", "make test"]


def test_the_lab_setup_installs_what_the_lab_needs_and_turns_the_news_off():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipes = {m.group(1): m.group(2) for m in re.finditer(r"^(\$\(\w+\)):[^\n]*\n((?:\t[^\n]*\n)+)", makefile,
                                                           flags=re.M)}
    lab, test = recipes["$(STAMP)"], recipes["$(TEST_STAMP)"]
    assert "install -e '.[hf]'" in lab and "test" not in lab  # pytest, nbval, playwright are the tests' business
    assert "install -e '.[test,hf]'" in test
    assert re.search(r"^test: setup-test$", makefile, flags=re.M) and re.search(r"^lab: setup$", makefile, flags=re.M)
    # the settings the lab's setup writes: JupyterLab's own schema names these values "Never" and off
    written = re.search(r"@echo '(.*?)'", lab).group(1)
    assert json.loads(written) == {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false",
                                                                                    "checkForUpdates": False}}
    schema = Path(sys.prefix) / "share/jupyter/lab/schemas/@jupyterlab/apputils-extension/notification.json"
    if schema.exists():  # the installed JupyterLab knows both settings and takes these values
        properties = json.loads(schema.read_text())["properties"]
        assert {"const": "false", "title": "Never"} in properties["fetchNews"]["oneOf"]
        assert properties["checkForUpdates"]["type"] == "boolean"


def test_ci_runs_make_test():
    ci = ROOT / ".ci" / "run"
    text = ci.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    code = [line.split("#", 1)[0] for line in text.splitlines()]
    assert any(re.search(r"(^|\s)make test(\s|$)", line) for line in code), ".ci/run must call `make test`"


def test_sanitize_cfg_patterns():
    nbval_plugin = pytest.importorskip("nbval.plugin")
    patterns = nbval_plugin.get_sanitize_patterns((ROOT / "tests" / "sanitize.cfg").read_text(encoding="utf-8"))
    assert len(patterns) == 2
    s = "<SparseMoE at 0x7f3a2b1c> eager 12.3 ms, grouped_mm 850 µs, total 1.5s; 8 experts, 2 samples"
    for regex, replace in patterns:
        s = re.sub(regex, replace, s)
    assert s == "<SparseMoE at 0xADDRESS> eager DURATION, grouped_mm DURATION, total DURATION; 8 experts, 2 samples"


# ------------------------------------------------------------------ make lab


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def _group_members(pgid: int) -> list[str]:
    """Live (non-zombie) processes of process group `pgid`, as 'pid cmdline' strings."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():  # not Linux: fall back to asking the kernel about the group
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [f"process group {pgid}"]
    members = []
    for d in proc_dir.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        # fields after the ')' that closes comm: state ppid pgrp ...
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(f"{d.name} {cmd}")
    return members


def _group_alive(pgid: int) -> bool:
    return bool(_group_members(pgid))


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the whole process group (make + jupyter), then SIGKILL what is left."""
    pgid = proc.pid  # start_new_session=True: the group id is the leader's pid
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if not _group_alive(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(pgid):
            if proc.poll() is None:
                try:
                    proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.2)
    if proc.poll() is None:
        proc.wait(timeout=10)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_lab_serves_jupyterlab_on_notebooks(tmp_path):
    """The README's main command, `make lab`, starts a JupyterLab that answers and serves notebooks/."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS", "JUPYTER"))}
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR",
                "JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR"):
        d = tmp_path / var.lower()
        d.mkdir()
        env[var] = str(d)

    # Setup first (a no-op when it is up to date), so the lab timeout below is for the server only.
    subprocess.run(["make", "setup"], cwd=ROOT, env=env, check=True, timeout=900,
                   stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    port, token = _free_port(), secrets.token_hex(16)
    lab_args = (f"--no-browser --ServerApp.open_browser=False --ip 127.0.0.1 --port {port} "
                f"--ServerApp.port_retries=0 --allow-root --IdentityProvider.token={token}")
    log_path = tmp_path / "lab.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["make", "lab", f"LAB_ARGS={lab_args}"], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        status = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                status, _ = _get(f"{base}/api/status?token={token}", timeout=2)
            except OSError:
                status = None
            if status == 200:
                break
            time.sleep(0.5)
        log_tail = log_path.read_text(errors="replace")[-4000:]
        assert status == 200, f"JupyterLab did not answer on {base} (exit code {proc.poll()}):\n{log_tail}"

        status, body = _get(f"{base}/lab?token={token}", timeout=10)
        assert status == 200 and b"JupyterLab" in body, f"/lab answered {status}"

        # The server's root is notebooks/: its listing is what that folder holds.
        status, body = _get(f"{base}/api/contents?token={token}", timeout=10)
        assert status == 200
        served = {item["name"] for item in json.loads(body)["content"]}
        on_disk = {p.name for p in (ROOT / "notebooks").iterdir() if not p.name.startswith(".")}
        assert served == on_disk

        status, _ = _get(f"{base}/api/status", timeout=5)
        assert status == 403, "the server must require the token"
    finally:
        _stop_group(proc)

    assert proc.returncode is not None
    survivors = _group_members(proc.pid)
    assert not survivors, f"processes of `make lab` survived: {survivors}"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
