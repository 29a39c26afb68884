import sys

from lora_gui.cli import main

sys.exit(main())
