"""The ``mlx-gateway`` command, run as a subprocess against the real server on the tiny model: ``--version``,
``serve`` flags, and every ``caches`` subcommand with its output, progress and errors."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest

import gateway
from tests.servers import ROOT, Server, free_port, run_server

ADMIN = "cli-admin-secret"
CONFIG = """
[[models]]
name = "tiny"
path = "tiny"
prefill_step_size = 128

[[models]]
name = "tiny-slow"
path = "tiny"
prefill_step_size = 16
"""
# Resident prefix caches on this server: two of ~250 tokens (about 256 KB each on tiny) do not fit together.
BUDGET = 400 * 1024
# Every token of this text is one token of tiny's tokenizer.
WORDS = " ".join(["self", "value", "the", "return"] * 1000)


def cli(
    *args: str, env: Mapping[str, str] | None = None, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m gateway.cli.main ARGS`` with no MLX_GATEWAY_* variables but those of ``env``."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_GATEWAY_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", *args],
        cwd=ROOT,
        env=full_env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def gw(models_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real server, configured by serve flags: an admin key, a small memory budget given as a size."""
    config = tmp_path_factory.mktemp("cli-config") / "gateway.toml"
    config.write_text(CONFIG)
    cache_dir = tmp_path_factory.mktemp("cli-prefix-caches")
    args = ["--config", str(config), "--cache-dir", str(cache_dir), "--admin-key", ADMIN]
    args += ["--prefix-cache-memory-bytes", "400KiB", "--log-level", "debug"]
    with run_server(args, models_dir=models_dir, log_dir=log_dir) as srv:
        yield srv


def env_for(server: Server, key: str = ADMIN) -> dict[str, str]:
    return {"MLX_GATEWAY_URL": server.url, "MLX_GATEWAY_ADMIN_KEY": key}


def words(n: int) -> str:
    return " ".join(WORDS.split()[:n])


# ---- --version and serve ---------------------------------------------------------------------------------


