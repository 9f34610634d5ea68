"""The service commands docker-compose.yml runs; the end-to-end tests run exactly these (with the venv's ``dama``)."""

COMPOSE_COMMANDS: dict[str, list[str]] = {
    "migrate": ["dama", "migrate"],
    "api": ["dama", "api"],
    "worker": ["dama", "worker"],
    "infer": ["dama", "infer"],
}
