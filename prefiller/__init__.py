"""pdmesh: prefiller."""
