"""A soak of checkpointer on its own local environment: many checkpoints and restores under real faults.

`hack/soak/run` is the one command; it ends with the invariants of docs/failure-semantics.md.
"""
