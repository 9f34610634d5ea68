"""The web console (``/console``) and the offline API docs (``/docs``, ``/redoc``), served by the API itself.

Everything the browser loads comes from this service: the console's own static modules (``static/app``, no build
step) and Swagger UI / ReDoc from the pinned ``fastapi-offline`` package. Pages carry a Content-Security-Policy
that allows no inline script, no ``eval`` and no other origin.
"""
