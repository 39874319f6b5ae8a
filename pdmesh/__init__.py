"""pdmesh: pdmesh."""
