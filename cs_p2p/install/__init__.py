"""Installing cs-p2p on a host (systemd unit, containerd wiring) and removing it without a loss."""
