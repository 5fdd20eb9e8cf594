"""What the lifecycle suites share: the `gpuforge` program run in this process (the real tasks, argv parsing
included), with infra.stacks' engine seam pointed at tests/fakes/engine.py's stand-in for `pulumi up`."""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


class Engines:
    """The engine factory the tests install: one stand-in engine per state dir call, sharing the clouds; a test
    can arm a crash (`crash_after`) for the next up."""

    def __init__(self, clouds: dict[str, Any]):
        from tests.fakes.engine import MockEngine

        self.clouds = clouds
        self.crash_after: tuple[str, str] | None = None
        self.made: list[MockEngine] = []
        self._cls = MockEngine

    def __call__(self, state_dir: Path) -> Any:
        engine = self._cls(state_dir, self.clouds)
        engine.controls = self
        self.made.append(engine)
        return engine

    def last_steps(self) -> list[tuple[str, str, str]]:
        """The steps of the latest up any engine ran."""
        runs = [run for engine in self.made for run in engine.runs]
        return runs[-1] if runs else []

    def all_steps(self) -> list[tuple[str, str, str]]:
        return [step for engine in self.made for run in engine.runs for step in run]


def install_engines(monkeypatch: pytest.MonkeyPatch, clouds: dict[str, Any]) -> Engines:
    from infra import stacks

    engines = Engines(clouds)
    if hasattr(stacks, "ENGINE_FACTORY"):
        monkeypatch.setattr(stacks, "ENGINE_FACTORY", engines)
    else:  # the code before the engine seam (commit bfe58fe): drive it through its Automation API calls instead
        monkeypatch.setattr(stacks, "require_pulumi_cli", lambda: "/usr/bin/pulumi")
        monkeypatch.setattr(stacks, "_stack", lambda name, state_dir, create: _OldStack(engines(state_dir), name,
                                                                                        create))
    return engines


class _OldStack:
    """The few Automation API Stack methods the pre-seam infra/stacks.py called, over the stand-in engine, so the
    same lifecycle tests can run (and fail for what they test) against the old code."""

    def __init__(self, engine: Any, name: str, create: bool):
        from infra.errors import StackError

        if not create and not engine.exists(name):
            raise StackError(f"no stack {name!r}; `gpuforge up` creates it")
        self.engine, self.name = engine, name
        self.wanted: dict[str, str] = engine.config(name) if engine.exists(name) else {}

    def get_all_config(self) -> dict:
        from pulumi.automation import ConfigValue

        return {k: ConfigValue(value=v) for k, v in self.wanted.items()}

    def remove_all_config(self, keys: list[str]) -> None:
        for key in keys:
            self.wanted.pop(key, None)

    def set_all_config(self, config: dict) -> None:
        self.wanted.update({k: getattr(v, "value", v) for k, v in config.items()})

    def up(self, on_output: Any = print) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(outputs=self.engine.up(self.name, self.wanted, on_output))

    def destroy(self, on_output: Any = print, remove: bool = True) -> None:
        self.engine.destroy(self.name, on_output)

    def outputs(self) -> dict:
        return self.engine.outputs(self.name)


def gpuforge(capsys: pytest.CaptureFixture, *argv: str, stdin: str = "") -> Result:
    """Run `gpuforge ARGV` in this process; returns its exit code and what it printed."""
    from provision.cli import argv as cli_argv
    from provision.cli.main import program

    capsys.readouterr()
    cli_argv.REMAINDER.clear()
    cli_argv.OVERRIDES.clear()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    code = 0
    try:
        program().run(["gpuforge", *argv], exit=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    finally:
        sys.stdin = old_stdin
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def one_line_error(result: Result) -> str:
    lines = [line for line in result.err.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.err, result.err
    return "\n".join(lines)


Check = Callable[[], None]
