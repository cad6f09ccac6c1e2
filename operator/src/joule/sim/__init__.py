"""The policy simulator: a cluster, a job stream, and strategies compared on the same seeds."""
