"""Loaders of real data sets, each returning fljax populations or central arrays.

Every loader takes ``data_dir=`` (or reads an environment variable) for an
offline copy and never downloads in tests.
"""
