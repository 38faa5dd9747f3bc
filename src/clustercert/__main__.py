import sys

from clustercert.cli import main

sys.exit(main())
