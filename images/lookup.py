"""Which image a new cluster boots: the newest usable baked gpuforge image, else the cloud's Deep Learning image.

    choice = find_aws_image(ec2, ssm, "ubuntu-22.04", "A100")     # ImageChoice(id="ami-...", source="baked", ...)
    choice = find_gcp_image(images_client, "my-project", "ubuntu-22.04", "L4")

`fab up` calls these once, at a cluster's first `up`, and records the choice in the stack (`gpuforge:image`), so
later `up`s keep the nodes on it; rolling to a newer image is `fab up --roll-image`, previewed first. The Pulumi
program uses the same tag/label and family rules when `gpuforge:image` is unset (a bare `pulumi up`).

What counts as usable:
- AWS: our own AMIs (Owners=self) tagged `gpuforge:baked=true`, the OS and the GPU's driver-module flavour, in
  state `available`, whose DeprecationTime has not passed. DescribeImages returns an owner's deprecated AMIs
  whatever IncludeDeprecated says (EC2 API reference, DescribeImages), so the deprecation time is checked here.
  Else the Deep Learning Base AMI that AWS's public SSM parameter names.
- GCP: images of the family our bake writes for this OS and GPU (`image_family`), labelled `gpuforge-baked=true`,
  with status READY and no deprecation state DEPRECATED, OBSOLETE or DELETED; else the newest image of the Deep
  Learning VM family (images.getFromFamily: "the latest image that is part of an image family and is not
  deprecated"). List filters are in the documented form: each expression in parentheses, values quoted
  (compute v1 `filter`: "To filter on multiple expressions, provide each separate expression within parentheses").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

# Tags (AWS) and labels (GCP) images/aws.py and images/gcp.py put on baked images; the lookups select on them.
BAKED_TAG = "gpuforge:baked"
OS_TAG = "gpuforge:os"
MODULES_TAG = "gpuforge:driver-modules"  # open | proprietary NVIDIA kernel modules (images/common.py)
BAKED_LABEL = "gpuforge-baked"
OS_LABEL = "gpuforge-os"
MODULES_LABEL = "gpuforge-driver-modules"
# Deep Learning Base OSS Nvidia Driver GPU AMI, newest release, via SSM public parameters
# (docs.aws.amazon.com/dlami/latest/devguide/find-dlami-id.html).
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-{os}/latest/ami-id"
# Deep Learning VM image families (cloud.google.com/deep-learning-vm/docs/images): CUDA 12.8, NVIDIA 570.
DLVM_PROJECT = "deeplearning-platform-release"
DLVM_FAMILIES = {
    "ubuntu-22.04": "common-cu128-ubuntu-2204-nvidia-570",
    "ubuntu-24.04": "common-cu128-ubuntu-2404-nvidia-570",
}
GCE_RETIRED_STATES = ("DEPRECATED", "OBSOLETE", "DELETED")  # images.deprecated.state values (compute v1 Image)
API_ROOT = "https://www.googleapis.com/compute/v1/"


@dataclass(frozen=True)
class ImageChoice:
    id: str  # AMI id, or a GCE image self link
    name: str
    source: str  # "baked" | "dlami" | "dlvm" | "given"
    created: str = ""
    root_device: str = ""  # AWS: the image's root device name (its block device mapping goes there)

    def describe(self) -> str:
        what = {"baked": "baked gpuforge image", "dlami": "Deep Learning Base AMI", "dlvm": "Deep Learning VM image",
                "given": "image given"}[self.source]
        return f"{self.id} ({what} {self.name}{', created ' + self.created if self.created else ''})"


def driver_modules(gpu_model: str) -> str:
    """'open' or 'proprietary': the NVIDIA kernel-module flavour a GPU needs (and a baked image was made for)."""
    from provision.versions import open_kernel_modules

    return "open" if open_kernel_modules(gpu_model) else "proprietary"


def os_label(os_name: str) -> str:
    """'ubuntu-22.04' -> 'ubuntu-2204' (label values take no dots)."""
    return os_name.replace(".", "")


def image_family(os_name: str, gpu_model: str) -> str:
    """The GCE family (and AWS `gpuforge:family` tag) a bake for this OS and GPU writes."""
    from provision.versions import image_family as family

    return family(os_name, gpu_model)


# -- AWS ---------------------------------------------------------------------------------------------

def baked_ami_filters(os_name: str, modules: str) -> list[dict[str, Any]]:
    """DescribeImages filters (boto3 shape) for our baked AMIs of an OS and driver flavour."""
    return [
        {"Name": f"tag:{BAKED_TAG}", "Values": ["true"]},
        {"Name": f"tag:{OS_TAG}", "Values": [os_name]},
        {"Name": f"tag:{MODULES_TAG}", "Values": [modules]},
        {"Name": "state", "Values": ["available"]},
    ]


def ami_deprecated(image: dict[str, Any], now: datetime | None = None) -> bool:
    """True when the AMI's DeprecationTime (ISO 8601, UTC) has passed."""
    when = image.get("DeprecationTime")
    if not when:
        return False
    moment = datetime.fromisoformat(str(when).replace("Z", "+00:00"))
    return moment <= (now or datetime.now(timezone.utc))


