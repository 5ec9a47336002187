"""fedllm benchmarks: each script prints one JSON object and appends it to bench/results/."""
