"""The Dockerfile, compose file and deploy examples, checked without a Docker engine.

No engine runs where these tests run, so the files are parsed here (a small Dockerfile parser below: stages,
instructions, flags, exec form) and whatever can run outside a container does: the builder stage's COPY
set builds the wheel, the agent's HEALTHCHECK runs against a real state folder, Mosquitto starts from
`deploy/mosquitto.conf` (the production device plane: TLS only, no anonymous clients, the dynamic security
plugin; certificates and the plugin's bootstrap file are made in a temp folder as the compose comments
say) and the compose healthcheck logs in to it, the example agent config validates, and the fleet command's
flags are checked against `edgepack fleet serve --help`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field

from pathlib import Path

import pytest
import yaml

from tests.support import REPO, run_cli

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
TARGETS = ("fleet", "agent")
EXTRAS = {"builder", "openvino", "tflite", "fleet", "agent", "toolchain", "dev", "all"}
FLEET_SERVE_FLAGS = ("--host", "--port", "--data-dir", "--mqtt-url", "--db-url", "--trusted-key", "--public-url",
                     "--mqtt-ca", "--mqtt-dynsec")
# Mounted by compose.yaml but made by the operator (its setup comments say how): secrets, never in the repo.
GENERATED = {"./certs": "edgepack certs lab-ca deploy/certs", "./certs/ca.pem": "edgepack certs lab-ca deploy/certs",
             "./broker/dynamic-security.json": "edgepack fleet broker-config --out deploy/broker"}
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "cmake", "python3-dev", "libpq-dev")


# ------------------------------------------------------------------------------------------------ parser

@dataclass
class Instruction:
    cmd: str            # upper case: FROM, RUN, COPY, …
    args: str           # the rest of the line, flags removed, continuations joined
    flags: dict[str, str]
    line: int

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, else None."""
        text = self.args
        if self.cmd == "HEALTHCHECK":
            text = re.sub(r"^CMD\s+", "", text)
        return json.loads(text) if text.startswith("[") else None


@dataclass
class Stage:
    name: str
    base: str           # image reference with build args substituted, or an earlier stage's name
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations; drop comments and blank lines (also inside a continuation)."""
    lines, current, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if not current:
            start = number
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        current += stripped
        lines.append((start, current.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    return lines


def _split_flags(args: str) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    while (match := re.match(r"--([a-z-]+)(?:=(\S*))?\s+", args)):
        flags[match.group(1)] = match.group(2) or ""
        args = args[match.end():]
    return flags, args


def _substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def parse_dockerfile(text: str) -> dict[str, Stage]:
    """Stages by name (an unnamed stage gets its index), in order."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line, logical in _logical_lines(text):
        cmd, _, rest = logical.partition(" ")
        cmd = cmd.upper()
        flags, args = _split_flags(rest.strip() + " ")
        instruction = Instruction(cmd, args.strip(), flags, line)
        if cmd == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stage = Stage(name=name, base=_substitute(words[0], global_args))
            stages[name] = stage
        elif stage is None:
            assert cmd == "ARG", f"line {line}: only ARG may come before the first FROM, not {cmd}"
            key, _, default = instruction.args.partition("=")
            global_args[key] = default
        else:
            stage.instructions.append(instruction)
    return stages


