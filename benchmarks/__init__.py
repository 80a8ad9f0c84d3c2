"""fewstep.benchmarks: the latency benchmark suite behind ``fewstep bench``."""
