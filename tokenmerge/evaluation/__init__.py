"""Measuring: accuracy on image folders, GFLOPs, throughput, and the sweeps built on them."""
