"""titans: neural long-term memory that learns at test time (Behrouz et al., arXiv 2501.00663)."""

__version__ = "0.1.0"
