"""The one owner of an archive's bytes: its encoding, the node's spool and work folder, the bucket.

Services call these typed functions and methods; none of them holds a storage client. See
docs/architecture.md for where the bytes go and docs/failure-semantics.md for what survives a fault.
"""
