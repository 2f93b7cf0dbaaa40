"""Research tools behind BENCHMARKS.md's findings. Unmaintained: they reach into imagebot's
private names from the outside (instrumented.py wraps and monkeypatches them; profile.py
matches frame names) and may break or mislead whenever imagebot's internals change. Only
`python -m bench --profile` uses them (profile.py, and instrumented.py for its counters run);
the benchmark's own figures never come from them."""
