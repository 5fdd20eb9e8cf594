"""Machine images with gpuforge's provisioning already done, so clusters start ready (`fab bake`).

    from images import BakeSpec, bake
    result = bake(BakeSpec(cloud="aws", ssh_cidrs=("203.0.113.4/32",)), home=Path("~/.gpuforge"))
    print(result.image_id, result.family, result.deleted_images)

A builder VM is launched from plain Ubuntu, provisioned over SSH with the same steps as `fab setup`,
stopped and imaged; the builder and everything temporary are always removed. infra/aws.py and
infra/gcp.py boot new clusters from the newest baked image for their OS. See images/aws.py and
images/gcp.py for each cloud's flow.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from images.errors import BakeError, BakeSpecError, CleanupError

if TYPE_CHECKING:
    from images.spec import BakeResult, BakeSpec


def __getattr__(name: str) -> Any:
    """BakeSpec and BakeResult on first use: the spec brings pydantic and the catalog (~0.3 s), which every
    command that only catches a BakeError (all of them, through provision/cli/argv.py) does without."""
    if name in ("BakeSpec", "BakeResult"):
        from images import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'images' has no attribute {name!r}")


def bake(spec: BakeSpec, home: Path, **kwargs: Any) -> BakeResult:
    """bake_aws or bake_gcp by spec.cloud; keyword arguments go to it (session= on AWS,
    client_options=/credentials= on GCP; provision=, connect_target=, on_event= on both)."""
    if spec.cloud == "aws":
        from images.aws import bake_aws

        return bake_aws(spec, home, **kwargs)
    from images.gcp import bake_gcp

    return bake_gcp(spec, home, **kwargs)


__all__ = ["BakeError", "BakeResult", "BakeSpec", "BakeSpecError", "CleanupError", "bake"]
