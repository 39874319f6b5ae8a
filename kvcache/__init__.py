"""pdmesh: kvcache."""
