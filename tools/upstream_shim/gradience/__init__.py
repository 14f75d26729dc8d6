"""Rename-only shim: upstream gradience 0.11.0's import paths → gradience_lite.

Used only to run upstream's own audit tests against gradience_lite (see
tools/upstream_shim/README.md).  Nothing here adapts behaviour: each name is
bound to the gradience_lite object that plays its role, or left out when
gradience_lite has none — the failing tests are the list of differences.
"""
