"""The policy server (``par-deploy serve``): ``protocol`` (wire format, shared with ``par_deploy.client``),
``session`` (one client's episode, the policy pool), ``server`` (websocket server, health check, shutdown).

Importing this package imports nothing else, so the client can use ``protocol`` without the server's imports.
"""
