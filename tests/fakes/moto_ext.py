"""What moto 5.2.5 lacks and gpuforge depends on, added to moto's own server in this process, by AWS's rules.

`install()` patches moto's EC2 and Service Quotas responses (ThreadedMotoServer runs in this process, so every client
that talks to the server, whatever session it built, sees the same behaviour):

- Placement groups (moto answers NotImplemented, HTTP 500). CreatePlacementGroup, DescribePlacementGroups (GroupNames,
  GroupIds, filters `group-name`, `strategy`, `state`, `tag:KEY`, `tag-key`) and DeletePlacementGroup, with the
  errors of the EC2 API reference: `InvalidPlacementGroup.Duplicate` for a name in use, `InvalidPlacementGroup.Unknown`
  for one that does not exist, `InvalidPlacementGroup.InUse` while a live instance is in the group.
- Capacity: `exhaust(zone, instance_type)` makes RunInstances in that zone fail with `InsufficientInstanceCapacity`
  and AWS's message ("We currently do not have sufficient p4d.24xlarge capacity in the Availability Zone you
  requested (us-east-1a). ..."), creating nothing, as EC2 does.
- vCPU quotas: On-Demand instances count against a per-region vCPU quota per instance class (EC2 user guide,
  "On-Demand Instance quotas": P instances L-417A185B, G and VT instances L-DB2E81BA; Spot: L-7212CCBC, L-3819A6DF).
  RunInstances that would go past the quota fails with `VcpuLimitExceeded` and AWS's message.
- Elastic IPs: AllocateAddress past the "EC2-VPC Elastic IPs" quota (L-0263D0A3, default 5 per region) fails with
  `AddressLimitExceeded` ("The maximum number of addresses has been reached.").
- `fail_next(action, code, message)`: the next EC2 call of that action fails with that error (a fault for tests).
- Service Quotas GetServiceQuota for ServiceCode `ec2` (moto implements only `vpc`): the values above, set per
  region with `set_quota(region, code, value)`.

`reset()` clears this state (call it next to moto's own `/moto-api/reset`).
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from typing import Any

REGION_DEFAULT_QUOTAS = {  # (code -> (name, value)) a fresh-looking account: enough for a few GPU nodes
    "L-417A185B": ("Running On-Demand P instances", 384.0),
    "L-DB2E81BA": ("Running On-Demand G and VT instances", 192.0),
    "L-7212CCBC": ("All P Spot Instance Requests", 384.0),
    "L-3819A6DF": ("All G and VT Spot Instance Requests", 192.0),
    "L-0263D0A3": ("EC2-VPC Elastic IPs", 5.0),
}
CLASS_QUOTAS = {("p", False): "L-417A185B", ("g", False): "L-DB2E81BA", ("p", True): "L-7212CCBC",
                ("g", True): "L-3819A6DF"}
EIP_QUOTA = "L-0263D0A3"
LIVE = ("pending", "running", "stopping", "stopped", "shutting-down")


@dataclass
class Extras:
    groups: dict[tuple[str, str, str], dict] = field(default_factory=dict)  # (account, region, name) -> group
    group_of_instance: dict[str, str] = field(default_factory=dict)  # instance id -> placement group name
    exhausted: set[tuple[str, str]] = field(default_factory=set)  # (zone, instance type or "*")
    quotas: dict[tuple[str, str], float] = field(default_factory=dict)  # (region, quota code) -> value
    faults: dict[str, tuple[str, str]] = field(default_factory=dict)  # EC2 action -> (code, message), once
    ids: Any = field(default_factory=lambda: itertools.count(1))
    lock: threading.RLock = field(default_factory=threading.RLock)


STATE = Extras()
_installed = False


def reset() -> None:
    with STATE.lock:
        STATE.groups.clear()
        STATE.group_of_instance.clear()
        STATE.exhausted.clear()
        STATE.quotas.clear()
        STATE.faults.clear()


def exhaust(zone: str, instance_type: str = "*") -> None:
    """From now on, RunInstances of `instance_type` (any, with "*") in `zone` fails for want of capacity."""
    STATE.exhausted.add((zone, instance_type))


def fail_next(action: str, code: str, message: str) -> None:
    """The next EC2 `action` (e.g. "CreateSecurityGroup") fails with this error code and message."""
    import re

    from moto.ec2.responses import EC2Response

    name = re.sub(r"(?<!^)(?=[A-Z])", "_", action).lower()
    original = getattr(EC2Response, name)
    if not getattr(original, "_gpuforge_fault", False):
        def wrapped(self, _original=original, _action=action):  # type: ignore[no-untyped-def]
            fault = STATE.faults.pop(_action, None)
            if fault is not None:
                raise _error(*fault)
            return _original(self)

        wrapped._gpuforge_fault = True  # type: ignore[attr-defined]
        setattr(EC2Response, name, wrapped)
    STATE.faults[action] = (code, message)


def set_quota(region: str, code: str, value: float) -> None:
    STATE.quotas[(region, code)] = float(value)


def quota_value(region: str, code: str) -> float:
    return STATE.quotas.get((region, code), REGION_DEFAULT_QUOTAS[code][1])


def install() -> None:
    """Patch moto's responses once per process (idempotent)."""
    global _installed
    if _installed:
        return
    from moto.ec2.responses import EC2Response
    from moto.servicequotas.responses import ServiceQuotasResponse

    EC2Response.create_placement_group = _create_placement_group
    EC2Response.describe_placement_groups = _describe_placement_groups
    EC2Response.delete_placement_group = _delete_placement_group
    original_run = EC2Response.run_instances
    original_allocate = EC2Response.allocate_address
    original_quota = ServiceQuotasResponse.get_service_quota

    def run_instances(self):  # type: ignore[no-untyped-def]
        zone, instance_type, group, spot = _launch_facts(self)
        count = int(self._get_param("MinCount", if_none="1"))
        with STATE.lock:
            _check_capacity(zone, instance_type)
            _check_vcpus(self, instance_type, count, spot)
            if group and (self.current_account, self.region, group) not in STATE.groups:
                raise _error("InvalidPlacementGroup.Unknown", f"The Placement Group '{group}' is unknown.")
            result = original_run(self)
            for instance in result.result.instances:
                if group:
                    STATE.group_of_instance[instance.id] = group
        return result

    def allocate_address(self):  # type: ignore[no-untyped-def]
        with STATE.lock:
            used = len(self.ec2_backend.describe_addresses())
            if used + 1 > quota_value(self.region, EIP_QUOTA):
                raise _error("AddressLimitExceeded", "The maximum number of addresses has been reached.")
            return original_allocate(self)

    def get_service_quota(self):  # type: ignore[no-untyped-def]
        params = json.loads(self.body)
        if params.get("ServiceCode") != "ec2":
            return original_quota(self)
        code = params.get("QuotaCode")
        if code not in REGION_DEFAULT_QUOTAS:
            from moto.servicequotas.exceptions import NoSuchResource

            raise NoSuchResource
        name = REGION_DEFAULT_QUOTAS[code][0]
        return json.dumps({"Quota": {"ServiceCode": "ec2", "ServiceName": "Amazon Elastic Compute Cloud (Amazon EC2)",
                                     "QuotaCode": code, "QuotaName": name, "Value": quota_value(self.region, code),
                                     "Unit": "None", "Adjustable": True, "GlobalQuota": False}})

    original_start, original_stop = EC2Response.start_instances, EC2Response.stop_instances

    def start_instances(self):  # type: ignore[no-untyped-def]
        _check_power_states(self, "start")
        return original_start(self)

    def stop_instances(self):  # type: ignore[no-untyped-def]
        _check_power_states(self, "stop")
        return original_stop(self)

    EC2Response.run_instances = run_instances
    EC2Response.allocate_address = allocate_address
    EC2Response.start_instances = start_instances
    EC2Response.stop_instances = stop_instances
    ServiceQuotasResponse.get_service_quota = get_service_quota
    _installed = True


