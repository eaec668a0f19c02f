"""Benchmarks of checkpointer on the local environment: data path, restore path, control plane.

Every figure is a median over repeated runs, reported with its minimum and maximum, and every ratio
compares runs made in the same invocation on the same machine. `hack/bench/run` is the one command;
see the README.
"""
