import sys

from ckptstore.cli.main import main

sys.exit(main())
