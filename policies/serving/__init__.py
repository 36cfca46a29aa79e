"""The serving core, Ray-free: variants (typed, validated once), a batcher, the engine that owns sessions
(model-free ones in `engine`, Pi0.5 ones with their cache state in `pi05`), the model section and its loading
(`model`), and `Pi05Policy`, the single-episode Policy over the same engine. A Ray actor only transports.
"""
