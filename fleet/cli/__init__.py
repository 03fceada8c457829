"""The fleet's commands, mounted by the root CLI (edgepack/cli):

    edgepack fleet serve|push          server.py  run the server, upload a bundle
    edgepack devices list|enroll-token devices.py enrolled devices and enrollment tokens
    edgepack rollout start|status|…    rollout.py waves, gates, pause/abort/rollback
    edgepack tokens create|list|revoke tokens.py  API tokens: role, scopes, expiry

These modules import only typer, rich and edgepack's core when the CLI starts; fastapi, uvicorn,
sqlalchemy and httpx are imported inside the commands, so `edgepack --help` lists them on a device
that has only the agent extra, and running one there says to install the fleet extra.
"""

EXTRAS = ("fleet",)
