"""Decisions: what to do with an object, given what the cluster and the node say."""
