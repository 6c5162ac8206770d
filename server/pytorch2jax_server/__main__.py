import sys

from pytorch2jax_server._entry import main

sys.exit(main())
