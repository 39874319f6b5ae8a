"""pdmesh: transfer."""
