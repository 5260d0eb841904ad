"""Kernel state as plain, frozen data: what compilers produce and reconcilers apply (no I/O)."""
