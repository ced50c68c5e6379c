"""starjax benchmarks: matmul ceiling, training throughput and MFU (`make bench`)."""