def newest_ami(images: list[dict[str, Any]], now: datetime | None = None) -> dict[str, Any] | None:
    usable = [i for i in images if i.get("State", "available") == "available" and not ami_deprecated(i, now)]
    return max(usable, key=lambda i: (i.get("CreationDate", ""), i["ImageId"]), default=None)


def find_aws_image(ec2: Any, ssm: Any, os_name: str, gpu_model: str) -> ImageChoice:
    """The newest usable baked AMI, else the DLAMI the SSM parameter names; with its root device name."""
    modules = driver_modules(gpu_model)
    baked = ec2.describe_images(Owners=["self"], Filters=baked_ami_filters(os_name, modules))["Images"]
    image = newest_ami(baked)
    source = "baked"
    if image is None:
        parameter = DLAMI_PARAMETER.format(os=os_name)
        ami = ssm.get_parameter(Name=parameter)["Parameter"]["Value"]
        found = ec2.describe_images(ImageIds=[ami])["Images"]
        if not found:
            raise LookupError(f"the Deep Learning AMI {ami} that {parameter} names does not exist")
        image, source = found[0], "dlami"
    return ImageChoice(id=image["ImageId"], name=image.get("Name", ""), source=source,
                       created=image.get("CreationDate", ""), root_device=image.get("RootDeviceName", ""))


def describe_aws_image(ec2: Any, image_id: str) -> ImageChoice:
    """An AMI given by id (a pinned or user-given image), with its root device; LookupError when it is gone."""
    found = ec2.describe_images(ImageIds=[image_id], IncludeDeprecated=True)["Images"]
    if not found:
        raise LookupError(f"image {image_id} does not exist (or is not shared with this account)")
    image = found[0]
    return ImageChoice(id=image_id, name=image.get("Name", ""), source="given", created=image.get("CreationDate", ""),
                       root_device=image.get("RootDeviceName", ""))


# -- GCP ---------------------------------------------------------------------------------------------

def baked_image_filter(os_name: str, gpu_model: str) -> str:
    """images.list filter for our baked images of the family this OS and GPU use, in the documented form."""
    modules = driver_modules(gpu_model)
    terms = [("family", image_family(os_name, gpu_model)), (f"labels.{BAKED_LABEL}", "true"),
             (f"labels.{OS_LABEL}", os_label(os_name)), (f"labels.{MODULES_LABEL}", modules)]
    return " ".join(f'({key} = "{value}")' for key, value in terms)


def _get(obj: Any, name: str, default: Any = "") -> Any:
    if isinstance(obj, dict):
        return obj.get(name, obj.get(_camel(name), default))
    return getattr(obj, name, default)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def gce_image_usable(image: Any) -> bool:
    """READY and not deprecated, obsolete or deleted (a compute_v1.Image or its JSON)."""
    deprecated = _get(image, "deprecated", None)
    state = _get(deprecated, "state", "") if deprecated else ""
    return str(_get(image, "status")) == "READY" and state not in GCE_RETIRED_STATES


def newest_gce_image(images: list[Any]) -> Any | None:
    usable = [i for i in images if gce_image_usable(i)]
    return max(usable, key=lambda i: (_get(i, "creation_timestamp"), _get(i, "name")), default=None)


def find_gcp_image(images_client: Any, project: str, os_name: str, gpu_model: str) -> ImageChoice:
    """The newest usable baked image of our family in `project`, else the newest DLVM image; a concrete link."""
    from google.cloud import compute_v1

    request = compute_v1.ListImagesRequest(project=project, filter=baked_image_filter(os_name, gpu_model))
    image = newest_gce_image(list(images_client.list(request=request)))
    source = "baked"
    if image is None:
        image = images_client.get_from_family(project=DLVM_PROJECT, family=DLVM_FAMILIES[os_name])
        source = "dlvm"
    return ImageChoice(id=image.self_link, name=image.name, source=source, created=image.creation_timestamp)


def describe_gcp_image(images_client: Any, link: str) -> ImageChoice:
    """An image given by link or path (`projects/P/global/images/NAME` or `.../family/F`): a concrete image."""
    path = link.removeprefix(API_ROOT)
    parts = path.split("/")
    if len(parts) < 5 or parts[0] != "projects" or parts[2:4] != ["global", "images"]:
        raise LookupError(f"image {link!r} is not a GCE image path (projects/P/global/images/NAME or .../family/F)")
    project = parts[1]
    if parts[4] == "family" and len(parts) == 6:
        image = images_client.get_from_family(project=project, family=parts[5])
    else:
        image = images_client.get(project=project, image=parts[4])
    return ImageChoice(id=image.self_link, name=image.name, source="given", created=image.creation_timestamp)
