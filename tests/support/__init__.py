"""Real components for the cluster and e2e tiers: control plane, S3 server, Prometheus."""
