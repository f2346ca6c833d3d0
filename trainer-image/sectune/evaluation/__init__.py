"""Evaluation: metrics, baselines, probes, gates, report."""