def _check_power_states(response: Any, verb: str) -> None:
    """EC2's rules for StartInstances / StopInstances (moto applies neither): a terminated instance can be neither
    started nor stopped (IncorrectInstanceState), nor can a one-time spot instance be stopped (UnsupportedOperation;
    EC2 user guide, "Stop a Spot Instance": only persistent requests' instances stop)."""
    for instance in response.ec2_backend.get_multi_instances_by_id(response._get_param("InstanceIds", [])):
        state = instance._state.name
        if state in ("terminated", "shutting-down"):
            raise _error("IncorrectInstanceState", f"The instance '{instance.id}' is not in a state from which it "
                                                   f"can be {'started' if verb == 'start' else 'stopped'}.")
        if verb == "stop" and instance.lifecycle == "spot":
            raise _error("UnsupportedOperation", f"The instance '{instance.id}' is a one-time Spot Instance and "
                                                 "cannot be stopped.")


def guest_shutdown(ec2: Any, instance_id: str) -> str:
    """The instance's OS powers itself off (autostop's `systemctl poweroff`): EC2 applies the instance's
    InstanceInitiatedShutdownBehavior, stop or terminate. Returns the state it ends in."""
    behaviour = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior")[
        "InstanceInitiatedShutdownBehavior"]["Value"]
    if behaviour == "terminate":
        ec2.terminate_instances(InstanceIds=[instance_id])
        return "terminated"
    ec2.stop_instances(InstanceIds=[instance_id])  # the same end state as EC2's stop on a guest shutdown
    return "stopped"


