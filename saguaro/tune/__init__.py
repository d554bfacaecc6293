"""Choosing by measurement: the cost model, method='auto', step costs, measurements kept on disk."""
