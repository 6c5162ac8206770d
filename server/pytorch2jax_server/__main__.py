import sys

from pytorch2jax_server._cli import main

sys.exit(main())
