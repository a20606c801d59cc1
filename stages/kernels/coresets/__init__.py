"""Coreset and pruning kernels: plain functions of arrays, used by the select stage."""