def lineage(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, target first (what ends up in its image)."""
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def dependencies(stages: dict[str, Stage], name: str) -> list[Stage]:
    """Every stage the target's build touches: its lineage plus stages it COPYs or mounts --from."""
    seen: dict[str, Stage] = {}
    todo = [name]
    while todo:
        current = stages[todo.pop()]
        if current.name in seen:
            continue
        seen[current.name] = current
        if current.base in stages:
            todo.append(current.base)
        for instruction in current.instructions:
            source = instruction.flags.get("from")
            mount = instruction.flags.get("mount", "")
            if source is None and (m := re.search(r"(?:^|,)from=([^,]+)", mount)):
                source = m.group(1)
            if source in stages:
                todo.append(source)
    return list(seen.values())


def last(chain: list[Stage], cmd: str) -> Instruction | None:
    """The instruction in effect for the image: the last one along the lineage (base first)."""
    found = None
    for stage in reversed(chain):
        found = (stage.all(cmd) or [found])[-1]
    return found


def env_of(chain: list[Stage]) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in reversed(chain):
        for instruction in stage.all("ENV"):
            for word in shlex.split(instruction.args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def extras_installed(stage_list: list[Stage]) -> set[str]:
    """Extras named in `pip install …[a,b]` anywhere in these stages' RUN lines."""
    found: set[str] = set()
    for stage in stage_list:
        for run in stage.all("RUN"):
            if re.search(r"\bpip\b.*\binstall\b", run.args):
                for group in re.findall(r"\[([A-Za-z0-9_,\- ]+)\]", run.args):
                    found |= {extra.strip() for extra in group.split(",")}
    return found


STAGES = parse_dockerfile(DOCKERFILE.read_text())


# ------------------------------------------------------------------------------------------------ Dockerfile

def test_the_parser_reads_a_small_dockerfile():
    stages = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nARG IMG=python:3.11-slim\nFROM ${IMG} AS one\n"
        "RUN a \\\n  # a comment inside a continuation\n  && b\nFROM one AS two\n"
        "COPY --from=one --chown=1:1 /x /y\nUSER 1\nCMD [\"edgepack\", \"x\"]\n")
    assert list(stages) == ["one", "two"]
    assert stages["one"].base == "python:3.11-slim"
    assert stages["one"].all("RUN")[0].args == "a && b"
    assert stages["two"].all("COPY")[0].flags == {"from": "one", "chown": "1:1"}
    assert stages["two"].all("CMD")[0].exec_form == ["edgepack", "x"]
    assert [s.name for s in lineage(stages, "two")] == ["two", "one"]


def test_the_dockerfile_has_a_fleet_and_an_agent_target_on_slim_images():
    assert {"fleet", "agent"} <= set(STAGES)
    for stage in STAGES.values():
        if stage.base in STAGES:
            continue
        image, _, tag = stage.base.partition(":")
        assert image == "python" and tag.startswith("3.11") and tag.endswith("-slim"), \
            f"stage {stage.name} is based on {stage.base}, not a python:3.11-slim image"


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_runs_as_the_unprivileged_edgepack_user(target):
    chain = lineage(STAGES, target)
    user = last(chain, "USER")
    assert user is not None, f"{target}: no USER, the image would run as root"
    assert user.args.split(":")[0] not in ("root", "0"), f"{target}: USER {user.args}"
    created = " ".join(run.args for stage in chain for run in stage.all("RUN"))
    assert re.search(rf"useradd\b.*--uid 10001\b.*\b{re.escape(user.args)}\b", created), \
        f"{target}: the user {user.args} is not created with uid 10001 in the image's lineage"


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_has_a_healthcheck_entrypoint_and_cmd(target):
    chain = lineage(STAGES, target)
    check = last(chain, "HEALTHCHECK")
    assert check is not None and check.args.upper() != "NONE", f"{target}: no HEALTHCHECK"
    argv = check.exec_form
    assert argv and argv[0] == "/opt/venv/bin/python" and argv[1] == "-c", f"{target}: {check.args}"
    compile(argv[2], f"<{target} healthcheck>", "exec")
    assert {"interval", "timeout", "start-period", "retries"} <= set(check.flags)
    if target == "fleet":
        assert "http://127.0.0.1:8080/healthz" in argv[2]
    else:
        assert "agent.heartbeat" in argv[2] and "os.W_OK" in argv[2]

    entrypoint, cmd = last(chain, "ENTRYPOINT"), last(chain, "CMD")
    assert entrypoint is not None and entrypoint.exec_form == ["edgepack"]
    assert cmd is not None and cmd.exec_form[:2] == {"fleet": ["fleet", "serve"], "agent": ["agent", "run"]}[target]
    for cmd_name in ("WORKDIR", "EXPOSE", "VOLUME", "LABEL"):
        assert last(chain, cmd_name) is not None, f"{target}: no {cmd_name}"
    labels = " ".join(label.args for stage in chain for label in stage.all("LABEL"))
    assert f'org.opencontainers.image.title="edgepack-{target}"' in labels


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_installs_only_its_own_extra(target):
    assert extras_installed(dependencies(STAGES, target)) == {target}
    text = " ".join(run.args for stage in dependencies(STAGES, target) for run in stage.all("RUN"))
    for extra in EXTRAS - {target}:
        assert not re.search(rf"\[[^\]]*\b{extra}\b[^\]]*\]", text), f"{target} installs the {extra} extra"
    if target == "agent":
        for heavy in ("fastapi", "sqlalchemy", "uvicorn", "tensorflow", "onnx2tf", "openvino", "onnx "):
            assert heavy not in text, f"the agent image installs {heavy.strip()}"


@pytest.mark.parametrize("target", TARGETS)
def test_no_build_tools_or_wheels_are_left_in_the_final_images(target):
    chain = lineage(STAGES, target)
    assert "builder" not in {stage.name for stage in chain}, f"{target} is built FROM the builder stage"
    for stage in chain:
        for run in stage.all("RUN"):
            assert "pip wheel" not in run.args and "apt-get install" not in run.args, f"{target}: RUN {run.args}"
            for tool in BUILD_TOOLS:
                assert not re.search(rf"(?:^|\s){re.escape(tool)}(?:\s|$)", run.args), f"{target} installs {tool}"
            if "python -m venv" in run.args:
                assert "--without-pip" in run.args, "the runtime venv should not carry pip"
        for copy in stage.all("COPY") + stage.all("ADD"):
            assert copy.flags.get("from") != "builder", f"{target} copies {copy.args} out of the builder"
    installs = [run for run in STAGES[target].all("RUN") if "pip" in run.args and "install" in run.args]
    assert installs and all("from=builder" in run.flags.get("mount", "") for run in installs), \
        f"{target}: the wheel should be bind-mounted from the builder stage, never copied into a layer"


def _ignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _ignored(relative: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, enough for this file: patterns are relative to the context root (`**`
    crosses folders, `*` does not), a pattern that matches a folder excludes what is inside it, and a
    later `!pattern` re-includes."""
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = "".join(".*" if tok == "**" else "[^/]*" if tok == "*" else "[^/]" if tok == "?" else re.escape(tok)
                        for tok in re.split(r"(\*\*|\*|\?)", body))
        regex = regex.replace(".*/", "(?:.*/)?")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            ignored = not negate
    return ignored


def test_the_dockerignore_matcher():
    assert _ignored("keys/edgepack.key", ["keys"])
    assert not _ignored("deploy/keys", ["keys"])
    assert _ignored("fleet/__pycache__/x.pyc", ["**/__pycache__"])
    assert _ignored("x.pyc", ["**/*.pyc"])
    assert not _ignored("edgepack/cli.py", ["*.py"])
    assert not _ignored("README.md", ["*.md", "!README.md"])


def _copied_sources() -> list[str]:
    sources = []
    for stage in STAGES.values():
        for copy in stage.all("COPY") + stage.all("ADD"):
            if "from" in copy.flags:
                continue
            words = copy.exec_form or shlex.split(copy.args)
            sources += words[:-1]
    return sources


def test_every_copied_file_exists_and_is_in_the_build_context():
    patterns = _ignore_patterns()
    sources = _copied_sources()
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
        assert not _ignored(os.path.normpath(source), patterns), f"COPY {source} is excluded by .dockerignore"
    for secret in ("keys", "deploy/.env", ".git", ".venv", "tests"):
        assert _ignored(secret, patterns), f"{secret} would be sent in the build context"


def test_the_builder_stage_sources_build_a_complete_wheel(tmp_path):
    """What the builder stage COPYs is enough for `pip wheel .` (offline here: no build isolation)."""
    context = tmp_path / "src"
    context.mkdir()
    for source in _copied_sources():
        src = REPO / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, context / source)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "--wheel-dir", str(tmp_path / "wheels"), "."], cwd=context,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("edgepack-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in ("edgepack/cli/__init__.py", "fleet/app.py", "fleet/migrations/env.py",
                   "device_agent/config.py", "device_agent/agent.py", "hardware_profiles/rpi4.yaml",
                   # each component's commands, which the root CLI mounts
                   "builder/cli.py", "fleet/cli/server.py", "device_agent/cli.py", "testbeds/cli.py"):
        assert member in names, f"the wheel lacks {member}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "edgepack = edgepack.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# ------------------------------------------------------------------------------------------------ agent

def _agent_image_facts() -> tuple[str, str, list[str], list[str]]:
    chain = lineage(STAGES, "agent")
    config_env = env_of(chain)["EDGEPACK_AGENT_CONFIG"]
    cmd = last(chain, "CMD").exec_form
    volumes = json.loads(last(chain, "VOLUME").args)
    exposed = last(chain, "EXPOSE").args.split()
    return config_env, cmd[cmd.index("--config") + 1], volumes, exposed


def test_the_example_agent_config_validates_and_fits_the_agent_image():
    from device_agent.config import AgentConfig

    config = AgentConfig.from_yaml(DEPLOY / "agent.example.yaml")
    config_env, config_arg, volumes, exposed = _agent_image_facts()
    assert config_env == config_arg == "/etc/edgepack/agent.yaml"
    assert str(config.state_dir) in volumes
    assert str(config.serve.port) in exposed and config.serve.host == "0.0.0.0"
    assert all(str(key).startswith("/etc/edgepack/") for key in config.trusted_keys)


def test_the_agent_healthcheck_follows_the_heartbeat_file(tmp_path):
    argv = last(lineage(STAGES, "agent"), "HEALTHCHECK").exec_form
    state = tmp_path / "state"
    state.mkdir()
    example = yaml.safe_load((DEPLOY / "agent.example.yaml").read_text())
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({**example, "state_dir": str(state)}))

    def healthy() -> bool:
        env = {**os.environ, "EDGEPACK_AGENT_CONFIG": str(config), "PYTHONPATH": str(REPO)}
        result = subprocess.run([sys.executable, *argv[1:]], env=env, cwd=tmp_path, capture_output=True, timeout=60)
        return result.returncode == 0

    assert not healthy(), "healthy without a heartbeat"
    heartbeat = state / "agent.heartbeat"
    heartbeat.touch()
    assert healthy(), "a fresh heartbeat is not healthy"
    old = time.time() - 300
    os.utime(heartbeat, (old, old))
    assert not healthy(), "a 5-minute-old heartbeat is healthy"


# ------------------------------------------------------------------------------------------------ compose

COMPOSE_DOC = yaml.safe_load(COMPOSE.read_text())


def _fleet_command() -> list[str]:
    command = COMPOSE_DOC["services"]["fleet"]["command"]
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def _volume(spec: str) -> list[str]:
    """A short-syntax volume split at its colons, `${VAR:-default}` kept whole."""
    return re.findall(r"(?:\$\{[^}]*\}|[^:])+", spec)


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_compose_runs_fleet_mosquitto_and_postgres_with_healthchecks():
    services = COMPOSE_DOC["services"]
    assert set(services) == {"fleet", "mosquitto", "postgres"}
    assert services["postgres"]["image"] == "postgres:16"
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:")
    build = services["fleet"]["build"]
    assert build["target"] == "fleet"
    assert ((DEPLOY / build["context"]).resolve() / build.get("dockerfile", "Dockerfile")) == DOCKERFILE
    assert services["fleet"]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                               "mosquitto": {"condition": "service_healthy"}}
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: no healthcheck"
        if test[:3] == ["CMD", "/opt/venv/bin/python", "-c"]:
            compile(test[3], f"<{name} healthcheck>", "exec")
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = _volume(volume)[0]
            if source in GENERATED:
                assert GENERATED[source] in COMPOSE.read_text(), f"{name} mounts {source}; the setup does not say how to make it"
            elif source.startswith(".") and "$" not in source:
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not in deploy/"
            elif not source.startswith(("$", "/", ".")):
                assert source in COMPOSE_DOC["volumes"], f"{name}: named volume {source} is not declared"


def test_the_fleet_service_points_at_the_compose_broker_and_database():
    services = COMPOSE_DOC["services"]
    argv = _fleet_command()
    assert argv[:2] == ["fleet", "serve"]
    mqtt = _option(argv, "--mqtt-url")
    broker_conf = (DEPLOY / "mosquitto.conf").read_text()
    broker_port = re.search(r"^listener\s+(\d+)", broker_conf, re.M).group(1)
    # over TLS as the fleet's own identity, its password from deploy/.env; it manages device identities
    assert re.fullmatch(rf"mqtts://edgepack-fleet:\$\{{EDGEPACK_MQTT_PASSWORD:\?[^}}]+\}}@mosquitto:{broker_port}", mqtt), mqtt
    assert "--mqtt-dynsec" in argv
    ca = _option(argv, "--mqtt-ca")
    mounted = {_volume(volume)[1]: _volume(volume)[0] for volume in services["fleet"]["volumes"]}
    broker_mounts = {_volume(volume)[1]: _volume(volume)[0] for volume in services["mosquitto"]["volumes"]}
    broker_ca = re.search(r"^cafile\s+(\S+)", broker_conf, re.M).group(1)  # the CA the broker's certificate chains to
    assert mounted[ca] == broker_mounts[str(Path(broker_ca).parent)] + "/" + Path(broker_ca).name
    pg = services["postgres"]["environment"]
    assert _option(argv, "--db-url") == (f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}"
                                         f"@postgres:5432/{pg['POSTGRES_DB']}")
    data_dir = _option(argv, "--data-dir")
    assert data_dir in json.loads(last(lineage(STAGES, "fleet"), "VOLUME").args)
    assert any(_volume(volume)[1] == data_dir for volume in services["fleet"]["volumes"])
    trusted = _option(argv, "--trusted-key")
    assert any(_volume(volume)[1] == trusted for volume in services["fleet"]["volumes"])
    assert "${EDGEPACK_ADMIN_TOKEN" in services["fleet"]["environment"]["EDGEPACK_ADMIN_TOKEN"]
    assert _option(argv, "--port") == "8080" and any(p.endswith(":8080") for p in services["fleet"]["ports"])


def test_every_compose_variable_is_in_the_env_example():
    example = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    assert used <= set(example), f"not in deploy/.env.example: {sorted(used - set(example))}"
    assert len(example["EDGEPACK_ADMIN_TOKEN"]) >= 16, "the fleet server refuses admin tokens under 16 characters"


def test_the_fleet_commands_flags_exist_in_fleet_serve_help():
    """Fails (never skips) while `edgepack fleet serve` is missing: the compose file and image call it."""
    result = run_cli("fleet", "serve", "--help", env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.returncode == 0, f"`edgepack fleet serve --help` failed:\n{result.stdout}{result.stderr}"
    used = {word for word in _fleet_command() + last(lineage(STAGES, "fleet"), "CMD").exec_form
            if word.startswith("--")}
    assert used <= set(FLEET_SERVE_FLAGS), f"flags beyond the agreed list: {sorted(used - set(FLEET_SERVE_FLAGS))}"
    for flag in sorted(used):
        assert flag in result.stdout, f"`edgepack fleet serve` has no {flag}"


def test_the_agent_images_command_exists():
    """Fails (never skips) while `edgepack agent run` is missing: the agent image's CMD calls it."""
    cmd = last(lineage(STAGES, "agent"), "CMD").exec_form
    result = run_cli(*cmd[:2], "--help", env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.returncode == 0, f"`edgepack {' '.join(cmd[:2])} --help` failed:\n{result.stdout}{result.stderr}"
    for flag in (word for word in cmd if word.startswith("--")):
        assert flag in result.stdout, f"`edgepack {' '.join(cmd[:2])}` has no {flag}"


def _connack(port: int, ca: Path | None, username: str | None = None, password: str | None = None) -> tuple[bool, bool]:
    """(accepted, subscription acknowledged) for one client of the broker on `port`."""
    import threading

    from paho.mqtt import client as mqtt

    answers: dict[str, bool] = {}
    done = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        answers["accepted"] = not reason_code.is_failure
        if reason_code.is_failure:
            done.set()
        else:
            client.subscribe("edgepack/v1/devices/healthcheck/status")

    def on_subscribe(client, userdata, mid, reason_codes, properties) -> None:
        answers["subscribed"] = not any(code.is_failure for code in reason_codes)
        done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    if username:
        client.username_pw_set(username, password)
    if ca:
        import ssl

        client.tls_set_context(ssl.create_default_context(cafile=str(ca)))
    client.on_connect, client.on_subscribe = on_connect, on_subscribe
    client.on_disconnect = lambda *args: done.set()
    try:
        client.connect("127.0.0.1", port)
    except OSError:
        return False, False
    client.loop_start()
    done.wait(10)
    client.loop_stop()
    client.disconnect()
    return answers.get("accepted", False), answers.get("subscribed", False)


def test_the_mosquitto_config_starts_a_broker_that_passes_its_healthcheck(tmp_path):
    """deploy/mosquitto.conf on a free loopback port, with the files the compose setup makes: a lab CA and the
    broker's certificate, the plugin's bootstrap file holding the fleet's identity. Anonymous clients are
    refused; the fleet's identity logs in over TLS; the compose healthcheck's command passes (where installed)
    and fails with a wrong password."""
    import pwd
    import secrets

    from edgepack.tls import create_lab_ca, issue_certificate
    from fleet.broker.config import find_dynsec_plugin
    from fleet.broker.dynsec import bootstrap_config
    from testbeds.mosquitto import find_mosquitto, free_port

    certs, data = tmp_path / "certs", tmp_path / "data"
    create_lab_ca(certs)
    issue_certificate(certs, "broker", ["mosquitto"])
    data.mkdir()
    password = secrets.token_urlsafe(24)
    (data / "dynamic-security.json").write_text(json.dumps(bootstrap_config(password)))
    port = free_port()
    text = (DEPLOY / "mosquitto.conf").read_text()
    for pattern, value in ((r"^listener\s+8883\s*$", f"listener {port} 127.0.0.1"),
                           (r"^persistence_location\s+.*$", f"persistence_location {data}/"),
                           (r"^plugin\s+/usr/lib/mosquitto_dynamic_security\.so\s*$", f"plugin {find_dynsec_plugin()}"),
                           (r"^plugin_opt_config_file\s+/mosquitto/data/dynamic-security\.json\s*$",
                            f"plugin_opt_config_file {data / 'dynamic-security.json'}")):
        text, count = re.subn(pattern, value, text, flags=re.M)
        assert count == 1, f"deploy/mosquitto.conf has no line matching {pattern}"
    text = text.replace("/mosquitto/certs/", f"{certs}/")
    settings = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert not [line for line in settings if "/mosquitto/" in line] and "allow_anonymous false" in settings
    # started as root, mosquitto would drop to its own user, which cannot read this temp folder's 0600 files
    (tmp_path / "mosquitto.conf").write_text(f"user {pwd.getpwuid(os.getuid()).pw_name}\n" + text)
    broker = subprocess.Popen([find_mosquitto(), "-c", str(tmp_path / "mosquitto.conf")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            assert broker.poll() is None, f"mosquitto exited: {broker.stdout.read()}"
            assert time.monotonic() < deadline, "mosquitto did not start from deploy/mosquitto.conf"
            time.sleep(0.1)
        ca = certs / "ca.pem"
        assert _connack(port, ca, "edgepack-fleet", password) == (True, True)
        assert _connack(port, ca) == (False, False), "an anonymous client was accepted"
        assert _connack(port, ca, "edgepack-fleet", "wrong") == (False, False)
        assert _connack(port, None, "edgepack-fleet", password) == (False, False), "a plain-text client was accepted"

        test = COMPOSE_DOC["services"]["mosquitto"]["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        if shutil.which(shlex.split(test[1])[0]):
            command = test[1].replace("$$", "$").replace("/mosquitto/certs/", f"{certs}/").replace("-p 8883", f"-p {port}")

            def check(secret: str) -> int:
                env = {**os.environ, "EDGEPACK_MQTT_PASSWORD": secret}
                return subprocess.run(["sh", "-c", command], env=env, capture_output=True, timeout=30).returncode

            assert check(password) == 0
            assert check("wrong") != 0
    finally:
        broker.terminate()
        broker.wait(timeout=10)


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
