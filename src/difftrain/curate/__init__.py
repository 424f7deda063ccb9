"""Curating a data set before training: filters, duplicates, captions, and a report to check them by eye.

`pipeline.curate(source, out, options)` is the whole of `difftrain data curate`; see its
module docstring for the steps and their order.
"""
