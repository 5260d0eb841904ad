"""`tulle connectivity test`: probe pods that check a cluster's pod networking end to end.

`cluster.py` is the small interface a cluster offers the test (start a pod on a node, run a
command in it, delete it, list nodes, apply a policy, reach the outside); `checks.py` decides what
to check and how a result reads (pure); `runner.py` runs the checks against a cluster and cleans
up; `client.py` and `echo.py` are the two ends of one probe. Nothing here knows how a cluster
makes its pods: the lab implements the interface in `tulle.lab.connectivity`.
"""
