"""edgepack: build ML models for edge hardware, package them as signed bundles, roll them out."""

__version__ = "0.1.0"
