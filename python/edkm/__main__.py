import sys

from edkm.cli import main

sys.exit(main())
