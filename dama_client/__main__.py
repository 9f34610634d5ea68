import sys

from dama_client.cli import main

sys.exit(main())
