"""The benchmark harness: what `mp-executors bench` and the scripts in `benchmarks/` measure.

- `workloads`: the FACTS.md workloads (FedAvg 784->10 softmax, `federated_sum` overhead),
  written with the public API only, as a user would.
- `suite`: the scaling suite (`run_suite`), its measuring helpers (`measure`, `summarize`,
  `machine`) and its report (`markdown`, `plots`).

It lives in the package, not in `benchmarks/`, so that `mp-executors bench` runs from an
install; it is a client of the runtime and of `simulation` (the main job's round), never
imported by them. Importing it imports TensorFlow.
"""
