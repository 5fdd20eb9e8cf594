"""The GCP half of tests/fakes/engine.py: each pulumi-gcp resource type of infra/gcp.py, created and deleted with
the real google-cloud-compute client against tests/fakes/gce.py (Compute and IAM), buckets with
google-cloud-storage against the GCS emulator, as the provider would.

Mirrored from the provider: autonames (`<name>-<7 hex>`) for unnamed resources, default labels merged into every
labelled resource's labels, operations waited on (through clients on the same endpoint), and errors phrased as the
provider prints them ("Error waiting for instance to create: <the operation's message>", as recorded in
hashicorp/terraform-provider-google#20573). BucketIAMMember is recorded but not applied (the emulator has no IAM).
InstanceIAMMember is applied as the provider does it: a read-modify-write of the instance's IAM policy
(instances.getIamPolicy, add the member to the role's binding, setIamPolicy with the etag), and removed the same way.
An instance whose service account or scopes change is stopped, changed (setServiceAccount) and started again, as the
provider does with allow_stopping_for_update.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.fakes.engine import CloudTranslator, ProviderError, Resource, autoname

REPLACE_KEYS = {
    "gcp:compute/network:Network": ("name", "autoCreateSubnetworks"),
    "gcp:compute/subnetwork:Subnetwork": ("network", "region", "name"),
    "gcp:compute/firewall:Firewall": ("network", "name", "direction"),
    "gcp:compute/resourcePolicy:ResourcePolicy": ("groupPlacementPolicy", "region", "description", "name"),
    "gcp:serviceaccount/account:Account": ("accountId",),
    "gcp:storage/bucket:Bucket": ("location", "name"),
    "gcp:storage/bucketIAMMember:BucketIAMMember": ("bucket", "role", "member"),
    "gcp:compute/instanceIAMMember:InstanceIAMMember": ("instanceName", "zone", "project", "role", "member"),
    "gcp:compute/instance:Instance": ("name", "zone", "bootDisk", "guestAccelerators", "networkInterfaces",
                                      "scheduling"),
}
OP_TIMEOUT_S = 30.0


class GcpCloud(CloudTranslator):
    def __init__(self, gce: Any, gcs_host: str):
        from google.cloud import compute_v1

        self.gce, self.gcs_host, self.compute = gce, gcs_host, compute_v1
        self.kw = gce.client_kwargs()

    def replace_keys(self, typ: str) -> tuple[str, ...]:
        return REPLACE_KEYS.get(typ, ())

    def labels(self, res: Resource, p: dict, own: dict | None = None) -> dict[str, str]:
        default = p.get("defaultLabels") or {}
        if isinstance(default, str):
            default = json.loads(default)
        return {**default, **(own if own is not None else (res.inputs.get("labels") or {}))}

    def project(self, res: Resource, p: dict) -> str:
        return res.inputs.get("project") or p.get("project") or self.gce.project

    def wait(self, op: Any, project: str, what: str, zone: str = "", region: str = "") -> None:
        c = self.compute
        client = (c.ZoneOperationsClient if zone else c.RegionOperationsClient if region else c.GlobalOperationsClient)(
            **self.kw)
        where = {"zone": zone} if zone else {"region": region} if region else {}
        deadline = time.monotonic() + OP_TIMEOUT_S
        while op.status != c.Operation.Status.DONE and time.monotonic() < deadline:
            op = client.wait(project=project, operation=op.name, **where)
        if op.error.errors:
            raise ProviderError(f"Error waiting for {what}: " + "; ".join(e.message for e in op.error.errors))

    def _call(self, what: str, fn: Any, **params: Any) -> Any:
        from google.api_core.exceptions import GoogleAPICallError

        try:
            return fn(**params)
        except GoogleAPICallError as exc:
            raise ProviderError(f"Error {what}: googleapi: Error {exc.code}: {exc.message}") from None

    def gcs(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project=self.gce.project, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.gcs_host})

    # -- create ------------------------------------------------------------------------------------
    def create(self, res: Resource, provider: dict) -> tuple[str, dict]:
        method = getattr(self, "create_" + res.type.rsplit(":", 1)[-1].lower(), None)
        if method is None:
            raise ProviderError(f"the GCP stand-in cannot create {res.type}")
        return method(res, provider)

    def _link(self, project: str, path: str) -> str:
        return f"https://www.googleapis.com/compute/v1/projects/{project}/{path}"

    def create_network(self, res: Resource, p: dict) -> tuple[str, dict]:
        c, project, name = self.compute, self.project(res, p), res.inputs.get("name") or autoname(res.name)
        body = c.Network(name=name, auto_create_subnetworks=res.inputs.get("autoCreateSubnetworks", True),
                         description=res.inputs.get("description", ""))
        op = self._call("creating Network", c.NetworksClient(**self.kw).insert, project=project, network_resource=body)
        self.wait(op, project, "network to create")
        path = f"projects/{project}/global/networks/{name}"
        return path, {**res.inputs, "name": name, "selfLink": self._link(project, f"global/networks/{name}")}

    def create_subnetwork(self, res: Resource, p: dict) -> tuple[str, dict]:
        c, project, name = self.compute, self.project(res, p), res.inputs.get("name") or autoname(res.name)
        region = res.inputs.get("region") or p.get("region")
        body = c.Subnetwork(name=name, network=res.inputs["network"], ip_cidr_range=res.inputs["ipCidrRange"],
                            private_ip_google_access=res.inputs.get("privateIpGoogleAccess", False),
                            description=res.inputs.get("description", ""))
        op = self._call("creating Subnetwork", c.SubnetworksClient(**self.kw).insert, project=project, region=region,
                        subnetwork_resource=body)
        self.wait(op, project, "subnetwork to create", region=region)
        return f"projects/{project}/regions/{region}/subnetworks/{name}", {
            **res.inputs, "name": name, "selfLink": self._link(project, f"regions/{region}/subnetworks/{name}")}

    def create_firewall(self, res: Resource, p: dict) -> tuple[str, dict]:
        c, project, name = self.compute, self.project(res, p), res.inputs.get("name") or autoname(res.name)
        i = res.inputs
        body = c.Firewall(name=name, network=i["network"], direction=i.get("direction", "INGRESS"),
                          allowed=[c.Allowed(I_p_protocol=a["protocol"], ports=a.get("ports", []))
                                   for a in i.get("allows", [])],
                          source_ranges=i.get("sourceRanges", []), source_tags=i.get("sourceTags", []),
                          target_tags=i.get("targetTags", []), description=i.get("description", ""))
        op = self._call("creating Firewall", c.FirewallsClient(**self.kw).insert, project=project,
                        firewall_resource=body)
        self.wait(op, project, "firewall to create")
        return f"projects/{project}/global/firewalls/{name}", {
            **i, "name": name, "selfLink": self._link(project, f"global/firewalls/{name}")}

    def create_resourcepolicy(self, res: Resource, p: dict) -> tuple[str, dict]:
        c, project, name = self.compute, self.project(res, p), res.inputs.get("name") or autoname(res.name)
        region = res.inputs.get("region") or p.get("region")
        body = c.ResourcePolicy(name=name, description=res.inputs.get("description", ""),
                                group_placement_policy=c.ResourcePolicyGroupPlacementPolicy(
                                    collocation=res.inputs["groupPlacementPolicy"]["collocation"]))
        op = self._call("creating ResourcePolicy", c.ResourcePoliciesClient(**self.kw).insert, project=project,
                        region=region, resource_policy_resource=body)
        self.wait(op, project, "resource policy to create", region=region)
        link = self._link(project, f"regions/{region}/resourcePolicies/{name}")
        return f"projects/{project}/regions/{region}/resourcePolicies/{name}", {**res.inputs, "name": name,
                                                                               "selfLink": link}

    def create_account(self, res: Resource, p: dict) -> tuple[str, dict]:
        import requests

        project = self.project(res, p)
        body = {"accountId": res.inputs["accountId"], "serviceAccount": {
            "displayName": res.inputs.get("displayName", ""), "description": res.inputs.get("description", "")}}
        reply = requests.post(f"{self.gce.endpoint}/v1/projects/{project}/serviceAccounts", json=body, timeout=30)
        if reply.status_code >= 400:
            error = reply.json()["error"]
            raise ProviderError(f"Error creating service account: googleapi: Error {error['code']}: {error['message']}, "
                                f"{error['status'].lower()}")
        account = reply.json()
        return account["name"], {**res.inputs, "email": account["email"], "name": account["name"],
                                 "uniqueId": account["uniqueId"]}

    def create_bucket(self, res: Resource, p: dict) -> tuple[str, dict]:
        from google.api_core.exceptions import GoogleAPICallError

        name = res.inputs.get("name") or autoname(res.name)
        gcs = self.gcs()
        try:
            bucket = gcs.bucket(name)
            bucket.versioning_enabled = bool((res.inputs.get("versioning") or {}).get("enabled"))
            bucket = gcs.create_bucket(bucket, location=res.inputs.get("location"))
            bucket.labels = self.labels(res, p)
            bucket.patch()  # the emulator drops labels given at creation
        except GoogleAPICallError as exc:
            raise ProviderError(f"Error creating bucket {name}: googleapi: Error {exc.code}: {exc.message}") from None
        return name, {**res.inputs, "name": name, "url": f"gs://{name}", "selfLink": name}

    def create_bucketiammember(self, res: Resource, p: dict) -> tuple[str, dict]:
        i = res.inputs
        return f"b/{i['bucket']}/{i['role']}/{i['member']}", dict(i)  # recorded only: the emulator has no IAM

    def create_instanceiammember(self, res: Resource, p: dict) -> tuple[str, dict]:
        i, project = res.inputs, self.project(res, p)
        zone = i.get("zone") or p.get("zone")
        self._call("applying IAM policy for compute instance", self._edit_policy, project=project, zone=zone,
                   instance=i["instanceName"], role=i["role"], member=i["member"], add=True)
        path = f"projects/{project}/zones/{zone}/instances/{i['instanceName']}"
        return f"{path} {i['role']} {i['member']}", {**i, "project": project, "zone": zone}

    def _edit_policy(self, project: str, zone: str, instance: str, role: str, member: str, add: bool) -> None:
        c = self.compute
        client = c.InstancesClient(**self.kw)
        where = {"project": project, "zone": zone, "resource": instance}
        policy = client.get_iam_policy(**where)
        bindings = {b.role: list(b.members) for b in policy.bindings}
        members = bindings.setdefault(role, [])
        if add and member not in members:
            members.append(member)
        if not add:
            bindings[role] = [m for m in members if m != member]
        request = c.ZoneSetPolicyRequest(policy=c.Policy(
            etag=policy.etag, bindings=[c.Binding(role=r, members=m) for r, m in bindings.items() if m]))
        client.set_iam_policy(zone_set_policy_request_resource=request, **where)

    def update(self, old: Resource, new_inputs: dict, provider: dict) -> dict:
        if old.type == "gcp:compute/instance:Instance" and new_inputs.get("serviceAccount") != old.inputs.get(
                "serviceAccount"):
            self._set_service_account(old, new_inputs["serviceAccount"])
            _, project, _, zone, _, name = old.id.split("/")
            live = self.compute.InstancesClient(**self.kw).get(project=project, zone=zone, instance=name)
            return self._instance_outputs(new_inputs, live)
        return {**old.outputs, **new_inputs}

    def _set_service_account(self, old: Resource, account: dict) -> None:
        """Stop, setServiceAccount, start: GCE changes a VM's account and scopes only while it is stopped."""
        c = self.compute
        _, project, _, zone, _, name = old.id.split("/")
        instances = c.InstancesClient(**self.kw)
        running = instances.get(project=project, zone=zone, instance=name).status == "RUNNING"
        where = {"project": project, "zone": zone, "instance": name}
        if running:
            self.wait(self._call("stopping instance", instances.stop, **where), project, "instance to stop", zone=zone)
        body = c.InstancesSetServiceAccountRequest(email=account["email"], scopes=account.get("scopes", []))
        self.wait(self._call("setting service account", instances.set_service_account,
                             instances_set_service_account_request_resource=body, **where), project,
                  "service account to change", zone=zone)
        if running:
            self.wait(self._call("starting instance", instances.start, **where), project, "instance to start", zone=zone)

    def exists(self, res: Resource, provider: dict) -> bool:
        """For refresh: an instance that is no more (deleted) is gone; a stopped one (TERMINATED) still exists."""
        from google.api_core.exceptions import NotFound

        if not res.type.endswith(":Instance"):
            return True
        parts = res.id.split("/")
        try:
            self.compute.InstancesClient(**self.kw).get(project=parts[1], zone=parts[3], instance=parts[-1])
        except NotFound:
            return False
        return True

    def create_instance(self, res: Resource, p: dict) -> tuple[str, dict]:
        c, project, i = self.compute, self.project(res, p), res.inputs
        zone = i.get("zone") or p.get("zone")
        params = i["bootDisk"]["initializeParams"]
        nic_in = i["networkInterfaces"][0]
        nic = c.NetworkInterface(subnetwork=nic_in.get("subnetwork", ""),
                                 access_configs=[c.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")
                                                 for _ in nic_in.get("accessConfigs", [])])
        if nic_in.get("nicType"):
            nic.nic_type = nic_in["nicType"]
        s = i.get("scheduling") or {}
        scheduling = c.Scheduling(on_host_maintenance=s.get("onHostMaintenance"),
                                  automatic_restart=s.get("automaticRestart"),
                                  provisioning_model=s.get("provisioningModel"), preemptible=s.get("preemptible"))
        if s.get("instanceTerminationAction"):
            scheduling.instance_termination_action = s["instanceTerminationAction"]
        policies = i.get("resourcePolicies") or []
        body = c.Instance(
            name=i["name"], machine_type=f"zones/{zone}/machineTypes/{i['machineType']}",
            disks=[c.AttachedDisk(boot=True, auto_delete=i["bootDisk"].get("autoDelete", True),
                                  initialize_params=c.AttachedDiskInitializeParams(
                                      source_image=params["image"], disk_size_gb=params.get("size"),
                                      disk_type=f"zones/{zone}/diskTypes/{params.get('type', 'pd-balanced')}",
                                      labels=self.labels(res, p, params.get("labels") or {})))],
            network_interfaces=[nic],
            guest_accelerators=[c.AcceleratorConfig(accelerator_type=f"zones/{zone}/acceleratorTypes/{a['type']}",
                                                    accelerator_count=a["count"]) for a in i.get("guestAccelerators", [])],
            scheduling=scheduling, resource_policies=[policies] if isinstance(policies, str) else list(policies),
            service_accounts=[c.ServiceAccount(email=i["serviceAccount"]["email"],
                                               scopes=i["serviceAccount"].get("scopes", []))],
            metadata=c.Metadata(items=[c.Items(key=k, value=v) for k, v in (i.get("metadata") or {}).items()]),
            tags=c.Tags(items=i.get("tags", [])), labels=self.labels(res, p),
        )
        instances = c.InstancesClient(**self.kw)
        op = self._call("creating instance", instances.insert, project=project, zone=zone, instance_resource=body)
        self.wait(op, project, "instance to create", zone=zone)
        live = instances.get(project=project, zone=zone, instance=i["name"])
        return f"projects/{project}/zones/{zone}/instances/{i['name']}", self._instance_outputs(i, live)

    def _instance_outputs(self, i: dict, live: Any) -> dict:
        """The provider's outputs: the inputs and what the API computed (addresses: a restarted VM gets new ones)."""
        nic_out = live.network_interfaces[0]
        return {**i, "selfLink": live.self_link, "instanceId": str(live.id),
                "networkInterfaces": [{**i["networkInterfaces"][0], "networkIp": nic_out.network_i_p,
                                       "accessConfigs": [{"natIp": a.nat_i_p} for a in nic_out.access_configs]}]}

    # -- delete ------------------------------------------------------------------------------------
    def delete(self, res: Resource, provider: dict) -> None:
        from google.api_core.exceptions import NotFound

        c, kind = self.compute, res.type.rsplit(":", 1)[-1]
        parts = res.id.split("/")
        project = parts[1] if parts[:1] == ["projects"] else self.gce.project
        name = parts[-1]
        try:
            if kind == "Instance":
                zone = parts[3]
                self.wait(c.InstancesClient(**self.kw).delete(project=project, zone=zone, instance=name), project,
                          "instance to delete", zone=zone)
            elif kind in ("Subnetwork", "ResourcePolicy"):
                region = parts[3]
                client = (c.SubnetworksClient if kind == "Subnetwork" else c.ResourcePoliciesClient)(**self.kw)
                arg = "subnetwork" if kind == "Subnetwork" else "resource_policy"
                self.wait(client.delete(project=project, region=region, **{arg: name}), project, f"{kind} to delete",
                          region=region)
            elif kind in ("Network", "Firewall"):
                client = (c.NetworksClient if kind == "Network" else c.FirewallsClient)(**self.kw)
                self.wait(client.delete(project=project, **{kind.lower(): name}), project, f"{kind} to delete")
            elif kind == "Account":
                import requests

                reply = requests.delete(f"{self.gce.endpoint}/v1/{res.id}", timeout=30)
                if reply.status_code not in (200, 404):
                    raise ProviderError(f"Error deleting service account {res.id}: {reply.text}")
            elif kind == "Bucket":
                self.gcs().bucket(res.id).delete()
            elif kind == "BucketIAMMember":
                return
            elif kind == "InstanceIAMMember":
                i = res.inputs
                self._edit_policy(res.outputs.get("project") or project, res.outputs.get("zone") or i["zone"],
                                  i["instanceName"], i["role"], i["member"], add=False)
            else:
                raise ProviderError(f"the GCP stand-in cannot delete {res.type}")
        except NotFound:
            return
        except Exception as exc:  # noqa: BLE001 - the provider's message
            if isinstance(exc, ProviderError):
                raise
            raise ProviderError(f"Error deleting {kind} {res.id}: {exc}") from None

    # -- invokes -----------------------------------------------------------------------------------
    def invoke(self, token: str, args: dict, provider: dict) -> dict:
        from google.api_core.exceptions import GoogleAPICallError

        if token == "gcp:compute/getImages:getImages":
            c = self.compute
            request = c.ListImagesRequest(project=args.get("project") or provider.get("project"),
                                          filter=args.get("filter", ""))
            try:
                images = list(c.ImagesClient(**self.kw).list(request=request))
            except GoogleAPICallError as exc:
                raise ProviderError(f"Error retrieving list of images: googleapi: Error {exc.code}: {exc.message}") \
                    from None
            return {"id": "images", "images": [{
                "name": i.name, "selfLink": i.self_link, "creationTimestamp": i.creation_timestamp,
                "family": i.family, "labels": dict(i.labels), "archiveSizeBytes": 0, "description": i.description,
                "diskSizeGb": i.disk_size_gb, "imageId": i.id, "sourceDisk": i.source_disk, "sourceDiskId": "",
                "sourceImageId": ""} for i in images]}
        raise ProviderError(f"the GCP stand-in does not answer the invoke {token}")
