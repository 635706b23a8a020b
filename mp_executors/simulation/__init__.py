"""The simulation layer: federated datasets, models, the FedAvg program, and its outputs.

This is what `mp-executors run` (the main job) and `mp-executors bench` are made of, written
only with the public `mp_executors` API, as a user would:

- `datasets`: FedProx's synthetic(alpha, beta), scikit-learn's digits and a user's npz, padded per client
  with a mask, built inside the workers from a `DatasetSpec` (`mpx.ClientData`).
- `models`: logistic regression and a small MLP in plain TensorFlow (masked loss/accuracy).
- `program`: the FedAvg/FedProx computations and the round loop (seeded client sampling).
- `outputs`: metrics.csv, metrics.json, model.npz, plots, the final table, memory sampling.
- `bench`: the scaling suite behind `mp-executors bench`.
"""
