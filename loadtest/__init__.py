"""Load tests and benchmarks (locust scenarios, the side-by-side bench, the GPU bench)."""
