"""pdmesh: kernels."""
