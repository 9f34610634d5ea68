"""One definition per setting, shared by the engine (``dama_engine``) and the service (``api``, ``jobstore``).

Torch-free and import-light: ``api`` and ``jobstore`` may import it, and so may ``dama_engine``; it imports none
of them (tests/test_layout.py). Each knob's name, default, bounds, description and allowed values are written
here once (:mod:`dama_settings.knobs`); the engine config (``dama_engine.config``), the job spec
(``jobstore.spec``) and the objective (``dama_engine.objective.ObjectiveConfig``) take them from here. Stage and
method names, accepted file suffixes (:mod:`dama_settings.names`) and the supported model families
(:mod:`dama_settings.families`) live here too.
"""

from dama_settings.setting import Setting

__all__ = ["Setting"]
