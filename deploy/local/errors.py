"""Errors of the local cluster, as subclasses of the one hierarchy in :mod:`common.errors`::

    MeshError
    └── ClusterError          the local cluster cannot do what was asked
        ├── NetnsError        a namespace, link, route or nftables step failed (needs root?)
        ├── ClusterStateError no such cluster, or its state files are unreadable
        └── PodNotFoundError  ``exec``/``logs`` target has no running pod
"""

from __future__ import annotations

from common.errors import MeshError


class ClusterError(MeshError):
    """The local cluster cannot do what was asked."""


class NetnsError(ClusterError):
    """A namespace, link, route or nftables operation failed; the message has the tool's words."""


class ClusterStateError(ClusterError):
    """No cluster of that name is up, or its state directory is unreadable."""


class PodNotFoundError(ClusterError):
    """The pod (or a running pod of the deployment) named on the command line does not exist."""
