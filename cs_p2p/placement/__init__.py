"""Where blobs live in the cluster beyond where containerd keeps them (issue 11)."""
