"""dama_engine: DAMA (Data- and Model-aware DPO) preference tuning of vision-language models.

The ML library behind the service, usable on its own. Subpackages, each owning one concern, imported in one
direction only (lower never imports higher; ``tests/test_layout.py`` holds the order and enforces it):

    errors, threads, callbacks, events, model_files   small shared modules at the root
    data        datasets -> canonical rows, validation, the generative set, the CHAIR matcher (torch-free)
    objective   the loss of every method and the hardness formulas (shared/DAMA.md)
    config      the training config (root module)
    models      families, loading, tiny models
    forward     batching, log-probs, packing, compiling, generation, scoring helpers
    serving     chat requests answered many per generate call (`dama infer`): protocol, batches, model cache
    evaluation  running an evaluation, metrics (CHAIR's and POPE's), the judge client, the report
    pairs       preference pairs sampled from the user's model, judged against the image's objects
    training    the recipe (``train()``), the step, checkpoints, reference cache, export
    proving     the shapes world, the seeing base, on-policy pairs, the proving-ground recipe, the demo runs
    cli         ``dama-train``, ``dama-eval``, ``dama-pairs``

Each subpackage's ``__init__`` names its public surface. It imports nothing of the service, reads no environment
variables and sets no global state at import time.
"""

__version__ = "0.1.0"
