"""The node's guards: source verification, tunnel sources, connection limits, control-plane ports."""
