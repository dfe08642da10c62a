import sys

from spnn_fast.cli import main

sys.exit(main())
