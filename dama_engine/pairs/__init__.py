"""Preference pairs sampled from the user's own model and judged against what is in the image: the config
(:mod:`.config`), the pairing rule and scores (:mod:`.rule`), the run (:mod:`.run`), the report (:mod:`.report`) and
the atomic output (:mod:`.output`). Generic: no proving-ground (shapes world) code is on this path.
"""

from dama_engine.pairs.config import PairsConfig, load_pairs_config, parse_pairs_config
from dama_engine.pairs.output import PairOutput
from dama_engine.pairs.rule import choose_pair, sample_score
from dama_engine.pairs.run import PAIR_STAGES, NoPairsError, PairGenerationResult, generate_pairs, sample_seed

__all__ = [
    "PAIR_STAGES",
    "NoPairsError",
    "PairGenerationResult",
    "PairOutput",
    "PairsConfig",
    "choose_pair",
    "generate_pairs",
    "load_pairs_config",
    "parse_pairs_config",
    "sample_score",
    "sample_seed",
]
