"""kill -9 at random points of prefix-cache create / replace / delete, then restart and check every cache.

Each round sends one operation (with a tenant's key or the admin key acting for the tenant), SIGKILLs the
server after a random delay (seeded: ``--seed`` and the round's line in the log reproduce it), restarts
it on the same cache directory and checks:

- each cache of both tenants is its old or its new version (by the manifest's ``tokens_sha256``), and
  the new one whenever the server had answered the operation before the kill (an answer means it is on
  disk);
- each is ready and fully usable: ``warm`` reads and checks its file, and a greedy request through it
  hits all its tokens and answers exactly what a never-killed cache of the same prompt answers;
- nothing else is under the cache directory: no temporary or pending file, no KV file without its
  manifest and no manifest without its KV file.

``tests/integration/test_kill9.py`` runs a few tens of rounds; the long run is
``python -m bench.faults --rounds 300`` (figures in bench/RESULTS.md).
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.harness import bench_parser, free_port, server_process, write_result

ADMIN = "admin-secret"
KEYS = {"alpha": "key-alpha", "beta": "key-beta"}
NAMES = ("c0", "c1", "c2")
WORDS = ["self", "value", "the", "return", "import", "class", "def", "yield"]
# Different lengths, so that kills land in prefill chunks, in the write of small and large files, and
# between the files of a save.
PROMPTS = [" ".join(WORDS[i % 8 : i % 8 + 3] * (n // 3)) for i, n in enumerate((60, 700, 1800, 3000))]
QUESTION = "and then"


@dataclass
class Tally:
    rounds: int = 0
    kills: int = 0
    killed_before_answer: int = 0
    answered_before_kill: int = 0
    found_old: int = 0
    found_new: int = 0
    bad_caches: int = 0
    stray_files: int = 0
    problems: list[str] = field(default_factory=list)


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Faults:
    """A server that is killed and restarted on one cache directory, and the state its caches must be in."""

    def __init__(self, root: Path, seed: int, model: str = "tiny", log: Callable[[str], None] = print) -> None:
        self.root = root
        self.cache_dir = root / "caches"
        self.model = model
        self.rng = random.Random(seed)
        self.seed = seed
        self.log = log
        self.tally = Tally()
        # (tenant, name) -> the prompt index it holds (absent: no cache).
        self.state: dict[tuple[str, str], int] = {}
        self.sha_of: dict[str, int] = {}  # tokens_sha256 -> prompt index
        self.answers: dict[int, str] = {}  # prompt index -> greedy answer through a never-killed cache
        self.seconds: dict[int, float] = {}  # prompt index -> how long its create took
        self.url = ""
        # The last round's operation: (tenant, name, old, new, answered before the kill).
        self.pending: tuple[str, str, int | None, int | None, bool] | None = None

    # ---- the server ------------------------------------------------------------------------------

    def _serve(self) -> AbstractContextManager[subprocess.Popen[bytes]]:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "gateway.cli.main", "serve", "--model", self.model, "--port", str(port)]
        cmd += ["--cache-dir", str(self.cache_dir)]
        env = {"MLX_GATEWAY_API_KEYS": ",".join(f"{k}:{t}" for t, k in KEYS.items()), "MLX_GATEWAY_ADMIN_KEY": ADMIN}
        return server_process(cmd, self.url, self.root / "server.log", {"PYTHONUNBUFFERED": "1", **env})

    def _create(self, tenant: str, name: str, prompt: int, replace: bool, admin: bool) -> httpx.Response:
        body: dict[str, Any] = {"name": name, "model": self.model, "prompt": PROMPTS[prompt], "replace": replace}
        if admin:
            body["tenant"] = tenant
        key = ADMIN if admin else KEYS[tenant]
        return httpx.post(f"{self.url}/admin/prefix-caches", json=body, headers=_headers(key), timeout=120)

    def _answer(self, tenant: str, name: str) -> httpx.Response:
        body = {"model": self.model, "prompt": QUESTION, "max_tokens": 8, "temperature": 0, "prefix_cache": name}
        return httpx.post(f"{self.url}/v1/completions", json=body, headers=_headers(KEYS[tenant]), timeout=120)

    # ---- the run ---------------------------------------------------------------------------------

    def bootstrap(self) -> None:
        """Reference caches (never touched by the rounds) give each prompt's sha256 and greedy answer."""
        with self._serve():
            for i in range(len(PROMPTS)):
                started = time.perf_counter()
                r = self._create("alpha", f"ref-{i}", i, True, False)
                self.seconds[i] = time.perf_counter() - started
                r.raise_for_status()
                self.sha_of[r.json()["tokens_sha256"]] = i
                answer = self._answer("alpha", f"ref-{i}")
                answer.raise_for_status()
                self.answers[i] = answer.json()["choices"][0]["text"]
        self.log(f"bootstrap: create seconds per prompt {[round(s, 3) for s in self.seconds.values()]}")

    def round(self, number: int) -> None:
        with self._serve() as proc:
            # The last round's outcome first: the next operation is chosen from what is really there.
            self.verify(number)
            self._strike(number, proc)

    def _strike(self, number: int, proc: subprocess.Popen[bytes]) -> None:
        tenant = self.rng.choice(sorted(KEYS))
        name = self.rng.choice(NAMES)
        admin = self.rng.random() < 0.5
        old = self.state.get((tenant, name))
        if old is None:
            op, new = "create", self.rng.randrange(len(PROMPTS))
        elif self.rng.random() < 0.3:
            op, new = "delete", None
        else:
            op, new = "replace", self.rng.choice([i for i in range(len(PROMPTS)) if i != old])
        window = 0.05 if new is None else 1.3 * self.seconds[new]
        delay = self.rng.uniform(0, window)
        actor = "admin" if admin else tenant
        self.log(f"round {number}: {op} {tenant}/{name} {old}->{new} as {actor}, kill after {delay:.3f}s")
        answered: list[int] = []

        def send() -> None:
            try:
                if new is None:
                    key = ADMIN if admin else KEYS[tenant]
                    query = f"?tenant={tenant}" if admin else ""
                    r = httpx.delete(f"{self.url}/admin/prefix-caches/{name}{query}", headers=_headers(key), timeout=60)
                else:
                    r = self._create(tenant, name, new, op == "replace", admin)
                answered.append(r.status_code)
            except httpx.HTTPError:
                pass

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(delay)
        proc.kill()
        proc.wait()
        sender.join()
        self.tally.rounds += 1
        self.tally.kills += 1
        if answered:
            self.tally.answered_before_kill += 1
            if answered[0] not in (200, 201):
                self._bad(f"round {number}: {op} answered {answered[0]} before the kill")
        else:
            self.tally.killed_before_answer += 1
        self.pending = (tenant, name, old, new, bool(answered))

    def verify(self, number: int) -> None:
        """Check the caches after a restart against the last round's operation (if any)."""
        pending = self.pending
        self._check_files(number)
        for tenant, key in KEYS.items():
            listing = httpx.get(f"{self.url}/admin/prefix-caches", headers=_headers(key), timeout=60).json()["data"]
            found = {c["id"]: c for c in listing if not c["id"].startswith("ref-")}
            for name in NAMES:
                cache = found.get(name)
                version = None if cache is None else self.sha_of.get(cache["tokens_sha256"], -1)
                expected = {self.state.get((tenant, name))}
                if pending is not None and pending[:2] == (tenant, name):
                    _, _, old, new, was_answered = pending
                    expected = {new} if was_answered else {old, new}
                    if version == old and old != new:
                        self.tally.found_old += 1
                    elif version == new:
                        self.tally.found_new += 1
                if version not in expected:
                    self._bad(f"round {number}: {tenant}/{name} holds version {version}, expected one of {expected}")
                    continue
                if version is None:
                    self.state.pop((tenant, name), None)
                    continue
                self.state[(tenant, name)] = version
                self._check_usable(number, tenant, name, version, cache or {})
        self.pending = None

    def _check_usable(self, number: int, tenant: str, name: str, version: int, cache: dict[str, Any]) -> None:
        where = f"round {number}: {tenant}/{name}"
        if cache.get("status") != "ready":
            self._bad(f"{where} is {cache.get('status')}: {cache.get('status_reason')}")
            return
        warm = httpx.post(f"{self.url}/admin/prefix-caches/{name}/warm", headers=_headers(KEYS[tenant]), timeout=60)
        if warm.status_code != 200:
            self._bad(f"{where}: warm answered {warm.status_code} {warm.text}")
            return
        r = self._answer(tenant, name)
        if r.status_code != 200:
            self._bad(f"{where}: a request through it answered {r.status_code} {r.text}")
            return
        body = r.json()
        cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
        if cached != cache["num_tokens"] or body["choices"][0]["text"] != self.answers[version]:
            self._bad(f"{where}: cached {cached} of {cache['num_tokens']}, answer {body['choices'][0]['text']!r}")

    def _check_files(self, number: int) -> None:
        for path in self.cache_dir.rglob("*"):
            # .locks/ holds the per-cache lock files replicas share (empty, kept by design).
            if path.is_dir() or path.relative_to(self.cache_dir).parts[0] == ".locks":
                continue
            ok = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.(json|safetensors)", path.name) is not None
            twin = path.with_suffix(".safetensors" if path.suffix == ".json" else ".json")
            if not ok or not twin.exists():
                self.tally.stray_files += 1
                self._bad(f"round {number}: stray file {path.relative_to(self.cache_dir)}")

    def _bad(self, problem: str) -> None:
        self.tally.bad_caches += 1
        self.tally.problems.append(problem)
        self.log("BAD " + problem)

    def run(self, rounds: int) -> Tally:
        self.log(f"seed {self.seed}, {rounds} rounds, cache directory {self.cache_dir}")
        self.bootstrap()
        for number in range(1, rounds + 1):
            self.round(number)
        with self._serve():  # the last round's kill is checked too
            self.verify(rounds + 1)
        return self.tally


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    model = args.model or "tiny"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mlx-gateway-faults-") as tmp:
        tally = Faults(Path(tmp), args.seed, model).run(args.rounds)
    seconds = time.perf_counter() - started
    row = {k: v for k, v in vars(tally).items() if k != "problems"} | {"seed": args.seed, "seconds": round(seconds)}
    print(row)
    for problem in tally.problems:
        print(problem)
    notes = "kill -9 during prefix-cache create/replace/delete; bad_caches counts every check that failed"
    write_result("faults", args.device, model, [row | {"problems": tally.problems}], notes, args.out)


if __name__ == "__main__":
    main()
