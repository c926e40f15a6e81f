import sys

from qlora_lite.cli import main

sys.exit(main())
