"""Transfer learning for image folders: a frozen pretrained CNN's features cached in HDF5, heads fit in seconds."""

__version__ = "0.1.0"
