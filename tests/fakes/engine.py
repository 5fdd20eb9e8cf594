"""A stand-in for `pulumi up/preview/destroy` where no Pulumi CLI exists: the real program (infra/__main__.py) run
under Pulumi's own mocks with preview=False, its resources created for real in moto / tests/fakes/gce.py / the GCS
emulator by per-cloud translators (engine_aws.py, engine_gcp.py), and a state file recording what a stack records.

    stacks.ENGINE_FACTORY = lambda state_dir: MockEngine(state_dir, clouds={"aws": AwsCloud(endpoint)})

What it does as the engine does:
- a resource is created once and then kept while its inputs stay the same ("same": no cloud call); changed inputs
  update it in place, or replace it (create the new one, then delete the old) when a changed input is one the
  provider cannot update (`replace_keys` of the translator, after the providers' ForceNew properties);
- the state is written after every step, so a failed up keeps what it created, and the next up or destroy starts
  from there; after the first error no further resource is created (Pulumi stops scheduling new steps);
- resources the program no longer declares are deleted at the end of an up; `destroy` deletes in reverse creation
  order; `retain_on_delete` resources (the data bucket) leave the state without being deleted;
- provider default tags/labels are merged into every resource's, as the providers do;
- preview computes the same plan without calling the cloud; outputs of what would change are unknown, so a
  dependent's replacement shows as in a real preview.

Where it differs from a real `pulumi up`: no parallelism (one step at a time); no refresh within an up (drift is
not seen; `refresh()` on its own drops what the cloud no longer has, for translators that say: `exists()`);
diffs compare inputs only (a real provider also compares with the cloud's state); only the properties gpuforge's
program uses are translated; the GCS emulator has no IAM, so BucketIAMMember is recorded, not applied; autonames
are `<name>-<7 hex>` like Pulumi's.

Faults for tests: `crash_after=(type suffix, name)` creates that resource in the cloud and then raises
KeyboardInterrupt before the state records it (a controller killed mid-up); cloud faults come from the fakes
themselves (moto_ext.exhaust, FakeCompute.exhaust/set_quota, ...).
"""

from __future__ import annotations

import copy
import json
import logging
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pulumi
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc, settings

from infra.errors import StackError

try:
    from infra.stacks import Preview, Recorded
except ImportError:  # the code before the engine seam (run against it to see tests fail for what they test)
    @dataclass(frozen=True)
    class Recorded:  # type: ignore[no-redef]
        type: str
        name: str
        id: str
        outputs: dict = field(default_factory=dict)
        retain: bool = False

    @dataclass(frozen=True)
    class Preview:  # type: ignore[no-redef]
        counts: dict
        steps: list

UNKNOWN = rpc.UNKNOWN
# After a failed step the runtime's other pending registrations end with our ProviderError, which asyncio reports
# at garbage collection as "exception was never retrieved": expected here, so not logged.
logging.getLogger("asyncio").setLevel(logging.CRITICAL)
PROJECT = "gpuforge"


class ProviderError(Exception):
    """A cloud call failed; the message is what the provider would print."""


@dataclass
class Resource:
    urn: str
    type: str
    name: str
    id: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    retain: bool = False
    provider: str = ""


@dataclass
class StackState:
    config: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    resources: list[Resource] = field(default_factory=list)

    def find(self, urn: str) -> Resource | None:
        return next((r for r in self.resources if r.urn == urn), None)


class CloudTranslator:
    """What a per-cloud translator implements."""

    def create(self, res: Resource, provider: dict) -> tuple[str, dict]:
        raise NotImplementedError

    def update(self, old: Resource, new_inputs: dict, provider: dict) -> dict:
        return {**old.outputs, **new_inputs}

    def delete(self, res: Resource, provider: dict) -> None:
        raise NotImplementedError

    def invoke(self, token: str, args: dict, provider: dict) -> dict:
        raise NotImplementedError(token)

    def replace_keys(self, typ: str) -> tuple[str, ...]:
        return ()

    def planned_outputs(self, typ: str, name: str, inputs: dict) -> dict:
        return {}


def autoname(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)[:7]}"


