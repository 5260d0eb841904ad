"""The thin CNI plugin and the CNI specification (standard library only)."""