def _error(code: str, message: str) -> Exception:
    from moto.ec2.exceptions import EC2ClientError

    return EC2ClientError(code, message)


# -- RunInstances rules -------------------------------------------------------------------------------

def _launch_facts(response: Any) -> tuple[str, str, str, bool]:
    """(zone, instance type, placement group, spot) of a RunInstances request, through its launch template."""
    backend = response.ec2_backend
    data: dict = {}
    template = response._get_param("LaunchTemplate", {}) or {}
    template_id = template.get("LaunchTemplateId")
    if not template_id and template.get("LaunchTemplateName"):
        found = backend.describe_launch_templates(template_names=[template["LaunchTemplateName"]])
        template_id = found[0].id if found else None
    if template_id:
        data = backend.get_launch_template(template_id).get_version(template.get("Version", "$Default")).data
    instance_type = response._get_param("InstanceType") or data.get("InstanceType") or "m1.small"
    placement = {**(data.get("Placement") or {}), **(response._get_param("Placement", {}) or {})}
    zone = placement.get("AvailabilityZone", "")
    subnet_id = response._get_param("SubnetId")
    nics = response._get_param("NetworkInterfaces", []) or data.get("NetworkInterfaces", []) or []
    if not subnet_id:
        subnet_id = next((n.get("SubnetId") for n in nics if n.get("SubnetId")), None)
    if subnet_id and not zone:
        zone = backend.get_subnet(subnet_id).availability_zone
    market = response._get_param("InstanceMarketOptions", {}) or data.get("InstanceMarketOptions") or {}
    return zone or f"{response.region}a", instance_type, placement.get("GroupName", ""), \
        market.get("MarketType") == "spot"


def _check_capacity(zone: str, instance_type: str) -> None:
    if (zone, instance_type) in STATE.exhausted or (zone, "*") in STATE.exhausted:
        others = ""
        raise _error(
            "InsufficientInstanceCapacity",
            f"We currently do not have sufficient {instance_type} capacity in the Availability Zone you requested "
            f"({zone}). Our system will be working on provisioning additional capacity. You can currently get "
            f"{instance_type} capacity by not specifying an Availability Zone in your request{others}.",
        )


def _vcpus(instance_type: str) -> int:
    from moto.ec2.models.instance_types import INSTANCE_TYPES

    return int(INSTANCE_TYPES.get(instance_type, {}).get("VCpuInfo", {}).get("DefaultVCpus", 1))


