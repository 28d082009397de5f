"""Runtime plumbing shared by training, evaluation and export: nothing here knows the model or the loss.

Modules (import them directly; this package imports nothing so that importing one piece stays cheap):

* `sharding`: the device mesh, parameter sharding rules, batch placement, placing a host state on the mesh.
* `distributed`: `jax.distributed` start-up, barriers, compiling together on every process.
* `checkpoint`: Orbax `CheckpointManager`s for the train state, the input iterator state and the config;
  preemption (SIGTERM) handling.
* `compile_options`: XLA compiler options of the train step and the eval predict.
* `paths`: file I/O on local or remote (`gs://`) paths through etils.epath; atomic JSON/text writes.
"""
