"""The messages between front ends and the engine process (adapters/wire.py): every command and event comes back
equal from its encoding, and an engine error comes back as its own class, so the front end answers with the
same status as an engine in its own process would (404 for an unknown cache, 400 for bad KV settings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from adapters import base, wire
from adapters.base import (
    ChoiceFinished,
    EngineNotReady,
    Failed,
    Finished,
    OutputConstraint,
    Plan,
    PrefixBuild,
    PrefixBuildRefused,
    PrefixUse,
    SamplingParams,
    Started,
    StorageFull,
    TokenEvent,
    TokenLogprob,
    ToolCalling,
    ToolCallOut,
    TopLogprob,
    UnknownModel,
)
from prefix_caches.errors import InvalidKVSettings, PrefixCacheNotFound, PrefixCacheQuotaExceeded

ROOT = Path(__file__).resolve().parents[2]

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
PLAN = Plan(
    "req_1",
    "tiny",
    "alpha",
    (1, 2, 3),
    SamplingParams(
        max_tokens=5,
        stop=("\n",),
        seed=7,
        n=2,
        logit_bias=((3, -100.0),),
        constraint=OutputConstraint("json_schema", '{"type": "object"}'),
    ),
    PrefixUse("alpha", "sys", 2),
    ToolCalling((TOOL,), "auto", ("f",)),
)


@pytest.mark.parametrize(
    "command",
    [
        wire.Hello(0, "ipc:///tmp/x/front-0"),
        wire.Bye(2),
        wire.Built(1),
        wire.Submit(0, 1, PLAN),
        wire.Build(
            1,
            2,
            PrefixBuild(
                "r",
                "tiny",
                "alpha",
                "sys",
                (1, 2),
                "messages",
                None,
                ({"role": "system", "content": [{"type": "text", "text": "x"}]},),
            ),
        ),
        wire.Abort(0, 1),
        wire.Verify(0, 3, "alpha", "sys"),
        wire.Warm(0, 4, "alpha", "sys"),
        wire.RecordMiss("tiny", "alpha"),
        wire.Forget("alpha", "sys"),
        wire.ReportWanted(2),
    ],
)
def test_every_command_comes_back_equal(command: wire.Command) -> None:
    assert wire.decode_command(wire.encode(command)) == command


def test_a_batch_of_events_comes_back_equal() -> None:
    logprob = TokenLogprob("a", 5, -0.5, (97,), (TopLogprob("a", -0.5, (97,)),))
    events: list[tuple[int, wire.Event]] = [
        (1, Started(12, True, True, 0.5)),
        (1, TokenEvent(0, "a", (5,), (logprob,), (ToolCallOut("call_1", "f", "{}"),))),
        (1, ChoiceFinished(0, "tool_calls", "")),
        (1, Finished(3, 1, 2, 1.0, 2.0, 3.0)),
        (2, base.BuildProgress(1, 2)),
    ]
    batch = wire.Batch(events=events)
    assert wire.decode_message(wire.encode(batch)) == batch


@pytest.mark.parametrize(
    "error",
    [
        UnknownModel("nope"),
        EngineNotReady("loading"),
        StorageFull("disk full"),
        InvalidKVSettings("kv_group_size 64 must divide the model's head dimension (32)"),
        PrefixCacheNotFound("sys"),
        PrefixBuildRefused(PrefixCacheQuotaExceeded("prefix_cache_count_quota", "over")),
    ],
)
def test_an_engine_error_comes_back_as_its_own_class(error: Exception) -> None:
    back = wire.decode_message(wire.encode(wire.Batch(events=[(1, Failed(error))]))).events[0][1]
    assert isinstance(back, Failed)
    assert type(back.error) is type(error) and str(back.error) == str(error)
    if isinstance(error, PrefixBuildRefused):
        assert isinstance(back.error, PrefixBuildRefused)
        assert (
            type(back.error.refusal) is PrefixCacheQuotaExceeded
            and back.error.refusal.quota == "prefix_cache_count_quota"
        )


def test_an_unexpected_error_keeps_its_text() -> None:
    back = wire.decode_message(wire.encode(wire.Batch(events=[(1, Failed(ZeroDivisionError("x")))]))).events[0][1]
    assert (
        isinstance(back, Failed) and type(back.error) is base.EngineError and "ZeroDivisionError: x" in str(back.error)
    )


def test_the_front_end_modules_import_no_mlx() -> None:
    code = (
        "import sys, gateway.cli.main, gateway.app, gateway.processes.server, adapters.remote, adapters.wire,"
        " adapters.tokenizer,"
        " gateway.processes.api_servers, gateway.processes.front_process, gateway.tenancy.coordinator;"
        "bad = sorted(m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_lm')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
