"""The AWS half of tests/fakes/engine.py: each pulumi-aws resource type of infra/aws.py, created, updated and
deleted with boto3 against a moto server (extended by tests/fakes/moto_ext.py), as the provider would.

What the provider does that is mirrored here: autonames (`<name>-<7 hex>`), default tags merged into every
resource's tags, a new security group's default egress rule revoked (the provider removes it), a launch-template
update adds a version and makes it the default, versioning "deleted" is suspended, instances waited to `running`
and `terminated`. Errors are phrased as pulumi-aws 7 prints them: "creating EC2 Instance: operation error EC2:
RunInstances, https response error StatusCode: 500, api error InsufficientInstanceCapacity: ...".
"""

from __future__ import annotations

import json
from typing import Any

from tests.fakes.engine import CloudTranslator, ProviderError, Resource, autoname

# ForceNew properties of the provider's schema for what the program sets (others update in place).
REPLACE_KEYS = {
    "aws:ec2/vpc:Vpc": ("cidrBlock",),
    "aws:ec2/subnet:Subnet": ("vpcId", "cidrBlock", "availabilityZone"),
    "aws:ec2/internetGateway:InternetGateway": (),
    "aws:ec2/routeTable:RouteTable": ("vpcId",),
    "aws:ec2/routeTableAssociation:RouteTableAssociation": ("subnetId",),
    "aws:ec2/securityGroup:SecurityGroup": ("vpcId", "description", "name"),
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": ("securityGroupId",),
    "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule": ("securityGroupId",),
    "aws:ec2/keyPair:KeyPair": ("publicKey",),
    "aws:ec2/placementGroup:PlacementGroup": ("strategy",),
    "aws:ec2/launchTemplate:LaunchTemplate": ("name",),
    "aws:ec2/instance:Instance": ("ami", "launchTemplate", "instanceMarketOptions", "availabilityZone", "subnetId"),
    "aws:ec2/eip:Eip": ("domain",),
    "aws:s3/bucket:Bucket": ("bucket", "bucketPrefix"),
    "aws:iam/role:Role": ("path", "name"),
    "aws:iam/rolePolicy:RolePolicy": ("role", "name"),
    "aws:iam/instanceProfile:InstanceProfile": ("path", "name"),
}
WHAT = {"aws:ec2/instance:Instance": ("EC2 Instance", "EC2", "RunInstances"),
        "aws:ec2/eip:Eip": ("EC2 EIP", "EC2", "AllocateAddress"),
        "aws:s3/bucket:Bucket": ("S3 Bucket", "S3", "CreateBucket")}


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def spec_tags(kind: str, tags: dict[str, str]) -> list[dict]:
    return [{"ResourceType": kind, "Tags": tag_list(tags)}] if tags else []


def lt_data(inputs: dict) -> dict[str, Any]:
    """LaunchTemplateData from the resource's camelCase inputs (the fields infra/aws.py sets)."""
    data: dict[str, Any] = {"ImageId": inputs.get("imageId"), "InstanceType": inputs.get("instanceType"),
                            "KeyName": inputs.get("keyName")}
    if inputs.get("iamInstanceProfile"):
        data["IamInstanceProfile"] = {"Arn": inputs["iamInstanceProfile"]["arn"]}
    md = inputs.get("metadataOptions") or {}
    if md:
        data["MetadataOptions"] = {"HttpEndpoint": md.get("httpEndpoint"), "HttpTokens": md.get("httpTokens"),
                                   "HttpPutResponseHopLimit": md.get("httpPutResponseHopLimit"),
                                   "InstanceMetadataTags": md.get("instanceMetadataTags")}
    data["BlockDeviceMappings"] = [
        {"DeviceName": m["deviceName"], "Ebs": {"VolumeSize": m["ebs"]["volumeSize"], "VolumeType": m["ebs"]["volumeType"],
                                                "Encrypted": m["ebs"]["encrypted"] == "true",
                                                "DeleteOnTermination": m["ebs"]["deleteOnTermination"] == "true"}}
        for m in inputs.get("blockDeviceMappings", [])]
    data["NetworkInterfaces"] = [
        {k: v for k, v in {"DeviceIndex": n.get("deviceIndex"), "NetworkCardIndex": n.get("networkCardIndex"),
                           "SubnetId": n.get("subnetId"), "Groups": n.get("securityGroups"),
                           "InterfaceType": n.get("interfaceType"),
                           "AssociatePublicIpAddress": n.get("associatePublicIpAddress") == "true",
                           "DeleteOnTermination": n.get("deleteOnTermination") == "true"}.items() if v is not None}
        for n in inputs.get("networkInterfaces", [])]
    if inputs.get("placement"):
        data["Placement"] = {"GroupName": inputs["placement"].get("groupName"),
                             "AvailabilityZone": inputs["placement"].get("availabilityZone")}
    data["TagSpecifications"] = [{"ResourceType": t["resourceType"], "Tags": tag_list(t["tags"])}
                                 for t in inputs.get("tagSpecifications", [])]
    return {k: v for k, v in data.items() if v not in (None, [], {})}


