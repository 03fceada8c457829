"""The fleet's logic, callable without HTTP: bundles, devices, tokens, audit, rollouts, status.

Each function takes a SQLAlchemy session first and raises `edgepack.errors` classes; the routes in
`fleet.api` only validate input, call one of these, and let the app map errors to status codes.
"""
