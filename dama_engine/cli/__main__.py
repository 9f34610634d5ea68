"""``python -m dama_engine.cli CONFIG.yaml ...``: ``dama-train`` (what ``torchrun`` launches on every rank)."""

from dama_engine.cli.train import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
