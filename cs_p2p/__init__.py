"""cs-p2p: a peer-to-peer content store for containerd."""

__version__ = "0.1.0"
