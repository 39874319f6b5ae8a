"""pdmesh: decoder."""
