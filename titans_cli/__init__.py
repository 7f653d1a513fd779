"""titans: train and evaluate Titans (neural long-term memory) models on genomics and time series."""

__version__ = "0.1.0"
