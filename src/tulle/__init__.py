"""Tulle: a Kubernetes network plugin with a Python control plane and a Linux kernel data plane.

This module stays empty of imports: the CNI plugin binary imports the `tulle` package
under `/usr/bin/python3 -S` and must start in a few milliseconds.
"""

__version__ = "0.1.0"
