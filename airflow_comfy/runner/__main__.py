import logging
import os
import sys

from airflow_comfy.runner.cli import main

code = main(process=True)
# Everything the group writes (outputs, images, manifest) is written and closed by now. Skip the interpreter's
# teardown: with diffusers and transformers loaded it spends 2-3 s collecting their module graph, in every
# group process, for nothing; a failed runner would also wait for a store call stuck past its deadline in a
# daemon thread, while the task is waiting for the exit code.
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
