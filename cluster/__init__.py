"""Cluster launch, configuration, CLI, registry, metrics and autoscaling."""
