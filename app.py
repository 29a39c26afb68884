"""Start LoRA GUI: `python app.py [--port N] [--listen] [--share] [--auth user:pass] [--workspace DIR]`."""

import sys

from lora_gui.app_entry import launch_app

if __name__ == "__main__":
    sys.exit(launch_app(sys.argv[1:]))
