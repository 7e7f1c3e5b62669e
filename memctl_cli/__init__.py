"""The ``memctl`` command line: an entry layer above the core (it may use the server's client and
commands; it never imports a backend or an outside system directly)."""
