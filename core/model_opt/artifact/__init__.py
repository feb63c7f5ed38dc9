"""model-opt's own artifacts (format 2).

A zip holding ``model_opt.json`` (the recipe: where the original model came from and every step applied, with the
options and the JSON state that replays it) and ``weights.pt`` (the optimized model's ``state_dict``, plain tensors
and torchao's safe tensor types); or a folder holding the same recipe beside files the ecosystem opens (safetensors
or the runtime's own files, the Hugging Face config, the tokenizer). Reopening builds the original architecture,
replays each step through its plugin's ``restore`` hook and loads the weights: nothing in the file is executed. A
step whose plugin has no ``restore`` hook is saved as a pickled model (``model.pt``), which, like a format 1
artifact, reopens only with ``trust_model=True``.

:mod:`.format` reads the recipe, :mod:`.read` reopens, :mod:`.write` saves.
"""
