"""The memctl server: one process per machine owns the controller and serves the IDE.

* :mod:`server.owner` — the owner lock, ``server.json`` and the checks of the owner's identity;
* :mod:`server.connect` — ``controller_for(settings)`` (every entry point) and ``connect(settings)``
  (a client of the live owner, its identity checked before the token is sent);
* :mod:`server.runner` — ``ServerHandle``: uvicorn on a background thread or in the foreground;
* :mod:`server.app` — ``create_app``: ``/health``, ``/control`` and the OpenAI-compatible ``/v1``;
* :mod:`server.control` / :mod:`server.client` — the control API and its client (both
  ``memory_controller.api.ControllerAPI``);
* :mod:`server.served` — what the server serves, for ``memctl ps`` / ``ide`` and the dashboard.

Importing this package imports nothing heavy; FastAPI and uvicorn load only where a server runs.
"""
