"""Learning: tools built on the engine and the model rather than parts of them.

  dataset.py   the on-disk demonstration dataset format (dataset.json, manifest.jsonl, one .npz per kept
               episode) and reading it back as training samples
  demos.py     recording scripted-expert demonstrations into that format (`libero-eval record-demos`)
  training.py  training the small Pi0.5 on them with its flow-matching objective (`libero-eval train`)
  commands.py  the two subcommands' parsers and entry points

`policies/` stays inference only: training uses `policies.pi05` (the model, checkpoints, processing) and the
recording uses `tasks` (LIBERO envs) and `policies.expert`; neither of those imports anything from here.
"""
