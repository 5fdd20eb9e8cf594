"""Errors raised by the infra layer; the CLI turns each into one clear line."""


class InfraError(Exception):
    """Base class for infra errors."""


class SpecError(InfraError, ValueError):
    """A cluster specification value is invalid; the message names it and the valid choices."""


class CatalogError(SpecError):
    """An instance type, region, zone or accelerator is not in the catalog."""


class ClusterError(InfraError):
    """A cluster cannot be created, read or destroyed."""


class SshdMissingError(ClusterError):
    """The OpenSSH server the local cluster needs is not installed."""


class SweepError(InfraError):
    """Listing or deleting a cluster's leftover cloud resources failed."""


class PulumiCliMissingError(ClusterError):
    """The `pulumi` CLI that the cloud path (Automation API) drives is not installed."""


class CloudPackagesMissingError(ClusterError):
    """The Python packages of the `cloud` extra (Pulumi SDKs, cloud clients) are not installed."""


class StackError(ClusterError):
    """A Pulumi stack operation failed, or a stack's outputs are not a gpuforge cluster."""


class SshError(InfraError):
    """Reaching a node over SSH failed (infra/ssh.py)."""


class HostKeyError(SshError):
    """A node presented a host key other than the pinned one."""


class NodeUnreachableError(SshError):
    """SSH to a node failed or timed out."""


class PreflightError(ClusterError):
    """A read-only check before `fab up` creates anything failed: the type is not offered, or not sold that way."""


class QuotaError(PreflightError):
    """A quota is too small for the cluster; the message names the quota and how to raise it."""


class CapacityError(ClusterError):
    """No zone that offers the type had capacity for it; the message lists the zones tried."""
