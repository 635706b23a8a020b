"""The federated computation language: types, values, AST, tracing, intrinsics."""
