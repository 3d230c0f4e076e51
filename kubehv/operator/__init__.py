"""The operator: node agents and the cluster controller (the only place kopf is used)."""
