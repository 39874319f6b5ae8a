"""pdmesh: router."""
