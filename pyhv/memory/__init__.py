"""The hypervisor memory manager of the book: the host's pool of memory for partitions.

`ranges` keeps page ranges merged; `manager` accounts host memory per partition (startup RAM,
ballooned pages, hot-added regions), releases ballooned pages to the free pool for real and takes
unballooned and hot-added memory from it.
"""
