import logging
import os
import sys

from airflow_comfy.runner.cli import main

code = main(process=True)
if code != 0:
    # A failed runner leaves at once: tearing torch down takes seconds (more with a store call stuck past its
    # deadline in a daemon thread), and the task is waiting for the exit code.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
