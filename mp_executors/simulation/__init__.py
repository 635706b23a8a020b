"""The simulation layer: federated datasets, models, the FedAvg program, and its outputs.

This is what `mp-executors run` (the main job) is made of, written only with the public
`mp_executors` API, as a user would (the benchmark suite, `mp_executors.benchmarking`, uses it
for its main-job workload):

- `datasets`: FedProx's synthetic(alpha, beta), scikit-learn's digits and a user's npz, padded per client
  with a mask, built inside the workers from a `DatasetSpec` (`mpx.ClientData`).
- `models`: logistic regression and a small MLP in plain TensorFlow (masked loss/accuracy).
- `program`: the round loop on `mpx.learning` (FedAvg/FedProx/FedOpt/DP-FedAvg, seeded client
  sampling, a fixed evaluation sample) and the hand-written FedAvg round the benchmarks measure.
- `checkpoint`: DIR/checkpoint.npz, written atomically, verified when resumed.
- `outputs`: metrics.csv, metrics.json, model.npz, plots, the final table, memory sampling.
- `job`: the `run` subcommand: its flags, the factory they ask for, the run itself, resume, Ctrl-C.
"""