def test_version_is_the_package_version() -> None:
    assert cli("--version").stdout == f"mlx-gateway {gateway.__version__}\n"
    script = Path(sys.executable).with_name("mlx-gateway")  # the console script of pyproject's [project.scripts]
    done = subprocess.run([str(script), "-V"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == f"mlx-gateway {gateway.__version__}\n"


def test_serve_help_lists_every_flag_with_its_env_variable() -> None:
    done = cli("serve", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())  # help text is wrapped to the terminal
    for flag, var in [
        ("--model", "MLX_GATEWAY_MODEL"),
        ("--model-name", "MLX_GATEWAY_MODEL_NAME"),
        ("--host", "MLX_GATEWAY_HOST"),
        ("--port", "MLX_GATEWAY_PORT"),
        ("--config", "MLX_GATEWAY_CONFIG"),
        ("--api-key", "MLX_GATEWAY_API_KEYS"),
        ("--admin-key", "MLX_GATEWAY_ADMIN_KEY"),
        ("--log-level", "MLX_GATEWAY_LOG_LEVEL"),
        ("--log-format", "MLX_GATEWAY_LOG_FORMAT"),
        ("--isolation-mode", "MLX_GATEWAY_ISOLATION_MODE"),
        ("--max-running", "MLX_GATEWAY_MAX_RUNNING"),
        ("--max-queued", "MLX_GATEWAY_MAX_QUEUED"),
        ("--max-queued-tokens", "MLX_GATEWAY_MAX_QUEUED_TOKENS"),
        ("--queue-timeout", "MLX_GATEWAY_QUEUE_TIMEOUT_SECONDS"),
        ("--shutdown-timeout", "MLX_GATEWAY_SHUTDOWN_TIMEOUT_SECONDS"),
        ("--cache-dir", "MLX_GATEWAY_CACHE_DIR"),
        ("--models-dir", "MLX_GATEWAY_MODELS_DIR"),
        ("--no-prefix-caches", "MLX_GATEWAY_PREFIX_CACHES"),
        ("--prefix-cache-memory-bytes", "MLX_GATEWAY_PREFIX_CACHE_MEMORY_BYTES"),
        ("--max-body-bytes", "MLX_GATEWAY_MAX_BODY_BYTES"),
        ("--cors-allowed-origins", "MLX_GATEWAY_CORS_ALLOWED_ORIGINS"),
        ("--blas", "MLX_GATEWAY_BLAS"),
    ]:
        assert flag in text and f"[env var: {var}]" in text, flag
    assert text.count("visible to other users in `ps`") == 1 and "Visible in `ps`" in text  # both secrets


def test_serve_flags_beat_env_which_beats_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('max_running = 3\nlog_level = "error"\nadmin_key = "from-file"\n')
    env = {"MLX_GATEWAY_LOG_LEVEL": "warning", "MLX_GATEWAY_ADMIN_KEY": "from-env", "MLX_GATEWAY_PREFIX_CACHES": "0"}
    shown = json.loads(cli("serve", "--config", str(f), "--print-config", env=env).stdout)
    assert (shown["max_running"], shown["log_level"], shown["prefix_caches"]) == (3, "warning", False)
    assert shown["admin_key"] == "<redacted>" and "from-env" not in json.dumps(shown)
    args = ["serve", "--config", str(f), "--print-config", "--log-level", "DEBUG", "--prefix-caches"]
    args += ["--api-key", "k1", "--api-key", "k2:beta", "--cors-allowed-origins", "https://a.example,https://b.example"]
    args += ["--prefix-cache-memory-bytes", "1GiB", "--shutdown-timeout", "2.5", "--model", "tiny", "--model-name", "t"]
    shown = json.loads(cli(*args, env=env).stdout)
    assert (shown["log_level"], shown["prefix_caches"], shown["max_running"]) == ("debug", True, 3)
    assert shown["api_keys"] == {"<key 1>": "default", "<key 2>": "beta"}
    assert shown["cors_allowed_origins"] == ["https://a.example", "https://b.example"]
    assert shown["prefix_cache_memory_bytes"] == 1024**3 and shown["shutdown_timeout_seconds"] == 2.5
    assert [(m["name"], m["path"]) for m in shown["models"]] == [("t", "tiny")]


def test_serve_refuses_bad_flags() -> None:
    bad = cli("serve", "--prefix-cache-memory-bytes", "lots", "--print-config")
    assert bad.returncode == 2 and "'lots' is not a size" in bad.stderr
    bad = cli("serve", "--log-level", "loud")
    assert bad.returncode == 2 and "--log-level" in bad.stderr and "'loud' is not one of" in bad.stderr


# A user's mistake ends `serve` with one line that says what is wrong and a non-zero status, without a
# traceback, within seconds (it used to log a traceback and serve 503s for ever).
LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def serve_until_exit(tmp_path: Path, models_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``serve ARGS`` on a free port with its own cache directory, offline; must end within 60 s."""
    cache_dir = tmp_path / "caches"
    env = {"MLX_GATEWAY_MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1"}
    base = ["serve", "--host", "127.0.0.1", "--port", str(free_port()), "--cache-dir", str(cache_dir)]
    return cli(*base, *args, env=env, timeout=60)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not toml [", "cannot read config file"),
        ("bogus = 1", "invalid configuration: Object contains unknown field `bogus`"),
        ('max_running = "many"', "invalid configuration: Expected `int`, got `str` - at `$.max_running`"),
    ],
    ids=["syntax", "unknown-key", "wrong-type"],
)
def test_a_bad_config_file_is_one_line(tmp_path: Path, models_dir: Path, text: str, reason: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text + "\n")
    done = serve_until_exit(tmp_path, models_dir, "--config", str(f))
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("mlx-gateway: ") and reason in line, line


def test_a_port_in_use_is_one_line_before_anything_loads(tmp_path: Path, models_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve_until_exit(tmp_path, models_dir, "--model", "tiny", "--port", str(port))
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert LOG_RECORD.match(line) and " ERROR gateway: " in line, line
    assert line.endswith(f"cannot listen on 127.0.0.1:{port}: Address already in use")


def test_an_unusable_cache_directory_is_one_line(tmp_path: Path, models_dir: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = serve_until_exit(tmp_path, models_dir, "--model", "tiny", "--cache-dir", str(blocker / "caches"))
    assert done.returncode == 1
    [line] = done.stderr.splitlines()[-1:]
    assert "Traceback" not in done.stderr and all(LOG_RECORD.match(x) for x in done.stderr.splitlines())
    assert f"ERROR gateway: cannot use the prefix-cache directory {blocker / 'caches'}: " in line, line


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("{tmp}/no-such-model", "ModelNotFound: No model directory at {tmp}/no-such-model"),
        ("{tmp}", "ModelNotFound: {tmp} is not a model directory: it has no config.json"),
        ("{tmp}/no-such.gguf", "GGUFError: No GGUF file at {tmp}/no-such.gguf"),
        ("tinyy", "ModelNotFound: 'tinyy' is not a preset (tiny, small, "),
    ],
    ids=["missing-path", "not-a-model-dir", "missing-gguf", "unknown-preset"],
)
def test_a_model_that_cannot_load_ends_serve_with_one_line(
    tmp_path: Path, models_dir: Path, model: str, reason: str
) -> None:
    source = model.format(tmp=tmp_path / "m")
    (tmp_path / "m").mkdir()
    reason = reason.format(tmp=tmp_path / "m")
    started = time.monotonic()
    done = serve_until_exit(tmp_path, models_dir, "--model", source)
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 45
    lines = done.stderr.splitlines()
    assert "Traceback" not in done.stderr and all(LOG_RECORD.match(x) for x in lines), done.stderr
    # The model's own report (as with several models), then the last line: why the server stops.
    errors = [x.split(" ", 2)[2] for x in lines if " ERROR " in x]
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"ERROR adapters.mlx_lm.engine: model {source} failed to load: {reason}")
    assert errors[1].startswith(f"ERROR gateway: nothing to serve: model {source} failed to load: {reason}")
    assert lines[-1].endswith(errors[1])


def test_serve_flags_configure_the_real_server(gw: Server) -> None:
    # --admin-key guards cache management; inference stays open.
    r = httpx.get(f"{gw.url}/admin/prefix-caches", timeout=30)
    assert r.status_code == 401 and "the admin key" in r.json()["error"]["message"]
    r = httpx.get(f"{gw.url}/admin/prefix-caches", headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 200
    assert httpx.get(f"{gw.url}/v1/models", timeout=30).status_code == 200
    # --prefix-cache-memory-bytes 400KiB: test_warm_loads_a_cold_cache_and_says_when_it_cannot_stay.


# ---- caches ----------------------------------------------------------------------------------------------


def test_caches_lifecycle_as_tables(gw: Server) -> None:
    env = env_for(gw)
    made = cli("caches", "create", "life", "--model", "tiny", "--prompt", words(40), "--no-progress", env=env)
    assert made.returncode == 0, made.stderr
    assert made.stderr == ""  # --no-progress: nothing streamed
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in made.stdout.splitlines())
    assert list(fields)[:7] == ["name", "model", "status", "source", "tokens", "kv", "size"]
    assert fields["name"] == "life" and fields["model"] == "tiny" and fields["status"] == "ready"
    assert fields["source"] == "prompt" and fields["tokens"] == "40" and fields["kv"] == "float32"

    listed = cli("caches", "list", env=env)
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "MODEL", "STATUS", "TOKENS", "KV", "SIZE", "HITS", "LAST", "USED"]
    row = next(r.split() for r in rows if r.startswith("life "))
    assert row[:5] == ["life", "tiny", "ready", "40", "float32"] and row[-1] == "never"

    got = cli("caches", "get", "life", env=env)
    assert got.returncode == 0 and "tokens             40" in got.stdout and "integrity" not in got.stdout
    verified = cli("caches", "get", "life", "--verify", env=env)
    assert verified.returncode == 0 and "integrity          ok" in verified.stdout
    assert "file sha256" in verified.stdout and "arrays sha256" in verified.stdout

    deleted = cli("caches", "delete", "life", env=env)
    assert deleted.returncode == 0 and deleted.stdout == "deleted life\n"
    assert "life " not in cli("caches", "list", env=env).stdout


def test_json_output_is_the_servers_json(gw: Server) -> None:
    env = env_for(gw)
    made = cli("caches", "create", "js", "--model", "tiny", "--prompt", words(20), "--json", env=env)
    assert made.returncode == 0, made.stderr
    headers = {"authorization": f"Bearer {ADMIN}"}
    server = httpx.get(f"{gw.url}/admin/prefix-caches/js", headers=headers, timeout=30).json()
    assert json.loads(made.stdout) == server
    assert json.loads(cli("caches", "get", "js", "--json", env=env).stdout) == server
    listing = json.loads(cli("caches", "list", "--json", env=env).stdout)
    assert listing == httpx.get(f"{gw.url}/admin/prefix-caches", headers=headers, timeout=30).json()
    verified = json.loads(cli("caches", "get", "js", "--verify", "--json", env=env).stdout)
    assert verified["integrity"]["ok"] is True and verified["integrity"]["file_sha256"]
    deleted = json.loads(cli("caches", "delete", "js", "--json", env=env).stdout)
    assert deleted == {"id": "js", "object": "prefix_cache.deleted", "deleted": True}


def test_create_from_files_and_stdin(gw: Server, tmp_path: Path) -> None:
    env = env_for(gw)
    messages = [{"role": "system", "content": "You review Python code. " * 5}]
    path = tmp_path / "messages.json"
    path.write_text(json.dumps({"messages": messages}))
    args = ["caches", "create", "chat", "--model", "tiny", "--messages-file", str(path), "--json", "--no-progress"]
    body = json.loads(cli(*args, env=env).stdout)
    assert body["source"] == "messages" and body["model"] == "tiny"
    # The same messages through the API directly give the same tokens.
    direct = httpx.post(
        f"{gw.url}/admin/prefix-caches",
        json={"name": "chat-direct", "model": body["model"], "messages": messages},
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=60,
    ).json()
    assert direct["tokens_sha256"] == body["tokens_sha256"]
    args = ["caches", "create", "chat-list", "--model", "tiny", "--messages-file", "-", "--json", "--no-progress"]
    listed = json.loads(cli(*args, env=env, stdin=json.dumps(messages)).stdout)  # a bare list, from stdin
    assert listed["tokens_sha256"] == body["tokens_sha256"]
    bad = cli(*args, env=env, stdin='{"no": "messages"}')
    assert bad.returncode == 2 and "give a JSON list of messages" in bad.stderr
    piped = cli(
        "caches", "create", "piped", "--model", "tiny", "--prompt-file", "-", "--json", env=env, stdin=words(33)
    )
    assert json.loads(piped.stdout)["num_tokens"] == 33
    for name in ("chat", "chat-direct", "chat-list", "piped"):
        assert cli("caches", "delete", name, env=env).returncode == 0


def test_create_needs_model_when_the_server_has_several(gw: Server) -> None:
    done = cli("caches", "create", "x", "--prompt", "hello", env=env_for(gw))
    assert done.returncode == 2 and "give --model: the server serves tiny, tiny-slow" in done.stderr


def test_create_streams_progress_lines_when_not_on_a_terminal(gw: Server) -> None:
    done = cli("caches", "create", "prog", "--model", "tiny", "--prompt", words(1000), "--json", env=env_for(gw))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["num_tokens"] == 1000  # stdout stays clean JSON
    lines = done.stderr.splitlines()
    # 128-token chunks: a line at the first, at each further tenth, at the end.
    assert lines[0] == "building prog: 128/1000 tokens (12%)" and lines[-1] == "building prog: 1000/1000 tokens (100%)"
    counts = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert counts == sorted(counts) and all(c % 128 == 0 for c in counts[:-1]) and len(lines) >= 6
    assert cli("caches", "delete", "prog", env=env_for(gw)).returncode == 0


def test_create_draws_a_progress_bar_on_a_terminal(gw: Server) -> None:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_GATEWAY_")}
    full_env.update(env_for(gw))
    leader, follower = pty.openpty()
    args = ["caches", "create", "bar", "--model", "tiny-slow", "--prompt", words(800)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.main", *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    )
    os.close(follower)
    screen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        assert ready, "no output from the CLI in 60 s"
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the CLI exited and closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, screen.decode(errors="replace")
    text = screen.decode(errors="replace")
    # click redraws one line ("\r"): the bar passes through partial states to the whole prefix.
    frames = [f.strip() for f in text.split("\r") if "building bar" in f]
    assert len(frames) >= 3 and "800/800" in frames[-1] and "100%" in frames[-1]
    assert any("/800" in f and "800/800" not in f for f in frames)
    assert "tokens" in out and "800" in out
    assert cli("caches", "delete", "bar", env=env_for(gw)).returncode == 0


def test_interrupting_a_streamed_create_cancels_the_build(gw: Server) -> None:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_GATEWAY_")}
    full_env.update(env_for(gw))
    # tiny-slow prefills 16 tokens a chunk: 4,000 tokens are 250 engine turns.
    args = ["caches", "create", "interrupted", "--model", "tiny-slow", "--prompt", WORDS]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.main", *args],
        cwd=ROOT,
        env=full_env,
        stderr=subprocess.PIPE,
        text=True,
        # As in a terminal: SIGINT raises KeyboardInterrupt. A child inherits an ignored SIGINT (pytest started
        # in the background by a script, or under nohup), and Python then keeps ignoring it: the CLI would
        # build to the end and exit 0.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()
    assert first.startswith("building interrupted: 16/4000 tokens"), first
    # The server is stopped while the interrupt lands: however late this busy machine runs the CLI, the build
    # cannot finish first. It resumes to a closed connection.
    os.kill(gw.process.pid, signal.SIGSTOP)
    try:
        done = [int(n) for n in re.findall(r"prefix cache interrupted: (\d+)/4000 tokens", gw.log_text())]
        assert done and max(done) < 4000, "the build finished before the interrupt could be sent"
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        os.kill(gw.process.pid, signal.SIGCONT)
    assert proc.returncode == 1 and "Aborted!" in rest
    deadline = time.monotonic() + 30
    while "prefix cache build interrupted cancelled" not in gw.log_text():
        assert time.monotonic() < deadline, gw.log_text()[-3000:]
        time.sleep(0.1)
    missing = cli("caches", "get", "interrupted", env=env_for(gw))
    assert missing.returncode == 1 and "prefix_cache_not_found" in missing.stderr


def test_warm_loads_a_cold_cache_and_says_when_it_cannot_stay(gw: Server) -> None:
    env = env_for(gw)
    sizes = {}
    for name in ("warm-a", "warm-b"):
        made = cli("caches", "create", name, "--model", "tiny", "--prompt", words(250), "--json", env=env)
        sizes[name] = json.loads(made.stdout)["size_bytes"]
    # Both fit the budget alone, not together: building warm-b evicted warm-a from memory.
    assert BUDGET / 2 < sizes["warm-a"] < BUDGET

    warmed = cli("caches", "warm", "warm-a", "--json", env=env)
    body = json.loads(warmed.stdout)
    assert body["id"] == "warm-a" and body["object"] == "prefix_cache.warmed" and body["was_resident"] is False
    assert body["load_ms"] > 0 and BUDGET / 2 < body["bytes_in_memory"] < BUDGET
    again = cli("caches", "warm", "warm-a", env=env)
    assert again.returncode == 0 and again.stdout.startswith("warm-a: already in memory (")
    # What warming is for: the next request naming the cache finds it resident.
    r = httpx.post(
        f"{gw.url}/v1/completions",
        json={"model": "tiny", "prompt": words(250) + " self", "max_tokens": 1, "prefix_cache": "warm-a"},
        timeout=60,
    )
    assert "hit=true" in r.headers["x-prefix-cache"] and "resident=true" in r.headers["x-prefix-cache"]
    cold = cli("caches", "warm", "warm-b", env=env)  # evicted when warm-a came back
    assert cold.returncode == 0 and cold.stdout.startswith("warm-b: loaded into memory (")

    big = cli("caches", "create", "warm-big", "--model", "tiny", "--prompt", words(600), "--no-progress", env=env)
    assert big.returncode == 0
    refused = cli("caches", "warm", "warm-big", env=env)
    assert refused.returncode == 1 and "(409, prefix_cache_over_memory_budget)" in refused.stderr
    assert f"memory budget ({BUDGET} bytes)" in refused.stderr
    for name in ("warm-a", "warm-b", "warm-big"):
        assert cli("caches", "delete", name, env=env).returncode == 0


# ---- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["get"], ["get", "--verify"], ["warm"], ["delete"]])
def test_unknown_cache_is_the_servers_404(gw: Server, command: list[str]) -> None:
    done = cli("caches", *command[:1], "no-such-cache", *command[1:], env=env_for(gw))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == "Error: The prefix cache 'no-such-cache' does not exist (404, prefix_cache_not_found)\n"


def test_server_refusals_are_shown_with_exit_status_1(gw: Server) -> None:
    env = env_for(gw)
    cli("caches", "create", "dup", "--model", "tiny", "--prompt", "a b c", "--no-progress", env=env)
    for progress in ("--progress", "--no-progress"):
        dup = cli("caches", "create", "dup", "--model", "tiny", "--prompt", "a b c", progress, env=env)
        assert dup.returncode == 1 and "(409, prefix_cache_exists)" in dup.stderr and dup.stdout == ""
        bad = cli("caches", "create", "bad/name", "--model", "tiny", "--prompt", "x", progress, env=env)
        assert bad.returncode == 1 and "(400, invalid_prefix_cache_name)" in bad.stderr
        nomodel = cli("caches", "create", "x", "--model", "nope", "--prompt", "x", progress, env=env)
        assert nomodel.returncode == 1 and "(404, model_not_found)" in nomodel.stderr
    replaced = cli("caches", "create", "dup", "--model", "tiny", "--prompt", "d e", "--replace", "--json", env=env)
    assert json.loads(replaced.stdout)["num_tokens"] == 2
    assert cli("caches", "delete", "dup", env=env).returncode == 0


def test_bad_key_and_no_key(gw: Server) -> None:
    wrong = cli("caches", "list", env=env_for(gw, key="wrong"))
    assert wrong.returncode == 1 and wrong.stderr == "Error: Incorrect API key provided (401, invalid_api_key)\n"
    none = cli("caches", "list", "--url", gw.url)
    assert none.returncode == 1 and "needs the admin key" in none.stderr and "(401, invalid_api_key)" in none.stderr
    flag = cli("caches", "list", "--url", gw.url, "--key", ADMIN)
    assert flag.returncode == 0


def test_server_down_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for command in (["list"], ["get", "x"], ["create", "x", "--model", "tiny", "--prompt", "y"], ["warm", "x"]):
        done = cli("caches", *command, "--url", url)
        assert done.returncode == 1 and done.stderr.startswith(f"Error: cannot reach the gateway at {url}: ")


def test_usage_errors_exit_2(gw: Server) -> None:
    neither = cli("caches", "create", "x", "--model", "tiny", env=env_for(gw))
    assert neither.returncode == 2 and "exactly one of --prompt, --prompt-file and --messages-file" in neither.stderr
    both = cli("caches", "create", "x", "--model", "tiny", "--prompt", "a", "--prompt-file", "-", env=env_for(gw))
    assert both.returncode == 2


def test_tenants_through_the_cli(auth_server: Server) -> None:
    """A tenant's key manages its own caches; the admin key acts for a tenant with --tenant."""
    admin = {"MLX_GATEWAY_URL": auth_server.url, "MLX_GATEWAY_ADMIN_KEY": "admin-secret"}
    made = cli("caches", "create", "t-cache", "--model", "tiny", "--prompt", "a b", "--tenant", "alpha", env=admin)
    assert made.returncode == 0, made.stderr
    alpha = {"MLX_GATEWAY_URL": auth_server.url, "MLX_GATEWAY_API_KEY": "key-alpha"}
    beta = {"MLX_GATEWAY_URL": auth_server.url, "MLX_GATEWAY_API_KEY": "key-beta"}
    assert "t-cache" in cli("caches", "list", env=alpha).stdout
    assert cli("caches", "list", env=beta).stderr == "no prefix caches\n"
    hidden = cli("caches", "get", "t-cache", env=beta)
    assert hidden.returncode == 1 and "prefix_cache_not_found" in hidden.stderr
    other = cli("caches", "list", "--tenant", "alpha", env=beta)
    assert other.returncode == 1 and "(403, forbidden)" in other.stderr
    # Without --model the server's only model is used (the tenant's key may list models).
    made = cli("caches", "create", "t-auto", "--prompt", "c d", "--json", env=alpha)
    assert json.loads(made.stdout)["model"] == "tiny"
    for name in ("t-cache", "t-auto"):
        assert cli("caches", "delete", name, env=alpha).returncode == 0


def test_keys_new_prints_a_fresh_key_and_the_config_line_that_serves_it(tmp_path: Path) -> None:
    first, second = cli("keys", "new", "--tenant", "alpha"), cli("keys", "new", "--tenant", "alpha")
    key, *_, line = first.stdout.splitlines()
    assert first.returncode == 0 and key.startswith("mgw-") and key != second.stdout.splitlines()[0]
    assert line == f'api_keys = {{ "{key}" = "alpha" }}'
    f = tmp_path / "c.toml"
    f.write_text(line + "\n")
    shown = json.loads(cli("serve", "--config", str(f), "--print-config").stdout)
    assert shown["api_keys"] == {"<key 1>": "alpha"} and key not in json.dumps(shown)
    hashed = cli("keys", "new", "--tenant", "beta", "--hashed").stdout.splitlines()
    assert hashed[0] not in hashed[-1] and '"sha256:' in hashed[-1]
    f.write_text(hashed[-1] + "\n")
    assert cli("serve", "--config", str(f), "--print-config").returncode == 0
    bad = cli("keys", "new", "--tenant", "a:b")
    assert bad.returncode == 2 and "--tenant" in bad.stderr
    assert cli("keys", "new").returncode == 2  # the tenant is required