def integral(value: Any) -> Any:
    """Pulumi's wire format carries every number as a double: 200.0 -> 200 where the value is whole."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral(v) for v in value]
    return value


def strip_unknowns(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_unknowns(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_unknowns(v) for v in value]
    return value


def changed_keys(old: dict, new: dict) -> list[str]:
    keys = set(old) | set(new)
    return sorted(k for k in keys if _norm(old.get(k)) != _norm(new.get(k)))


def _norm(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str)) if value is not None else None


class _Mocks(pulumi.runtime.Mocks):
    """Answers registrations and invokes for one program run (apply or plan)."""

    def __init__(self, engine: "MockEngine", state: StackState, plan: bool, log: Callable[[str], Any]):
        self.engine, self.state, self.plan, self.log = engine, state, plan, log
        self.seen: set[str] = set()
        self.steps: list[tuple[str, str, str]] = []
        self.failure: str = ""
        self.lock = threading.RLock()
        self.requests: dict[str, Any] = {}

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        with self.lock:
            return self._register(args)

    def _register(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        urn = f"{args.typ}::{args.name}"
        request = self.requests.pop(args.name + "\0" + args.typ, None)
        retain = bool(getattr(request, "retainOnDelete", False))
        self.seen.add(urn)
        inputs = integral(dict(args.inputs))
        if not args.custom and not args.typ.startswith("pulumi:providers:"):
            return "", {}  # a component
        old = self.state.find(urn)
        if args.typ.startswith("pulumi:providers:"):
            res = Resource(urn, args.typ, args.name, old.id if old else f"{args.name}-provider", inputs, inputs,
                           provider="")
            self._store(old, res)
            return res.id, inputs
        if self.failure:
            raise ProviderError(f"{args.name}: not created, an earlier step failed")
        cloud = self.engine.cloud_of(args.typ)
        provider = self._provider_inputs(args.provider)
        if old is not None:
            changes = changed_keys(old.inputs, inputs)
            if not changes:
                self.steps.append(("same", args.typ, args.name))
                old.retain = retain
                return old.id, old.outputs
            replace = [k for k in changes if k in cloud.replace_keys(args.typ) or _has_unknown(inputs.get(k))]
            op = "replace" if replace else "update"
            self.steps.append((op, args.typ, args.name))
            if self.plan:
                return old.id, {**cloud.planned_outputs(args.typ, args.name, inputs), **strip_unknowns(inputs)} \
                    if op == "update" else {}
            try:
                if op == "update":
                    old.outputs = cloud.update(old, inputs, provider)
                    old.inputs, old.retain = inputs, retain
                    self.engine.save_state()
                    return old.id, old.outputs
                new = self._create(cloud, args, urn, inputs, retain, provider)
                cloud.delete(old, provider)
            except ProviderError as exc:
                self.failure = str(exc)
                raise
            self.state.resources.remove(old)
            self.state.resources.append(new)
            self.engine.save_state()
            return new.id, new.outputs
        self.steps.append(("create", args.typ, args.name))
        if self.plan:
            return "", cloud.planned_outputs(args.typ, args.name, inputs)
        try:
            new = self._create(cloud, args, urn, inputs, retain, provider)
        except ProviderError as exc:
            self.failure = str(exc)
            raise
        self.state.resources.append(new)
        self.engine.save_state()
        return new.id, new.outputs

    def _create(self, cloud: CloudTranslator, args: Any, urn: str, inputs: dict, retain: bool,
                provider: dict) -> Resource:
        res = Resource(urn, args.typ, args.name, "", inputs, {}, retain, provider_name(args.provider))
        res.id, res.outputs = cloud.create(res, provider)
        holder = self.engine.controls or self.engine
        crash = holder.crash_after
        if crash and args.typ.endswith(crash[0]) and args.name == crash[1]:
            holder.crash_after = None
            self.failure = "interrupted"
            raise KeyboardInterrupt(f"controller killed after creating {args.name}, before the state recorded it")
        return res

    def _store(self, old: Resource | None, res: Resource) -> None:
        if old is not None:
            self.state.resources.remove(old)
        self.state.resources.append(res)

    def _provider_inputs(self, ref: str | None) -> dict:
        return self.engine.provider_inputs(provider_name(ref))

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict:
        with self.lock:
            cloud = self.engine.cloud_of(args.token)
            try:
                return cloud.invoke(args.token, integral(dict(args.args)), self._provider_inputs(args.provider))
            except ProviderError as exc:
                self.failure = str(exc)
                raise


def provider_name(ref: str | None) -> str:
    """A provider reference is `<urn>::<id>`; the urn ends with `::<name>`."""
    return ref.rsplit("::", 2)[-2] if ref and ref.count("::") >= 2 else ""


def _has_unknown(value: Any) -> bool:
    if value == UNKNOWN:
        return True
    if isinstance(value, dict):
        return any(_has_unknown(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_unknown(v) for v in value)
    return False


class _Monitor(pulumi_mocks.MockMonitor):
    """The mock monitor, handing the mocks the resource options they act on (retainOnDelete)."""

    def RegisterResource(self, request):  # noqa: N802 - the gRPC method name
        self.mocks.requests[request.name + "\0" + request.type] = request
        return super().RegisterResource(request)


class _LogHandler(logging.Handler):
    def __init__(self, out: Callable[[str], Any]):
        super().__init__()
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out(f"{record.levelname.lower()}: {record.getMessage()}\n")


class MockEngine:
    """infra.stacks.StackEngine over Pulumi's mocks and the local clouds (see the module docstring)."""

    def __init__(self, state_dir: Path, clouds: Mapping[str, CloudTranslator]):
        self.state_dir = Path(state_dir)
        self.clouds = dict(clouds)
        self.crash_after: tuple[str, str] | None = None
        self.controls: Any = None  # an object whose crash_after is shared by several engines (tests)
        self.runs: list[list[tuple[str, str, str]]] = []  # the steps of every up, for tests
        self._stack = ""
        self._state: StackState | None = None

    # -- state ---------------------------------------------------------------------------------
    def _path(self, stack: str) -> Path:
        return self.state_dir / "mock-stack" / f"{stack}.json"

    def _load(self, stack: str) -> StackState:
        path = self._path(stack)
        if not path.exists():
            return StackState()
        data = json.loads(path.read_text())
        return StackState(data["config"], data["outputs"], [Resource(**r) for r in data["resources"]])

    def save_state(self) -> None:
        assert self._state is not None
        path = self._path(self._stack)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"config": self._state.config, "outputs": self._state.outputs,
                "resources": [r.__dict__ for r in self._state.resources]}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(path)

    def cloud_of(self, token: str) -> CloudTranslator:
        cloud = token.split(":", 1)[0]
        if cloud not in self.clouds:
            raise ProviderError(f"no {cloud} cloud in this engine (token {token})")
        return self.clouds[cloud]

    # -- StackEngine -----------------------------------------------------------------------------
    def check(self) -> None:
        pass

    def exists(self, stack: str) -> bool:
        return self._path(stack).exists()

    def config(self, stack: str) -> dict[str, str]:
        if not self.exists(stack):
            raise StackError(f"no stack {stack!r}; `gpuforge up` creates it")
        return dict(self._load(stack).config)

    def outputs(self, stack: str) -> dict[str, Any]:
        if not self.exists(stack):
            raise StackError(f"no stack {stack!r}; `gpuforge up` creates it")
        return dict(self._load(stack).outputs)

    def recorded(self, stack: str) -> list[Recorded]:
        return [Recorded(r.type, r.name, r.id, r.outputs, r.retain) for r in self._load(stack).resources
                if not r.type.startswith("pulumi:providers:") and r.id]

    def up(self, stack: str, config: Mapping[str, str], on_output: Callable[[str], Any]) -> dict[str, Any]:
        self._stack, self._state = stack, self._load(stack)
        self._state.config = {**{k: v for k, v in self._state.config.items() if not k.startswith("gpuforge:")},
                              **config}
        self.save_state()
        mocks = _Mocks(self, self._state, plan=False, log=on_output)
        try:
            outputs = self._run(stack, mocks, on_output)
        except KeyboardInterrupt:
            self.runs.append(mocks.steps)
            raise
        except Exception as exc:  # noqa: BLE001 - the engine reports the provider's message
            self.runs.append(mocks.steps)
            self.save_state()
            raise StackError(f"pulumi up failed for stack {stack!r}: {mocks.failure or exc}") from None
        for res in reversed([r for r in self._state.resources if r.urn not in mocks.seen]):
            mocks.steps.append(("delete", res.type, res.name))
            self._delete(res)
        self._state.outputs = outputs
        self.save_state()
        self.runs.append(mocks.steps)
        return outputs

    def refresh(self, stack: str, on_output: Callable[[str], Any]) -> None:
        """As `pulumi refresh`: a resource its cloud no longer has (translator.exists() False) leaves the state."""
        self._stack, self._state = stack, self._load(stack)
        kept = []
        for res in self._state.resources:
            cloud = None if res.type.startswith("pulumi:providers:") or not res.id else self.cloud_of(res.type)
            exists = getattr(cloud, "exists", None)
            if exists is not None and not exists(res, self._provider_of(res)):
                on_output(f"refresh: {res.type} {res.name} ({res.id}) is gone\n")
                continue
            kept.append(res)
        self._state.resources = kept
        self.save_state()

    def preview(self, stack: str, config: Mapping[str, str], on_output: Callable[[str], Any]) -> Preview:
        self._stack, self._state = stack, copy.deepcopy(self._load(stack))
        self._state.config = {**{k: v for k, v in self._state.config.items() if not k.startswith("gpuforge:")},
                              **config}
        mocks = _Mocks(self, self._state, plan=True, log=on_output)
        try:
            self._run(stack, mocks, on_output, preview=True)
        except Exception as exc:  # noqa: BLE001
            raise StackError(f"pulumi preview failed for stack {stack!r}: {mocks.failure or exc}") from None
        finally:
            self._state = None
        steps = [s for s in mocks.steps if s[0] != "same"]
        steps += [("delete", r.type, r.name) for r in self._load(stack).resources
                  if r.urn not in mocks.seen and not r.type.startswith("pulumi:providers:")]
        counts: dict[str, int] = {}
        for op, _, _ in mocks.steps + [s for s in steps if s[0] == "delete"]:
            counts[op] = counts.get(op, 0) + 1
        return Preview(counts, steps)

    def destroy(self, stack: str, on_output: Callable[[str], Any]) -> None:
        if not self.exists(stack):
            raise StackError(f"no stack {stack!r}")
        self._stack, self._state = stack, self._load(stack)
        for res in reversed(list(self._state.resources)):
            self._delete(res)
            on_output(f"deleted {res.type} {res.name}\n" if not res.retain else f"retained {res.type} {res.name}\n")
        self._path(stack).unlink()

    def _delete(self, res: Resource) -> None:
        assert self._state is not None
        if not res.retain and not res.type.startswith("pulumi:providers:") and res.id:
            try:
                self.cloud_of(res.type).delete(res, self._provider_of(res))
            except ProviderError as exc:
                self.save_state()
                raise StackError(f"pulumi destroy failed: deleting {res.type} {res.name}: {exc}") from None
        self._state.resources.remove(res)
        self.save_state()

    def provider_inputs(self, name: str) -> dict:
        resources = self._state.resources if self._state else []
        providers = [r for r in resources if r.type.startswith("pulumi:providers:")]
        found = next((r for r in providers if r.name == name), providers[0] if providers else None)
        return found.inputs if found else {}

    def _provider_of(self, res: Resource) -> dict:
        return self.provider_inputs(res.provider)

    # -- running the program ---------------------------------------------------------------------
    def _run(self, stack: str, mocks: _Mocks, on_output: Callable[[str], Any], preview: bool = False) -> dict:
        from infra.__main__ import run

        log = logging.getLogger(f"gpuforge.mock-engine.{id(mocks)}")
        log.propagate = False
        log.addHandler(_LogHandler(on_output))
        settings.ROOT.set(None)
        pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=preview, logger=log,
                                 monitor=_Monitor(mocks))
        pulumi.runtime.set_all_config(dict(self._state.config if self._state else {}))
        outputs: dict[str, Any] = {}

        @pulumi.runtime.test
        def program() -> Any:
            return pulumi.Output.from_input(run()).apply(outputs.update)

        program()
        return json.loads(json.dumps(outputs, default=str))
