"""Model surgery and state: inject, merge and remove adapters, save and load them, the one validator of stored
state, name prefixes, sharding helpers and crash-safe writes. Built on `adapters/` and `policy/`.
"""