class AwsCloud(CloudTranslator):
    def __init__(self, endpoint: str, region: str = "us-east-1"):
        import boto3

        self.endpoint, self.region = endpoint, region
        self.session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing")

    def client(self, service: str, provider: dict) -> Any:
        return self.session.client(service, endpoint_url=self.endpoint, region_name=provider.get("region", self.region))

    def replace_keys(self, typ: str) -> tuple[str, ...]:
        return REPLACE_KEYS.get(typ, ())

    def tags(self, res: Resource, provider: dict, extra: dict | None = None) -> dict[str, str]:
        default = json.loads(provider.get("defaultTags") or "{}").get("tags", {})
        return {**default, **(res.inputs.get("tags") or {}), **(extra or {})}

    # -- create ------------------------------------------------------------------------------------
    def create(self, res: Resource, provider: dict) -> tuple[str, dict]:
        from botocore.exceptions import ClientError

        method = getattr(self, "create_" + res.type.rsplit(":", 1)[-1].lower(), None)
        if method is None:
            raise ProviderError(f"the AWS stand-in cannot create {res.type}")
        try:
            return method(res, provider)
        except ClientError as exc:
            raise ProviderError(self.phrase(res, exc)) from None

    def phrase(self, res: Resource, exc: Any) -> str:
        kind, service, op = WHAT.get(res.type, (res.type.rsplit(":", 1)[-1], "EC2", exc.operation_name))
        error = exc.response["Error"]
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 400)
        return (f"creating {kind} ({res.name}): operation error {service}: {op}, https response error StatusCode: "
                f"{status}, api error {error['Code']}: {error.get('Message', '')}")

    def create_vpc(self, res: Resource, p: dict) -> tuple[str, dict]:
        ec2 = self.client("ec2", p)
        vpc = ec2.create_vpc(CidrBlock=res.inputs["cidrBlock"], TagSpecifications=spec_tags("vpc", self.tags(res, p)))
        vpc_id = vpc["Vpc"]["VpcId"]
        for attr in ("EnableDnsSupport", "EnableDnsHostnames"):
            ec2.modify_vpc_attribute(VpcId=vpc_id, **{attr: {"Value": True}})
        return vpc_id, {**res.inputs, "id": vpc_id}

    def create_subnet(self, res: Resource, p: dict) -> tuple[str, dict]:
        subnet = self.client("ec2", p).create_subnet(
            VpcId=res.inputs["vpcId"], CidrBlock=res.inputs["cidrBlock"],
            AvailabilityZone=res.inputs["availabilityZone"], TagSpecifications=spec_tags("subnet", self.tags(res, p)))
        return subnet["Subnet"]["SubnetId"], {**res.inputs, "id": subnet["Subnet"]["SubnetId"]}

    def create_internetgateway(self, res: Resource, p: dict) -> tuple[str, dict]:
        ec2 = self.client("ec2", p)
        igw = ec2.create_internet_gateway(TagSpecifications=spec_tags("internet-gateway", self.tags(res, p)))
        igw_id = igw["InternetGateway"]["InternetGatewayId"]
        ec2.attach_internet_gateway(InternetGatewayId=igw_id, VpcId=res.inputs["vpcId"])
        return igw_id, {**res.inputs, "id": igw_id}

    def create_routetable(self, res: Resource, p: dict) -> tuple[str, dict]:
        ec2 = self.client("ec2", p)
        table = ec2.create_route_table(VpcId=res.inputs["vpcId"],
                                       TagSpecifications=spec_tags("route-table", self.tags(res, p)))
        table_id = table["RouteTable"]["RouteTableId"]
        for route in res.inputs.get("routes", []):
            ec2.create_route(RouteTableId=table_id, DestinationCidrBlock=route["cidrBlock"],
                             GatewayId=route["gatewayId"])
        return table_id, {**res.inputs, "id": table_id}

    def create_routetableassociation(self, res: Resource, p: dict) -> tuple[str, dict]:
        assoc = self.client("ec2", p).associate_route_table(RouteTableId=res.inputs["routeTableId"],
                                                            SubnetId=res.inputs["subnetId"])
        return assoc["AssociationId"], dict(res.inputs)

    def create_securitygroup(self, res: Resource, p: dict) -> tuple[str, dict]:
        ec2 = self.client("ec2", p)
        name = res.inputs.get("name") or autoname(res.name)
        group_id = ec2.create_security_group(GroupName=name, Description=res.inputs.get("description", "Managed by Pulumi"),
                                             VpcId=res.inputs["vpcId"],
                                             TagSpecifications=spec_tags("security-group", self.tags(res, p)))["GroupId"]
        # the provider removes the default allow-all egress rule of a new group
        ec2.revoke_security_group_egress(GroupId=group_id, IpPermissions=[
            {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
        return group_id, {**res.inputs, "id": group_id, "name": name}

    def _rule(self, res: Resource, p: dict, egress: bool) -> tuple[str, dict]:
        inputs = res.inputs
        permission: dict[str, Any] = {"IpProtocol": inputs["ipProtocol"]}
        if inputs["ipProtocol"] != "-1":
            permission.update(FromPort=inputs["fromPort"], ToPort=inputs["toPort"])
        described = {"Description": inputs.get("description", "")}
        if inputs.get("cidrIpv4"):
            permission["IpRanges"] = [{"CidrIp": inputs["cidrIpv4"], **described}]
        if inputs.get("referencedSecurityGroupId"):
            permission["UserIdGroupPairs"] = [{"GroupId": inputs["referencedSecurityGroupId"], **described}]
        ec2 = self.client("ec2", p)
        call = ec2.authorize_security_group_egress if egress else ec2.authorize_security_group_ingress
        reply = call(GroupId=inputs["securityGroupId"], IpPermissions=[permission],
                     TagSpecifications=spec_tags("security-group-rule", self.tags(res, p)))
        rule_id = reply["SecurityGroupRules"][0]["SecurityGroupRuleId"]
        return rule_id, {**inputs, "id": rule_id, "permission": permission}

    def create_securitygroupingressrule(self, res: Resource, p: dict) -> tuple[str, dict]:
        return self._rule(res, p, egress=False)

    def create_securitygroupegressrule(self, res: Resource, p: dict) -> tuple[str, dict]:
        return self._rule(res, p, egress=True)

    def create_keypair(self, res: Resource, p: dict) -> tuple[str, dict]:
        name = autoname(res.name)
        self.client("ec2", p).import_key_pair(KeyName=name, PublicKeyMaterial=res.inputs["publicKey"].encode(),
                                              TagSpecifications=spec_tags("key-pair", self.tags(res, p)))
        return name, {**res.inputs, "keyName": name}

    def create_placementgroup(self, res: Resource, p: dict) -> tuple[str, dict]:
        name = autoname(res.name)
        group = self.client("ec2", p).create_placement_group(
            GroupName=name, Strategy=res.inputs["strategy"], TagSpecifications=spec_tags("placement-group",
                                                                                         self.tags(res, p)))
        return name, {**res.inputs, "name": name, "placementGroupId": group["PlacementGroup"]["GroupId"]}

    def create_launchtemplate(self, res: Resource, p: dict) -> tuple[str, dict]:
        name = autoname(res.name)
        template = self.client("ec2", p).create_launch_template(
            LaunchTemplateName=name, LaunchTemplateData=lt_data(res.inputs),
            TagSpecifications=spec_tags("launch-template", self.tags(res, p)))["LaunchTemplate"]
        return template["LaunchTemplateId"], {**res.inputs, "name": name, "latestVersion": 1, "defaultVersion": 1}

    def exists(self, res: Resource, p: dict) -> bool:
        """For refresh: an instance terminated (or terminating) is gone, as the provider's Read finds it."""
        if res.type != "aws:ec2/instance:Instance":
            return True
        found = self.client("ec2", p).describe_instances(InstanceIds=[res.id])["Reservations"]
        state = found[0]["Instances"][0]["State"]["Name"] if found else "terminated"
        return state not in ("shutting-down", "terminated")

    def create_instance(self, res: Resource, p: dict) -> tuple[str, dict]:
        ec2 = self.client("ec2", p)
        inputs = res.inputs
        params: dict[str, Any] = {
            "MinCount": 1, "MaxCount": 1,
            "LaunchTemplate": {"LaunchTemplateId": inputs["launchTemplate"]["id"],
                               "Version": str(inputs["launchTemplate"]["version"])},
            "TagSpecifications": spec_tags("instance", self.tags(res, p)),
        }
        if inputs.get("instanceType"):
            params["InstanceType"] = inputs["instanceType"]
        if inputs.get("instanceInitiatedShutdownBehavior"):
            params["InstanceInitiatedShutdownBehavior"] = inputs["instanceInitiatedShutdownBehavior"]
        market = inputs.get("instanceMarketOptions")
        if market:
            spot = market.get("spotOptions", {})
            params["InstanceMarketOptions"] = {"MarketType": market["marketType"], "SpotOptions": {
                "SpotInstanceType": spot.get("spotInstanceType", "one-time"),
                "InstanceInterruptionBehavior": spot.get("instanceInterruptionBehavior", "terminate")}}
        instance = ec2.run_instances(**params)["Instances"][0]
        instance_id = instance["InstanceId"]
        ec2.get_waiter("instance_running").wait(InstanceIds=[instance_id], WaiterConfig={"Delay": 0.1})
        live = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        primary = next((n for n in live.get("NetworkInterfaces", []) if n.get("Attachment", {}).get("DeviceIndex") == 0),
                       live.get("NetworkInterfaces", [{}])[0] if live.get("NetworkInterfaces") else {})
        return instance_id, {**inputs, "id": instance_id, "ami": live["ImageId"],
                             "availabilityZone": live["Placement"]["AvailabilityZone"],
                             "publicIp": live.get("PublicIpAddress", ""), "privateIp": live.get("PrivateIpAddress", ""),
                             "primaryNetworkInterfaceId": primary.get("NetworkInterfaceId", "")}

    def create_eip(self, res: Resource, p: dict) -> tuple[str, dict]:
        ec2 = self.client("ec2", p)
        address = ec2.allocate_address(Domain="vpc", TagSpecifications=spec_tags("elastic-ip", self.tags(res, p)))
        if res.inputs.get("networkInterface"):
            ec2.associate_address(AllocationId=address["AllocationId"], NetworkInterfaceId=res.inputs["networkInterface"])
        return address["AllocationId"], {**res.inputs, "publicIp": address["PublicIp"],
                                          "allocationId": address["AllocationId"]}

    def create_bucket(self, res: Resource, p: dict) -> tuple[str, dict]:
        import secrets

        s3 = self.client("s3", p)
        name = res.inputs.get("bucket") or res.inputs["bucketPrefix"] + secrets.token_hex(13)  # the provider's 26
        region = p.get("region", self.region)
        extra = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=name, **extra)
        tags = self.tags(res, p)
        if tags:
            s3.put_bucket_tagging(Bucket=name, Tagging={"TagSet": tag_list(tags)})
        return name, {**res.inputs, "bucket": name, "arn": f"arn:aws:s3:::{name}", "id": name}

    def create_bucketpublicaccessblock(self, res: Resource, p: dict) -> tuple[str, dict]:
        i = res.inputs
        self.client("s3", p).put_public_access_block(Bucket=i["bucket"], PublicAccessBlockConfiguration={
            "BlockPublicAcls": i["blockPublicAcls"], "IgnorePublicAcls": i["ignorePublicAcls"],
            "BlockPublicPolicy": i["blockPublicPolicy"], "RestrictPublicBuckets": i["restrictPublicBuckets"]})
        return i["bucket"], dict(i)

    def create_bucketownershipcontrols(self, res: Resource, p: dict) -> tuple[str, dict]:
        i = res.inputs
        self.client("s3", p).put_bucket_ownership_controls(Bucket=i["bucket"], OwnershipControls={
            "Rules": [{"ObjectOwnership": i["rule"]["objectOwnership"]}]})
        return i["bucket"], dict(i)

    def create_bucketserversideencryptionconfiguration(self, res: Resource, p: dict) -> tuple[str, dict]:
        i = res.inputs
        rules = [{"ApplyServerSideEncryptionByDefault": {
            "SSEAlgorithm": r["applyServerSideEncryptionByDefault"]["sseAlgorithm"]}} for r in i["rules"]]
        self.client("s3", p).put_bucket_encryption(Bucket=i["bucket"],
                                                   ServerSideEncryptionConfiguration={"Rules": rules})
        return i["bucket"], dict(i)

    def create_bucketversioning(self, res: Resource, p: dict) -> tuple[str, dict]:
        i = res.inputs
        self.client("s3", p).put_bucket_versioning(Bucket=i["bucket"], VersioningConfiguration={
            "Status": i["versioningConfiguration"]["status"]})
        return i["bucket"], dict(i)

    def create_bucketlifecycleconfiguration(self, res: Resource, p: dict) -> tuple[str, dict]:
        i = res.inputs
        rules = [{"ID": r["id"], "Status": r["status"], "Filter": {"Prefix": r.get("filter", {}).get("prefix", "")},
                  "NoncurrentVersionExpiration": {"NoncurrentDays": r["noncurrentVersionExpiration"]["noncurrentDays"]},
                  "AbortIncompleteMultipartUpload": {
                      "DaysAfterInitiation": r["abortIncompleteMultipartUpload"]["daysAfterInitiation"]}}
                 for r in i["rules"]]
        self.client("s3", p).put_bucket_lifecycle_configuration(Bucket=i["bucket"],
                                                                LifecycleConfiguration={"Rules": rules})
        return i["bucket"], dict(i)

    def create_role(self, res: Resource, p: dict) -> tuple[str, dict]:
        name = autoname(res.name)
        role = self.client("iam", p).create_role(RoleName=name, Path=res.inputs.get("path", "/"),
                                                 AssumeRolePolicyDocument=res.inputs["assumeRolePolicy"],
                                                 Tags=tag_list(self.tags(res, p)))["Role"]
        return name, {**res.inputs, "name": name, "arn": role["Arn"]}

    def create_rolepolicy(self, res: Resource, p: dict) -> tuple[str, dict]:
        name = autoname(res.name)
        self.client("iam", p).put_role_policy(RoleName=res.inputs["role"], PolicyName=name,
                                              PolicyDocument=res.inputs["policy"])
        return f"{res.inputs['role']}:{name}", {**res.inputs, "name": name}

    def create_instanceprofile(self, res: Resource, p: dict) -> tuple[str, dict]:
        iam = self.client("iam", p)
        name = autoname(res.name)
        profile = iam.create_instance_profile(InstanceProfileName=name, Path=res.inputs.get("path", "/"),
                                              Tags=tag_list(self.tags(res, p)))["InstanceProfile"]
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=res.inputs["role"])
        return name, {**res.inputs, "name": name, "arn": profile["Arn"]}

    # -- update ------------------------------------------------------------------------------------
    def update(self, old: Resource, new_inputs: dict, provider: dict) -> dict:
        if old.type == "aws:ec2/launchTemplate:LaunchTemplate":
            ec2 = self.client("ec2", provider)
            version = ec2.create_launch_template_version(LaunchTemplateId=old.id,
                                                         LaunchTemplateData=lt_data(new_inputs))
            number = version["LaunchTemplateVersion"]["VersionNumber"]
            ec2.modify_launch_template(LaunchTemplateId=old.id, DefaultVersion=str(number))
            return {**old.outputs, **new_inputs, "latestVersion": number, "defaultVersion": number}
        behaviour = new_inputs.get("instanceInitiatedShutdownBehavior")
        if old.type == "aws:ec2/instance:Instance" and behaviour != old.inputs.get("instanceInitiatedShutdownBehavior"):
            self.client("ec2", provider).modify_instance_attribute(  # in place, as the provider does
                InstanceId=old.id, Attribute="instanceInitiatedShutdownBehavior", Value=behaviour)
        return {**old.outputs, **new_inputs}

    def planned_outputs(self, typ: str, name: str, inputs: dict) -> dict:
        return {}

    # -- delete ------------------------------------------------------------------------------------
    def delete(self, res: Resource, provider: dict) -> None:
        from botocore.exceptions import ClientError

        ec2, s3, iam = (self.client(s, provider) for s in ("ec2", "s3", "iam"))
        kind = res.type.rsplit(":", 1)[-1]
        o = res.outputs
        calls = {
            "Vpc": lambda: ec2.delete_vpc(VpcId=res.id),
            "Subnet": lambda: ec2.delete_subnet(SubnetId=res.id),
            "InternetGateway": lambda: (ec2.detach_internet_gateway(InternetGatewayId=res.id, VpcId=o["vpcId"]),
                                        ec2.delete_internet_gateway(InternetGatewayId=res.id)),
            "RouteTable": lambda: ec2.delete_route_table(RouteTableId=res.id),
            "RouteTableAssociation": lambda: ec2.disassociate_route_table(AssociationId=res.id),
            "SecurityGroup": lambda: ec2.delete_security_group(GroupId=res.id),
            "SecurityGroupIngressRule": lambda: ec2.revoke_security_group_ingress(
                GroupId=o["securityGroupId"], SecurityGroupRuleIds=[res.id]),
            "SecurityGroupEgressRule": lambda: ec2.revoke_security_group_egress(
                GroupId=o["securityGroupId"], SecurityGroupRuleIds=[res.id]),
            "KeyPair": lambda: ec2.delete_key_pair(KeyName=res.id),
            "PlacementGroup": lambda: ec2.delete_placement_group(GroupName=res.id),
            "LaunchTemplate": lambda: ec2.delete_launch_template(LaunchTemplateId=res.id),
            "Instance": lambda: (ec2.terminate_instances(InstanceIds=[res.id]), ec2.get_waiter(
                "instance_terminated").wait(InstanceIds=[res.id], WaiterConfig={"Delay": 0.1})),
            "Eip": lambda: ec2.release_address(AllocationId=res.id),
            "Bucket": lambda: s3.delete_bucket(Bucket=res.id),
            "BucketPublicAccessBlock": lambda: s3.delete_public_access_block(Bucket=res.id),
            "BucketOwnershipControls": lambda: s3.delete_bucket_ownership_controls(Bucket=res.id),
            "BucketServerSideEncryptionConfiguration": lambda: s3.delete_bucket_encryption(Bucket=res.id),
            "BucketVersioning": lambda: s3.put_bucket_versioning(Bucket=res.id, VersioningConfiguration={
                "Status": "Suspended"}),
            "BucketLifecycleConfiguration": lambda: s3.delete_bucket_lifecycle(Bucket=res.id),
            "Role": lambda: iam.delete_role(RoleName=res.id),
            "RolePolicy": lambda: iam.delete_role_policy(RoleName=o["role"], PolicyName=o["name"]),
            "InstanceProfile": lambda: (iam.remove_role_from_instance_profile(InstanceProfileName=res.id,
                                                                              RoleName=o["role"]),
                                        iam.delete_instance_profile(InstanceProfileName=res.id)),
        }
        try:
            calls[kind]()
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            if code.endswith("NotFound") or code in ("NoSuchEntity", "NoSuchBucket", "InvalidPlacementGroup.Unknown"):
                return  # already gone: the provider treats it as deleted
            raise ProviderError(f"deleting {kind} {res.id}: {code}: {exc.response['Error'].get('Message', '')}") \
                from None

    # -- invokes -----------------------------------------------------------------------------------
    def invoke(self, token: str, args: dict, provider: dict) -> dict:
        from botocore.exceptions import ClientError

        ec2 = self.client("ec2", provider)
        filters = [{"Name": f["name"], "Values": f["values"]} for f in args.get("filters") or []]
        try:
            if token == "aws:ec2/getAmiIds:getAmiIds":
                images = ec2.describe_images(Owners=args.get("owners") or [], Filters=filters)["Images"]
                images.sort(key=lambda i: i.get("CreationDate", ""), reverse=not args.get("sortAscending", False))
                return {"id": "ami-ids", "ids": [i["ImageId"] for i in images]}
            if token == "aws:ec2/getAmi:getAmi":
                params: dict[str, Any] = {"Filters": filters,
                                          "IncludeDeprecated": bool(args.get("includeDeprecated"))}
                if args.get("owners"):
                    params["Owners"] = args["owners"]
                images = ec2.describe_images(**params)["Images"]
                if not images:
                    raise ProviderError("Your query returned no results. Please change your search criteria and try "
                                        "again.")
                image = max(images, key=lambda i: i.get("CreationDate", ""))
                return {"id": image["ImageId"], "imageId": image["ImageId"], "name": image.get("Name", ""),
                        "rootDeviceName": image.get("RootDeviceName", ""), "creationDate": image.get("CreationDate")}
            if token == "aws:ssm/getParameter:getParameter":
                value = self.client("ssm", provider).get_parameter(Name=args["name"])["Parameter"]["Value"]
                return {"id": args["name"], "name": args["name"], "value": value, "type": "String"}
        except ClientError as exc:
            raise ProviderError(f"reading {token}: {exc}") from None
        raise ProviderError(f"the AWS stand-in does not answer the invoke {token}")
