"""``python -m dama_client``: the client commands alone."""

import sys

from dama_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
