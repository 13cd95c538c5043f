"""The neuron pages' payload, for the report: built in ``mambascope.results.pages`` (the neuron store serves
the same payload, and the store comes before the report)."""

from mambascope.results.pages import TOP_NEURONS, neuron_data, r4, r4list, top_neurons

__all__ = ["TOP_NEURONS", "neuron_data", "r4", "r4list", "top_neurons"]
