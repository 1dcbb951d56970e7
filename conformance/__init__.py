"""Conformance suite (pytest plugin): arrives with the adapters issue."""
