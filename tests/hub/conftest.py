"""Fixtures of tests/hub: see tests/hub/fixtures.py."""

from tests.hub.fixtures import hub, packed  # noqa: F401 - pytest finds fixtures by name