def _check_vcpus(response: Any, instance_type: str, count: int, spot: bool) -> None:
    family = instance_type[:1]
    code = CLASS_QUOTAS.get((family, spot))
    if code is None:
        return
    used = 0
    for reservation in response.ec2_backend.describe_instances():
        for instance in reservation.instances:
            if instance.state in LIVE and instance.instance_type.startswith(family) and \
                    bool(getattr(instance, "lifecycle", None) == "spot") == spot:
                used += _vcpus(instance.instance_type)
    limit = quota_value(response.region, code)
    if used + count * _vcpus(instance_type) > limit:
        raise _error(
            "VcpuLimitExceeded",
            f"You have requested more vCPU capacity than your current vCPU limit of {limit:.0f} allows for the "
            "instance bucket that the specified instance type belongs to. Please visit "
            "http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit.",
        )


# -- placement groups -----------------------------------------------------------------------------------

def _group_tags(response: Any) -> list[dict]:
    specs = response._get_param("TagSpecifications", []) or []
    return [tag for spec in specs if spec.get("ResourceType") == "placement-group" for tag in spec.get("Tags", [])]


def _create_placement_group(self):  # type: ignore[no-untyped-def]
    from moto.core.responses import ActionResult

    name = self._get_param("GroupName")
    strategy = self._get_param("Strategy")
    if strategy not in ("cluster", "spread", "partition"):
        raise _error("InvalidParameterValue", f"Value ({strategy}) for parameter strategy is invalid.")
    key = (self.current_account, self.region, name)
    with STATE.lock:
        if key in STATE.groups:
            raise _error("InvalidPlacementGroup.Duplicate", f"The placement group '{name}' already exists.")
        group_id = f"pg-{next(STATE.ids):017x}"
        group = {"GroupName": name, "State": "available", "Strategy": strategy, "GroupId": group_id,
                 "GroupArn": f"arn:aws:ec2:{self.region}:{self.current_account}:placement-group/{name}",
                 "Tags": _group_tags(self)}
        STATE.groups[key] = group
    return ActionResult({"PlacementGroup": dict(group)})


def _filter_group(group: dict, flt: dict) -> bool:
    name, values = flt["Name"], flt.get("Values", [])
    tags = {t["Key"]: t["Value"] for t in group.get("Tags", [])}
    if name.startswith("tag:"):
        return tags.get(name[4:]) in values
    if name == "tag-key":
        return any(v in tags for v in values)
    field_name = {"group-name": "GroupName", "strategy": "Strategy", "state": "State", "group-arn": "GroupArn"}.get(name)
    if field_name is None:
        raise _error("InvalidParameterValue", f"The filter '{name}' is invalid")
    return group.get(field_name) in values


def _describe_placement_groups(self):  # type: ignore[no-untyped-def]
    from moto.core.responses import ActionResult

    names = self._get_param("GroupNames", []) or []
    ids = self._get_param("GroupIds", []) or []
    filters = self._get_param("Filters", []) or []
    with STATE.lock:
        groups = [g for (account, region, _), g in STATE.groups.items()
                  if (account, region) == (self.current_account, self.region)]
    for name in names:
        if name not in {g["GroupName"] for g in groups}:
            raise _error("InvalidPlacementGroup.Unknown", f"The Placement Group '{name}' is unknown.")
    if names:
        groups = [g for g in groups if g["GroupName"] in names]
    if ids:
        groups = [g for g in groups if g["GroupId"] in ids]
    groups = [g for g in groups if all(_filter_group(g, f) for f in filters)]
    return ActionResult({"PlacementGroups": [dict(g) for g in groups]})


def _delete_placement_group(self):  # type: ignore[no-untyped-def]
    from moto.core.responses import EmptyResult

    name = self._get_param("GroupName")
    key = (self.current_account, self.region, name)
    with STATE.lock:
        if key not in STATE.groups:
            raise _error("InvalidPlacementGroup.Unknown", f"The Placement Group '{name}' is unknown.")
        live = {i.id for r in self.ec2_backend.describe_instances() for i in r.instances if i.state in LIVE}
        if any(STATE.group_of_instance.get(i) == name for i in live):
            raise _error("InvalidPlacementGroup.InUse", f"The placement group '{name}' is in use and may not be deleted.")
        del STATE.groups[key]
    return EmptyResult()
