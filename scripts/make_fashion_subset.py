#!/usr/bin/env python3
"""Builds assets/fashion-mnist-subset/: the first 2,000 training and 1,000 test images of
Fashion-MNIST (IDX format, gzip), for tests that run without QN_DATA_DIR.

    python scripts/make_fashion_subset.py <fashion-mnist directory with the four .gz files>
"""
import gzip
import struct
import sys


def subset(src, name, n, out):
    d = gzip.open(f"{src}/{name}").read()
    if struct.unpack(">I", d[:4])[0] == 0x803:
        data = struct.pack(">IIII", 0x803, n, 28, 28) + d[16 : 16 + n * 784]
    else:
        data = struct.pack(">II", 0x801, n) + d[8 : 8 + n]
    with gzip.GzipFile(f"assets/fashion-mnist-subset/{out or name}", "wb", mtime=0) as f:
        f.write(data)


src = sys.argv[1]
subset(src, "train-images-idx3-ubyte.gz", 2000, None)
subset(src, "train-labels-idx1-ubyte.gz", 2000, None)
subset(src, "t10k-images-idx3-ubyte.gz", 1000, None)
subset(src, "t10k-labels-idx1-ubyte.gz", 1000, None)
