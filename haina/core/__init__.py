"""Foundations shared by every stage: config I/O, errors, atomic files, seeding, devices, logging.

This package imports nothing from the rest of haina.
"""
