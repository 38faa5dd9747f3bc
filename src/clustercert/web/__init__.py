"""The web console (DESIGN §13 "Console"): server-rendered pages on their own HTTPS listener,
served with the `cm` certificate. Part of the control plane: it calls the same domain code as
the REST API (validation, the rollout coordinator, the state store), never the API over HTTP."""
