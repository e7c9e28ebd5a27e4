"""Teacher datasets: recording a teacher's play into per-game HDF5 files and reading them back.

The only sub-package that imports h5py. See docs/datasets.md for the file format.
"""
