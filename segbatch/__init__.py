"""segbatch: distributed batch image segmentation on Ray Data."""
__version__ = "0.1.0"
