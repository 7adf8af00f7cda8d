import sys

from airflow_comfy.runner.cli import main

sys.exit(main())
