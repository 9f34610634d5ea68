"""The proving ground: the shapes world (:mod:`.shapes`), the seeing base (:mod:`.seeing_base`), on-policy pairs
(:mod:`.on_policy`), the recipe that ties them together (:mod:`.ground`), the blank-image check
(:mod:`.blank_check`) and the demo runs (:mod:`.demo`). Inside the engine only :mod:`dama_engine.cli` imports it.
"""

from dama_engine.proving.demo import prepare_proving_demo
from dama_engine.proving.ground import (
    BASE,
    IMAGE_SIZE,
    PAIRS,
    SCENES,
    TRAINING,
    ProvingGround,
    default_root,
    prepare_proving_ground,
    training_values,
)
from dama_engine.proving.seeing_base import build_seeing_base, seeing_base_recipe
from dama_engine.proving.shapes import DemoDataset, make_demo_dataset

__all__ = [
    "BASE",
    "IMAGE_SIZE",
    "PAIRS",
    "SCENES",
    "TRAINING",
    "DemoDataset",
    "ProvingGround",
    "build_seeing_base",
    "default_root",
    "make_demo_dataset",
    "prepare_proving_demo",
    "prepare_proving_ground",
    "seeing_base_recipe",
    "training_values",
]
